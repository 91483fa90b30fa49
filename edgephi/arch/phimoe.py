"""Phi-3.5-MoE (model_type "phimoe"): pre-norm LayerNorm blocks, q/k/v/o projections (biased in the release),
grouped KV heads, LongRoPE with a short and a long mscale, and a sparse mixture-of-experts MLP: a router scores
the experts, "sparsemixer" picks two, each expert is a SiLU-gated MLP (w1 gate, w3 up, w2 down); biased lm_head.

Reference: transformers' models/phimoe/modeling_phimoe.py (PhimoeDecoderLayer, PhimoeSparseMoeBlock,
sparsemixer in eval mode).  llama.cpp runs the file through its own "phimoe" graph, which is not this model's
arithmetic: it normalizes with RMSNorm (+ bias) where the release has LayerNorm, and routes with a renormalized
softmax over the top two where sparsemixer gives each chosen expert the softmax over the scores within 2 x
jitter_eps of its own (so usually 1.0): its logits differ from transformers' (measured in tests/test_moe.py).
"""
from __future__ import annotations

from . import Architecture, checkpoint_tensors, register


def experts(spec, layer: int) -> list[tuple[str, str, str]]:
    """(gate, up, down) weight names of each expert of a layer, in expert order."""
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    return [(p + f"{e}.w1.weight", p + f"{e}.w3.weight", p + f"{e}.w2.weight") for e in range(spec.num_local_experts)]


def tensors(spec) -> dict[str, tuple[int, ...]]:
    H, I, V, E = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.num_local_experts
    q, kv = spec.num_attention_heads * spec.head_dim, spec.kv_dim
    layer = {"input_layernorm.weight": (H,), "input_layernorm.bias": (H,)}
    for n, rows in (("q", q), ("k", kv), ("v", kv), ("o", H)):
        layer[f"self_attn.{n}_proj.weight"] = (rows, q if n == "o" else H)
        if spec.attention_bias:
            layer[f"self_attn.{n}_proj.bias"] = (rows,)
    layer.update({"post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
                  "block_sparse_moe.gate.weight": (E, H)})
    for e in range(E):
        p = f"block_sparse_moe.experts.{e}."
        layer.update({p + "w1.weight": (I, H), p + "w2.weight": (H, I), p + "w3.weight": (I, H)})
    final = {"model.norm.weight": (H,), "model.norm.bias": (H,), "lm_head.weight": (V, H)}
    if spec.lm_head_bias:
        final["lm_head.bias"] = (V,)
    return checkpoint_tensors(spec, layer, final)


def forward(ops, spec):
    bias = spec.attention_bias
    x = ops.embed("model.embed_tokens.weight")
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ops.layer_norm(x, p + "input_layernorm.weight", p + "input_layernorm.bias")
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        a = ops.attention(i, h, [n + "weight" for n in qkv], [n + "bias" for n in qkv] if bias else None)
        x = ops.add(x, ops.linear(a, p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias" if bias else None))
        h = ops.layer_norm(x, p + "post_attention_layernorm.weight", p + "post_attention_layernorm.bias")
        x = ops.add(x, ops.sparse_moe(h, p + "block_sparse_moe.gate.weight", experts(spec, i)))
    h = ops.layer_norm(x, "model.norm.weight", "model.norm.bias")
    return ops.logits(h, "lm_head.weight", "lm_head.bias" if spec.lm_head_bias else None)


def gguf_metadata(spec) -> dict:
    md = {
        "layer_norm_rms_eps": spec.norm_eps,  # llama.cpp's phimoe reads its (layer) norm epsilon from this key
        "rope_scaling_orig_ctx_len": spec.original_max_position_embeddings or spec.max_position_embeddings,
        "expert_count": spec.num_local_experts,
        "expert_used_count": spec.num_experts_per_tok,
    }
    if spec.rope_scaling is not None:
        md["rope_scaling_attn_factors"] = spec.rope_scaling.attention_factor
    return md


def gguf_stacked(spec) -> dict[str, list[str]]:
    """llama.cpp loads a layer's experts as one 3-D tensor per weight (its converter's merged names, which
    gguf-py's name map knows): merged name -> the per-expert checkpoint tensors stacked into it, in order."""
    out = {}
    for i in range(spec.num_hidden_layers):
        for k, w in enumerate(("w1", "w3", "w2")):  # experts() order: gate, up, down
            out[f"model.layers.{i}.block_sparse_moe.experts.{w}.weight"] = [e[k] for e in experts(spec, i)]
    return out


def check(spec) -> tuple[str, str] | None:
    if spec.num_local_experts < 2 or not 0 < spec.num_experts_per_tok <= spec.num_local_experts:
        return "num_local_experts", "needs at least 2 experts and 1..num_local_experts of them per token"
    if spec.num_experts_per_tok != 2:
        return "num_experts_per_tok", "sparsemixer routing picks exactly 2 experts"
    if spec.tie_word_embeddings:
        return "tie_word_embeddings", "Phi-3.5-MoE has a lm_head of its own"
    return None


ARCH = register(Architecture(
    model_type="phimoe", description="Phi-3.5-MoE", tensors=tensors, forward=forward,
    norm_eps_key="rms_norm_eps", activations=("silu",), gguf_arch="phimoe", gguf_metadata=gguf_metadata,
    gguf_stacked=gguf_stacked, check=check))
