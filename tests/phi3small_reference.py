"""Phi-3-small in plain numpy, written from the published model description (test helper, no edgephi imports).

transformers has no class for Phi-3-small (model_type "phi3small"); the release runs its own remote code.  This
follows that code's arithmetic, read from microsoft/Phi-3-small-8k-instruct's files:

* modeling_phi3_small.py: embeddings x mup_embedding_multiplier; per layer x + dense(attn(LN1 x)), then
  x + down(gegelu(up(LN2 x))) (LayerNorm with bias, layer_norm_epsilon); query_key_value viewed as (..., n_kv,
  n_q_per_kv + 2, head_dim): a KV head's query heads, then its key, then its value (_split_heads), the KV heads
  repeated to the query heads (repeat_interleave); softmax scale mup_attn_multiplier / head_dim with
  mup_use_scaling; layer i is dense when (i + 1) % dense_attention_every_n_layers == 0, else block-sparse;
  gegelu: a = x[..., ::2] clamped to max gegelu_limit, b = x[..., 1::2] clamped to +-limit, a * sigmoid(1.702 a)
  * (b + 1); final LayerNorm; logits = hidden @ embed_tokens.T (tied) / mup_width_multiplier, then the dummy
  token ids filled with float32's lowest;
* positional_embedding.py: rotary on the whole head (rotate_half), positions x rope_position_scale, base
  rope_embedding_base;
* triton_flash_blocksparse_attn.py (_get_sparse_attn_mask): block mask (q_blk >= k_blk) & ((q_blk - k_blk <
  local_blocks) | vertical), vertical = (k_blk + h * head_sliding_step + 1) % vert_stride == 0 with
  head_sliding_step = max(1, int(vert_stride / n_heads)) (homo_head: h * step dropped), expanded to tokens with
  kron(block mask, ones(BLOCK, BLOCK)) and multiplied by the causal tril;
* tokenization_phi3_small.py: dummy_token_indices = every special token named "dummy_id" plus <|fim_prefix|>,
  <|fim_middle|>, <|fim_suffix|>, <|endofprompt|>.

Every call recomputes the whole sequence (no cache): the reference for prefill and for cached decode alike.
"""
from __future__ import annotations

import numpy as np


def dummy_token_indices(special_tokens: dict[str, int]) -> list[int]:
    extra = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
    return sorted([i for t, i in special_tokens.items() if "dummy_id" in t] + [special_tokens[t] for t in extra])


def sparse_mask(cfg: dict, q_len: int, n_ctx: int) -> np.ndarray:
    """(n_heads, q_len, n_ctx) bool: the last q_len query rows of _get_sparse_attn_mask's dense mask."""
    n_heads, block = cfg["num_attention_heads"], cfg["blocksparse_block_size"]
    local, stride = cfg["blocksparse_num_local_blocks"], cfg["blocksparse_vert_stride"]
    n_block = -(-n_ctx // block)
    q_pos, k_pos = np.arange(n_block)[None, :, None], np.arange(n_block)[None, None]
    if cfg["blocksparse_homo_head_pattern"]:
        vert = ((np.arange(n_block) + 1) % stride == 0)[None, None]
    else:
        step = max(1, int(stride / n_heads))
        vert = np.stack([(np.arange(n_block) + h * step + 1) % stride == 0 for h in range(n_heads)])[:, None]
    blocks = ((q_pos >= k_pos) & ((q_pos - k_pos < local) | vert)).astype(np.float32)
    # (heads or 1, C, C); cut to n_ctx first (the original builds it for N_CTX = max_seq_len, a whole number of
    # blocks, where both orders agree)
    dense = np.kron(blocks, np.ones((block, block), np.float32))[..., :n_ctx, :n_ctx]
    causal = np.tril(np.ones((n_ctx, n_ctx), np.float32))[-q_len:]
    return np.broadcast_to(dense[..., -q_len:, :] * causal, (n_heads, q_len, n_ctx)) > 0


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + np.concatenate([-t[..., half:], t[..., :half]], -1) * sin


def logits(cfg: dict, W: dict[str, np.ndarray], ids: list[int], dummy: list[int], rows: int | None = None
           ) -> np.ndarray:
    """(T, vocab) float32 logits of the whole sequence (of its last `rows` positions), float64 inside."""
    if not W or next(iter(W.values())).dtype != np.float64:
        W = {k: v.astype(np.float64) for k, v in W.items()}
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, rep, eps, T = H // nh, nh // nkv, cfg["layer_norm_epsilon"], len(ids)
    lim = cfg["gegelu_limit"]
    x = W["model.embed_tokens.weight"][ids] * cfg["mup_embedding_multiplier"]
    t = np.arange(T) * cfg["rope_position_scale"]
    freqs = np.outer(t, 1.0 / cfg["rope_embedding_base"] ** (np.arange(0, hd, 2) / hd))
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]  # (T, 1, hd)
    scale = cfg["mup_attn_multiplier"] / hd if cfg["mup_use_scaling"] else 1 / np.sqrt(hd)
    causal = np.tril(np.ones((T, T), bool))[None]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _layer_norm(x, W[p + "input_layernorm.weight"], W[p + "input_layernorm.bias"], eps)
        mixed = h @ W[p + "self_attn.query_key_value.weight"].T + W[p + "self_attn.query_key_value.bias"]
        mixed = mixed.reshape(T, nkv, rep + 2, hd)
        q, k, v = mixed[:, :, :-2].reshape(T, nh, hd), mixed[:, :, -2], mixed[:, :, -1]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        n = cfg["dense_attention_every_n_layers"]
        mask = causal if n and (i + 1) % n == 0 else sparse_mask(cfg, T, T)
        s = np.where(mask, np.einsum("qhd,khd->hqk", q, k) * scale, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(T, H)
        x = x + a @ W[p + "self_attn.dense.weight"].T + W[p + "self_attn.dense.bias"]
        h = _layer_norm(x, W[p + "post_attention_layernorm.weight"], W[p + "post_attention_layernorm.bias"], eps)
        u = h @ W[p + "mlp.up_proj.weight"].T + W[p + "mlp.up_proj.bias"]
        g, lin = np.minimum(u[..., ::2], lim), np.clip(u[..., 1::2], -lim, lim)
        m = g / (1 + np.exp(-1.702 * g)) * (lin + 1)
        x = x + m @ W[p + "mlp.down_proj.weight"].T + W[p + "mlp.down_proj.bias"]
    h = _layer_norm(x[-(rows or T):], W["model.final_layernorm.weight"], W["model.final_layernorm.bias"], eps)
    out = (h @ W["model.embed_tokens.weight"].T / cfg["mup_width_multiplier"]).astype(np.float32)
    out[:, dummy] = np.finfo(np.float32).min
    return out


def greedy(cfg, W, dummy, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(tokens, the prompt's logits (T, V), each step's logits (steps, V)): a full recompute per step."""
    seq, rows = list(prompt), []
    full = None
    W = {k: v.astype(np.float64) for k, v in W.items()}
    for _ in range(steps):
        out = logits(cfg, W, seq, dummy, None if full is None else 1)
        full = out if full is None else full
        rows.append(out[-1])
        seq.append(int(np.argmax(out[-1])))
    return seq[len(prompt):], full, np.stack(rows)
