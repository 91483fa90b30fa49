"""Phi-3 family (Phi-3/3.5-mini 4k and 128k, Phi-3-medium, Phi-4, Phi-4-reasoning, Phi-4-mini(-reasoning)): pre-norm
RMSNorm blocks, fused qkv_proj and gate_up_proj, SiLU-gated MLP, optional sliding window, LongRoPE, grouped KV heads,
partial rotary, tied embeddings.

Reference: transformers' models/phi3/modeling_phi3.py (Phi3DecoderLayer, Phi3MLP).
"""
from __future__ import annotations

from . import Architecture, checkpoint_tensors, head_weight, register


def tensors(spec) -> dict[str, tuple[int, ...]]:
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.kv_dim
    layer = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.qkv_proj.weight": (q + 2 * kv, H),  # rows q | k | v
        "self_attn.o_proj.weight": (H, q),
        "mlp.gate_up_proj.weight": (2 * I, H),  # rows gate | up
        "mlp.down_proj.weight": (H, I),
    }
    final = {"model.norm.weight": (H,)}
    if not spec.tie_word_embeddings:
        final["lm_head.weight"] = (V, H)
    return checkpoint_tensors(spec, layer, final)


def forward(ops, spec):
    x = ops.embed("model.embed_tokens.weight")
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ops.rms_norm(x, p + "input_layernorm.weight")
        a = ops.attention(i, h, p + "self_attn.qkv_proj.weight", None)
        x = ops.add(x, ops.linear(a, p + "self_attn.o_proj.weight"))
        h = ops.rms_norm(x, p + "post_attention_layernorm.weight")
        gate, up = ops.split_linear(h, p + "mlp.gate_up_proj.weight", 2)
        x = ops.add(x, ops.linear(ops.mul(ops.act(gate, "silu"), up), p + "mlp.down_proj.weight"))
    return ops.logits(ops.rms_norm(x, "model.norm.weight"), head_weight(spec))


def gguf_metadata(spec) -> dict:
    md = {
        "layer_norm_rms_eps": spec.norm_eps,
        # llama.cpp chooses LongRoPE's long factors when the context it runs with exceeds this length
        "rope_scaling_orig_ctx_len": spec.original_max_position_embeddings or spec.max_position_embeddings,
        # 0 = none (Phi-4-mini); llama.cpp 0.3.x reads it but disables Phi-3 SWA (edgephi's backend applies it)
        "sliding_window": spec.sliding_window or 0,
    }
    if spec.rope_scaling is not None:  # multiplies cos and sin: transformers' attention_factor
        md["rope_scaling_attn_factors"] = spec.rope_scaling.attention_factor
    return md


ARCH = register(Architecture(
    model_type="phi3", description="Phi-3/3.5-mini, Phi-3-medium, Phi-4, Phi-4-mini (and -reasoning)",
    tensors=tensors, forward=forward,
    norm_eps_key="rms_norm_eps", activations=("silu",), gguf_arch="phi3", gguf_metadata=gguf_metadata))
