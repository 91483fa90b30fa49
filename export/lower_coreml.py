"""The Core ML lowering: an architecture file's forward() as one stateful MIL program (iOS 18 / macOS 15 opset).

The program's interface is the format contract (edgephi/formats/coreml.py).  Values are MIL variables; the MIL
building blocks (weights as constants, norms, rotary, grouped attention) are in coreml_layers.py.

Each state is read ONCE; every layer writes its new keys/values with slice_update + coreml_update_state and the
value that coreml_update_state returns is threaded to the next layer.  Reading the state again per layer lets
coremltools 9.0's remove_redundant_ops pass merge the reads across a write and silently drop a layer's update
(coremltools PR #2786).
"""
from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types

from edgephi import arch

from . import coreml_layers as L


class CacheWriter:
    """Threads the key/value cache values through the layers (read once, update per layer)."""

    def __init__(self, spec, n_ctx: int, k_state, v_state, drop_layer: int | None = None):
        self.spec, self.n_ctx, self.drop_layer = spec, n_ctx, drop_layer
        self.states = {"k": k_state, "v": v_state}
        self.values = {"k": mb.read_state(input=k_state), "v": mb.read_state(input=v_state)}

    def write(self, which: str, layer: int, new, position, end):
        """Store new (1, T, Hk, d) at slots position..end-1 of layer; return the layer's cache (1, Hk, C, d)."""
        hk, d = self.spec.num_key_value_heads, self.spec.head_dim
        if layer != self.drop_layer:  # drop_layer: a test hook proving that the tests catch a lost update
            upd = mb.transpose(x=new, perm=[0, 2, 1, 3])  # (1, Hk, T, d)
            begin = mb.concat(values=[np.array([layer, 0], np.int32), position, np.array([0], np.int32)], axis=0)
            stop = mb.concat(values=[np.array([layer + 1, hk], np.int32), end, np.array([d], np.int32)], axis=0)
            value = mb.slice_update(x=self.values[which], update=upd, begin=begin, end=stop)
            self.values[which] = mb.coreml_update_state(state=self.states[which], value=value,
                                                        name=f"update_{which}_cache_{layer}")
        return mb.slice_by_index(x=self.values[which], begin=[layer, 0, 0, 0],
                                 end=[layer + 1, hk, self.n_ctx, d])  # (1, Hk, C, d)


class CoreMLLowering:
    """The op vocabulary over MIL; matrices are memoized by name (a tied head reuses the embedding's const)."""

    def __init__(self, spec, W: L.Weights, ctx: dict, cache: CacheWriter):
        self.spec, self.W, self.ctx, self.cache = spec, W, ctx, cache
        self._matrices: dict[str, object] = {}

    def _matrix(self, name: str):
        if name not in self._matrices:
            self._matrices[name] = self.W.matrix(name)
        return self._matrices[name]

    def _vector(self, name: str | None):
        return None if name is None else self.W.vector(name)

    def embed(self, table: str, scale: float | None = None):
        x = mb.gather(x=self._matrix(table), indices=self.ctx["input_ids"], axis=0)  # (1, T, hidden)
        return x if scale is None else mb.mul(x=x, y=L.FP16(scale))

    def rms_norm(self, x, weight: str):
        return L.rms_norm(x, self.W.vector(weight), self.spec.norm_eps)

    def layer_norm(self, x, weight: str, bias: str):
        return L.layer_norm(x, self.W.vector(weight), self.W.vector(bias), self.spec.norm_eps)

    def linear(self, x, weight: str, bias: str | None = None):
        return L.linear(x, self._matrix(weight), self._vector(bias))

    def split_linear(self, x, weight: str, parts: int):
        return tuple(mb.split(x=self.linear(x, weight), num_splits=parts, axis=-1))

    def act(self, x, kind: str, limit: float | None = None):
        if kind == "gegelu":  # x = [a | b]: quick_gelu(min(a, limit)) * (clip(b, +-limit) + 1)
            a, b = mb.split(x=x, num_splits=2, axis=-1)
            a = mb.gelu(x=mb.minimum(x=a, y=L.FP16(limit)), mode="SIGMOID_APPROXIMATION")  # a * sigmoid(1.702 a)
            b = mb.maximum(x=mb.minimum(x=b, y=L.FP16(limit)), y=L.FP16(-limit))
            return mb.mul(x=a, y=mb.add(x=b, y=L.FP16(1.0)))
        if kind == "silu":
            return mb.silu(x=x)
        if kind == "gelu_tanh":  # gelu_new
            return mb.gelu(x=x, mode="TANH_APPROXIMATION")
        raise NotImplementedError(f"Core ML lowering: activation {kind!r}")

    def mul(self, a, b):
        return mb.mul(x=a, y=b)

    def add(self, a, b):
        return mb.add(x=a, y=b)

    def logits(self, x, weight: str, bias: str | None = None, scale: float | None = None, masked=None):
        """Phi-3-small's masked ids get float16's lowest (-65504): the program computes in float16, where
        arch.MASKED_LOGIT (float32's lowest) would become -inf."""
        y = self.linear(x, weight, bias)
        if scale is not None:
            y = mb.mul(x=y, y=L.FP16(scale))
        if masked is not None:
            ids = np.zeros(self.spec.vocab_size, bool)
            ids[list(masked)] = True
            y = mb.select(cond=ids, a=np.finfo(L.FP16).min, b=y)
        return mb.cast(x=y, dtype="fp32", name="logits")

    def attention(self, layer: int, x, qkv, bias, scale: float | None = None, block_sparse=None):
        """Projections (one fused matrix split in three, or three), rotary, cache write, grouped attention."""
        s, ctx = self.spec, self.ctx
        hd, heads, hk = s.head_dim, s.num_attention_heads, s.num_key_value_heads
        if isinstance(qkv, str):  # rows [q; k; v]
            q, k, v = mb.split(x=self.linear(x, qkv, bias), split_sizes=[heads * hd, hk * hd, hk * hd], axis=-1)
        else:
            q, k, v = (self.linear(x, w, b) for w, b in zip(qkv, bias or (None,) * 3))
        q = L.apply_rope(mb.reshape(x=q, shape=[1, -1, heads, hd]), ctx["cos"], ctx["sin"], s)  # (1,T,H,d)
        k = L.apply_rope(mb.reshape(x=k, shape=[1, -1, hk, hd]), ctx["cos"], ctx["sin"], s)  # (1,T,Hk,d)
        v = mb.reshape(x=v, shape=[1, -1, hk, hd])
        k_all = self.cache.write("k", layer, k, ctx["position"], ctx["end"])
        v_all = self.cache.write("v", layer, v, ctx["position"], ctx["end"])
        if scale is not None:  # scaled_dot_product_attention divides by sqrt(head_dim) itself
            q = mb.mul(x=q, y=L.FP16(scale * hd ** 0.5))
        mask = ctx["mask"]
        if block_sparse is not None:  # one mask for every block-sparse layer, built on first use
            if "sparse_mask" not in ctx:
                ctx["sparse_mask"] = L.block_sparse_mask(s, self.cache.n_ctx, ctx["positions"], block_sparse)
            mask = ctx["sparse_mask"]
        return L.grouped_attention(q, k_all, v_all, mask, s)


def cache_shape(spec, n_ctx: int) -> tuple[int, int, int, int]:
    return (spec.num_hidden_layers, spec.num_key_value_heads, n_ctx, spec.head_dim)


def build_program(spec, W: L.Weights, n_ctx: int, drop_cache_write_layer: int | None = None):
    """The MIL program for spec, reading weights through W (one tensor at a time)."""
    shape = cache_shape(spec, n_ctx)
    specs = [mb.TensorSpec((1, get_new_symbol()), dtype=types.int32), mb.TensorSpec((1,), dtype=types.int32),
             mb.StateTensorSpec(shape, dtype=types.fp16), mb.StateTensorSpec(shape, dtype=types.fp16)]
    family = arch.get(spec.model_type)

    @mb.program(input_specs=specs, opset_version=_ios18())
    def prog(input_ids, position, key_cache, value_cache):
        n_new = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2])  # (1,) = T
        end = mb.add(x=position, y=n_new)  # (1,)
        positions = mb.slice_by_index(x=np.arange(n_ctx, dtype=np.int32), begin=position, end=end)  # (T,)
        cos, sin = L.rope_cos_sin(spec, n_ctx, positions, end)
        ctx = {"input_ids": input_ids, "position": position, "end": end, "cos": cos, "sin": sin,
               "mask": L.attention_mask(spec, n_ctx, positions), "positions": positions}
        cache = CacheWriter(spec, n_ctx, key_cache, value_cache, drop_cache_write_layer)
        return family.forward(CoreMLLowering(spec, W, ctx, cache), spec)

    return prog


def _ios18():
    import coremltools as ct

    return ct.target.iOS18
