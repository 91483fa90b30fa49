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
    def embed(self, table: str) -> np.ndarray:
        return self.w("embed", table)[self.ids]  # (T, H)

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

    def act(self, x, kind: str):
        if kind == "silu":
            return x / (1.0 + np.exp(-x))
        if kind == "gelu_tanh":
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
        raise NotImplementedError(f"numpy lowering: activation {kind!r}")

    def mul(self, a, b):
        return a * b

    def add(self, a, b):
        return a + b

    def logits(self, x, weight: str, bias: str | None = None):
        y = x @ self.w("logits", weight).T
        return y if bias is None else y + self.w("bias", bias)

    def attention(self, layer: int, x, qkv, bias):
        s = self.spec
        hd, nh, nkv = s.head_dim, s.num_attention_heads, s.num_key_value_heads
        if isinstance(qkv, str):
            q, k, v = np.split(self.linear(x, qkv), [nh * hd, nh * hd + nkv * hd], axis=-1)
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
        bias_mask = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)  # (T, n_past + T)
        kr = np.repeat(keys, s.n_rep, axis=1)  # (S, nh, hd): query head h uses KV head h // n_rep
        vr = np.repeat(vals, s.n_rep, axis=1)
        scores = np.einsum("thd,shd->hts", q, kr) / math.sqrt(hd) + bias_mask
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
