"""Phi-1, Phi-1.5, Phi-2 (model_type "phi"): one LayerNorm feeds attention and the MLP in parallel, both add to the
residual together; biased projections and lm_head, partial rotary, gelu_new.

Reference: transformers' models/phi/modeling_phi.py (PhiDecoderLayer, PhiMLP).
"""
from __future__ import annotations

from . import Architecture, checkpoint_tensors, register


def tensors(spec) -> dict[str, tuple[int, ...]]:
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.kv_dim
    layer = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, H), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, H), "self_attn.v_proj.bias": (kv,),
        "self_attn.dense.weight": (H, q), "self_attn.dense.bias": (H,),
        "mlp.fc1.weight": (I, H), "mlp.fc1.bias": (I,),
        "mlp.fc2.weight": (H, I), "mlp.fc2.bias": (H,),
    }
    return checkpoint_tensors(spec, layer, {"model.final_layernorm.weight": (H,), "model.final_layernorm.bias": (H,),
                                            "lm_head.weight": (V, H), "lm_head.bias": (V,)})


def forward(ops, spec):
    x = ops.embed("model.embed_tokens.weight")
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ops.layer_norm(x, p + "input_layernorm.weight", p + "input_layernorm.bias")
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        a = ops.attention(i, h, [n + "weight" for n in qkv], [n + "bias" for n in qkv])
        a = ops.linear(a, p + "self_attn.dense.weight", p + "self_attn.dense.bias")
        m = ops.act(ops.linear(h, p + "mlp.fc1.weight", p + "mlp.fc1.bias"), "gelu_tanh")
        m = ops.linear(m, p + "mlp.fc2.weight", p + "mlp.fc2.bias")
        x = ops.add(x, ops.add(a, m))
    h = ops.layer_norm(x, "model.final_layernorm.weight", "model.final_layernorm.bias")
    return ops.logits(h, "lm_head.weight", "lm_head.bias")


def gguf_metadata(spec) -> dict:
    return {"layer_norm_eps": spec.norm_eps}


def check(spec) -> tuple[str, str] | None:
    if spec.tie_word_embeddings:
        return "tie_word_embeddings", "Phi-1/1.5/2 have a biased lm_head of their own"
    return None


ARCH = register(Architecture(
    model_type="phi", description="Phi-1, Phi-1.5, Phi-2", tensors=tensors, forward=forward,
    norm_eps_key="layer_norm_eps", activations=("gelu_new", "gelu_pytorch_tanh", "gelu"),
    gguf_arch="phi2", gguf_metadata=gguf_metadata, check=check))
