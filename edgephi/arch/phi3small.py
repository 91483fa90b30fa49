"""Phi-3-small (model_type "phi3small", 7B, 8k and 128k): pre-norm LayerNorm blocks with biased projections,
muP scales (embeddings x mup_embedding_multiplier, softmax scale mup_attn_multiplier / head_dim, logits /
mup_width_multiplier), tied embeddings, grouped KV heads with block-sparse attention on every layer but each
dense_attention_every_n_layers-th, and a GEGELU MLP; the logits of the tokenizer's unused ("dummy") ids are
masked.

Reference: microsoft/Phi-3-small-8k-instruct's remote code (modeling_phi3_small.py: Phi3SmallSelfAttention,
Phi3SmallMLP, gegelu, Phi3SmallForCausalLM; triton_flash_blocksparse_attn.py's _get_sparse_attn_mask;
positional_embedding.py; tokenization_phi3_small.py's dummy_token_indices), cross-checked with mlx-lm's
models/phi3small.py.  The checkpoint's query_key_value rows come per KV head as its n_rep query heads, then its
key, then its value, and up_proj's rows interleave the GEGELU halves (gelu, linear, gelu, ...): row_order reads
both as the ops take them (q | k | v; gelu half | linear half).  llama.cpp has no graph for the family.
"""
from __future__ import annotations

import math

from . import Architecture, BlockSparse, checkpoint_tensors, head_weight, register

# tokenization_phi3_small.py: ids of cl100k_base's padded vocabulary that the release never uses, masked to
# float32's lowest in Phi3SmallForCausalLM.forward: <|dummy_id_2|> 100256, <|fim_prefix|>..<|fim_suffix|>
# 100258-100260, <|dummy_id_0|>/<|dummy_id_1|> 100264-100265, then 100267..100351 (<|dummy_id_3..11|>,
# <|endofprompt|> 100276, <|dummy_id_12..86|>)
RELEASE_VOCAB_SIZE = 100352
DUMMY_TOKEN_IDS = (100256, 100258, 100259, 100260, 100264, 100265) + tuple(range(100267, 100352))
GGUF_REFUSAL = ("llama.cpp has no Phi-3-small graph (block-sparse attention, GEGELU, muP scales; its architecture "
                "list has phi2, phi3 and phimoe only)")


def tensors(spec) -> dict[str, tuple[int, ...]]:
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    qkv = (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim
    layer = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "self_attn.query_key_value.weight": (qkv, H), "self_attn.query_key_value.bias": (qkv,),
        "self_attn.dense.weight": (H, H), "self_attn.dense.bias": (H,),
        "post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
        "mlp.up_proj.weight": (2 * I, H), "mlp.up_proj.bias": (2 * I,),  # rows gelu, linear, gelu, ...
        "mlp.down_proj.weight": (H, I), "mlp.down_proj.bias": (H,),
    }
    final = {"model.final_layernorm.weight": (H,), "model.final_layernorm.bias": (H,)}
    if not spec.tie_word_embeddings:
        final["lm_head.weight"] = (V, H)
    return checkpoint_tensors(spec, layer, final)


def is_dense(spec, layer: int) -> bool:
    """The original's rule: (layer + 1) % dense_attention_every_n_layers == 0 is dense (0 = none is)."""
    n = spec.dense_attention_every_n_layers
    return bool(n) and (layer + 1) % n == 0


def block_sparse(spec) -> BlockSparse:
    homo = spec.blocksparse_homo_head_pattern
    step = 0 if homo else max(1, spec.blocksparse_vert_stride // spec.num_attention_heads)
    return BlockSparse(spec.blocksparse_block_size, spec.blocksparse_num_local_blocks, spec.blocksparse_vert_stride,
                       step)


def attention_scale(spec) -> float:
    if spec.mup_use_scaling:
        return spec.mup_attn_multiplier / spec.head_dim
    return 1.0 / math.sqrt(spec.head_dim)


def forward(ops, spec):
    scale, sparse = attention_scale(spec), block_sparse(spec)
    x = ops.embed("model.embed_tokens.weight", scale=spec.mup_embedding_multiplier)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        h = ops.layer_norm(x, p + "input_layernorm.weight", p + "input_layernorm.bias")
        a = ops.attention(i, h, p + "self_attn.query_key_value.weight", p + "self_attn.query_key_value.bias",
                          scale=scale, block_sparse=None if is_dense(spec, i) else sparse)
        x = ops.add(x, ops.linear(a, p + "self_attn.dense.weight", p + "self_attn.dense.bias"))
        h = ops.layer_norm(x, p + "post_attention_layernorm.weight", p + "post_attention_layernorm.bias")
        m = ops.act(ops.linear(h, p + "mlp.up_proj.weight", p + "mlp.up_proj.bias"), "gegelu",
                    limit=spec.gegelu_limit)
        x = ops.add(x, ops.linear(m, p + "mlp.down_proj.weight", p + "mlp.down_proj.bias"))
    h = ops.layer_norm(x, "model.final_layernorm.weight", "model.final_layernorm.bias")
    return ops.logits(h, head_weight(spec), scale=1.0 / spec.mup_width_multiplier,
                      masked=spec.dummy_token_ids or None)


def row_order(spec) -> dict:
    """query_key_value: (n_kv groups of [n_rep q heads, k, v]) -> q heads | k heads | v heads, query head
    g * n_rep + r being group g's r-th (so grouped attention's KV head h // n_rep is its own group);
    up_proj: even rows (the gelu half) then odd rows (the linear half)."""
    import numpy as np

    rep, hd = spec.n_rep, spec.head_dim
    slots = np.arange(spec.num_key_value_heads * (rep + 2)).reshape(-1, rep + 2)
    heads = np.concatenate([slots[:, :rep].ravel(), slots[:, rep], slots[:, rep + 1]])
    qkv = (heads[:, None] * hd + np.arange(hd)).ravel()
    n = 2 * spec.intermediate_size
    up = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
    out = {}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.query_key_value.weight": qkv, p + "self_attn.query_key_value.bias": qkv,
                    p + "mlp.up_proj.weight": up, p + "mlp.up_proj.bias": up})
    return out


def check(spec) -> tuple[str, str] | None:
    if spec.gegelu_limit is None:
        return "gegelu_limit", "Phi-3-small's GEGELU needs a limit"
    if spec.blocksparse_block_size < 1:
        return "blocksparse_block_size", "must be >= 1"
    if spec.blocksparse_num_local_blocks < 1:
        return "blocksparse_num_local_blocks", "must be >= 1 (a query must see its own block)"
    if spec.blocksparse_vert_stride < 1:
        return "blocksparse_vert_stride", "must be >= 1"
    return None


ARCH = register(Architecture(
    model_type="phi3small", description="Phi-3-small", tensors=tensors, forward=forward,
    norm_eps_key="layer_norm_epsilon", activations=("gegelu",), gguf_arch=None, gguf_metadata=lambda spec: {},
    check=check, row_order=row_order, gguf_refusal=GGUF_REFUSAL))
