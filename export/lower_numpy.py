"""The numpy lowering: an architecture file's forward() evaluated eagerly in float32 numpy, with a KV cache.

A second numeric reference beside transformers: the tests check it against transformers on every variant, then
use it where a reference needs the exporter's own weight rounding (int4, float16 tables), by passing
``transform(role, name, array)``, which sees every weight as it is read (role: "embed", "linear", "logits",
"norm" or "bias").  It follows the Session protocol (forward / rewind / n_past) by duck typing.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from edgephi import arch
from edgephi.formats import MASK_VALUE

Transform = Callable[[str, str, np.ndarray], np.ndarray]


class NumpyModel:
    def __init__(self, tensors, spec, transform: Transform | None = None, n_ctx: int | None = None):
        self.tensors, self.spec, self.transform = tensors, spec, transform
        self.arch = arch.get(spec.model_type)
        self.n_ctx = n_ctx or spec.max_position_embeddings
        self._weights: dict[tuple[str, str], np.ndarray] = {}
        self.cache: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: k, v (n_past, n_kv, head_dim)
        self.n_past = self.n_evaluated = 0

    # ---- the Session protocol ---------------------------------------------------------------------------------
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids) or self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"forward: {len(ids)} ids after {self.n_past} cached; n_ctx {self.n_ctx}")
        self.ids = ids
        self.positions = self.n_past + np.arange(len(ids))
        self.long = arch.uses_long_rope(self.spec, self.n_past + len(ids))
        logits = self.arch.forward(self, self.spec)
        self.n_past += len(ids)
        self.n_evaluated += len(ids)
        return logits if all_logits else logits[-1]

    def rewind(self, n: int) -> None:
        self.cache = [(k[:n], v[:n]) for k, v in self.cache]
        self.n_past = n

    def reset(self) -> None:
        self.rewind(0)

    # ---- weights ----------------------------------------------------------------------------------------------
    def w(self, role: str, name: str) -> np.ndarray:
        key = (role, name)
        if key not in self._weights:
            arr = self.tensors.read(name).astype(np.float32)
            self._weights[key] = arr if self.transform is None else self.transform(role, name, arr)
        return self._weights[key]

    # ---- the op vocabulary ------------------------------------------------------------------------------------
    def embed(self, table: str, scale: float | None = None) -> np.ndarray:
        x = self.w("embed", table)[self.ids]  # (T, H)
        return x if scale is None else x * np.float32(scale)

    def rms_norm(self, x, weight: str):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.spec.norm_eps) * self.w("norm", weight)

    def layer_norm(self, x, weight: str, bias: str):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.spec.norm_eps) * self.w("norm", weight) + self.w("bias", bias)

    def linear(self, x, weight: str, bias: str | None = None):
        y = x @ self.w("linear", weight).T
        return y if bias is None else y + self.w("bias", bias)

    def split_linear(self, x, weight: str, parts: int):
        return tuple(np.split(self.linear(x, weight), parts, axis=-1))

    def act(self, x, kind: str, limit: float | None = None):
        if kind == "gegelu":  # x = [gelu half | linear half]
            a, b = np.split(x, 2, axis=-1)
            a = np.minimum(a, limit)
            return a / (1.0 + np.exp(-1.702 * a)) * (np.clip(b, -limit, limit) + 1.0)
        if kind == "silu":
            return x / (1.0 + np.exp(-x))
        if kind == "gelu_tanh":
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
        raise NotImplementedError(f"numpy lowering: activation {kind!r}")

    def mul(self, a, b):
        return a * b

    def add(self, a, b):
        return a + b

    def logits(self, x, weight: str, bias: str | None = None, scale: float | None = None, masked=None):
        y = x @ self.w("logits", weight).T
        y = y if bias is None else y + self.w("bias", bias)
        if scale is not None:
            y = y * np.float32(scale)
        if masked is not None:
            y[..., list(masked)] = arch.MASKED_LOGIT
        return y

    def attention(self, layer: int, x, qkv, bias, scale: float | None = None, block_sparse=None):
        s = self.spec
        hd, nh, nkv = s.head_dim, s.num_attention_heads, s.num_key_value_heads
        if isinstance(qkv, str):
            q, k, v = np.split(self.linear(x, qkv, bias), [nh * hd, nh * hd + nkv * hd], axis=-1)
        else:
            q, k, v = (self.linear(x, w, b) for w, b in zip(qkv, bias or (None,) * 3))
        T = x.shape[0]
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        q, k = self._rotary(q), self._rotary(k)
        if layer == len(self.cache):
            self.cache.append((k, v))
        else:
            pk, pv = self.cache[layer]
            self.cache[layer] = (np.concatenate([pk, k]), np.concatenate([pv, v]))
        keys, vals = self.cache[layer]  # (n_past + T, n_kv, hd)
        kpos = np.arange(len(keys))[None, :]
        qpos = self.positions[:, None]
        allowed = kpos <= qpos
        window = s.effective_sliding_window
        if window is not None:
            allowed &= kpos > qpos - window
        if block_sparse is not None:  # (heads or 1, T, S)
            S, bs = len(keys), block_sparse.block_size
            table = block_sparse.block_table(nh, -(-S // bs))
            allowed = allowed[None] & table[:, self.positions // bs][:, :, np.arange(S) // bs]
        bias_mask = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)  # ([heads,] T, n_past + T)
        kr = np.repeat(keys, s.n_rep, axis=1)  # (S, nh, hd): query head h uses KV head h // n_rep
        vr = np.repeat(vals, s.n_rep, axis=1)
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        scores = np.einsum("thd,shd->hts", q, kr) * np.float32(scale) + bias_mask
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        return np.einsum("hts,shd->thd", p, vr).reshape(T, nh * hd)

    def _rotary(self, x):
        """transformers' rotate_half on the first rotary_dim channels of each head; x (T, heads, hd)."""
        r = self.spec.rotary_dim // 2
        cos, sin = arch.rope_tables(self.spec, self.n_past + len(self.ids), long=self.long)
        cos, sin = cos[self.positions][:, None, :], sin[self.positions][:, None, :]  # (T, 1, r)
        x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)

    # ---- mixture of experts (Phi-3.5-MoE) -----------------------------------------------------------------------
    def sparse_moe(self, x, router: str, experts: list[tuple[str, str, str]]):
        """Each token through the two experts sparsemixer picks, weighted as it says (transformers, eval mode)."""
        weights, chosen = sparsemixer(x @ self.w("router", router).T, self.spec.router_jitter_noise)
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            for w, e in zip(weights[t], chosen[t]):
                gate, up, down = experts[e]
                h = self.act(x[t] @ self.w("linear", gate).T, "silu") * (x[t] @ self.w("linear", up).T)
                out[t] += w * (h @ self.w("linear", down).T)
        return out


def sparsemixer(scores: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' sparsemixer in eval mode: (weights (T, 2), experts (T, 2)).  Round r picks the best remaining
    expert and weighs it by the softmax, over the experts whose score is within 2 x jitter_eps (relative to
    max(|score|, best)) of the round's best, taken at that expert."""
    T = scores.shape[0]
    rows = np.arange(T)
    masked = scores.astype(np.float64)
    weights, chosen = np.zeros((T, 2)), np.zeros((T, 2), dtype=np.int64)
    for r in range(2):
        best, pick = masked.max(axis=-1, keepdims=True), masked.argmax(axis=-1)
        far = (best - scores) / np.maximum(np.abs(scores), best) > 2 * jitter_eps
        gates = np.where(far, -np.inf, masked)
        p = np.exp(gates - gates.max(axis=-1, keepdims=True))
        weights[:, r], chosen[:, r] = (p / p.sum(axis=-1, keepdims=True))[rows, pick], pick
        masked[rows, pick] = -np.inf
    return weights.astype(np.float32), chosen
