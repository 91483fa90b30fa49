"""The whole Phi decoder as one stateful MIL program (iOS 18 / macOS 15 opset), built from PhiSpec + tensor stream.

Interface of the program:
  inputs   input_ids (1, T) int32, T in 1..context;  position (1,) int32 = index of input_ids[0] in the sequence
  states   key_cache, value_cache (layers, kv_heads, context, head_dim) fp16, preallocated
  output   logits (1, T, vocab) fp32

Each state is read ONCE; every layer writes its new keys/values with slice_update + coreml_update_state and the
value that coreml_update_state returns is threaded to the next layer.  Reading the state again per layer lets
coremltools 9.0's remove_redundant_ops pass merge the reads across a write and silently drop a layer's update
(coremltools PR #2786).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types

from . import coreml_layers as L

# Block layouts: model_type -> the function that adds one decoder layer (registry, not if/elif).
BLOCKS: dict[str, Callable] = {}


def block(model_type: str):
    def deco(fn):
        BLOCKS[model_type] = fn
        return fn

    return deco


class CacheWriter:
    """Threads the key/value cache values through the layers (read once, update per layer)."""

    def __init__(self, spec, context: int, k_state, v_state, drop_layer: int | None = None):
        self.spec, self.context, self.drop_layer = spec, context, drop_layer
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
                                 end=[layer + 1, hk, self.context, d])  # (1, Hk, C, d)


def _attend(spec, ctx, layer, q, k, v, cache):
    """q (1,T,H*d), k and v (1,T,Hk*d) -> attention output (1, T, H*d) over the cache."""
    hd, heads, hk = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    q = L.apply_rope(mb.reshape(x=q, shape=[1, -1, heads, hd]), ctx["cos"], ctx["sin"], spec)  # (1,T,H,d)
    k = L.apply_rope(mb.reshape(x=k, shape=[1, -1, hk, hd]), ctx["cos"], ctx["sin"], spec)  # (1,T,Hk,d)
    v = mb.reshape(x=v, shape=[1, -1, hk, hd])
    k_all = cache.write("k", layer, k, ctx["position"], ctx["end"])
    v_all = cache.write("v", layer, v, ctx["position"], ctx["end"])
    return L.grouped_attention(q, k_all, v_all, ctx["mask"], spec)


@block("phi")
def phi_layer(spec, W: L.Weights, i: int, x, ctx, cache):
    """Phi-1/1.5/2: h = LN(x); x + dense(attn(h)) + fc2(gelu(fc1(h)))  (attention and MLP in parallel)."""
    p = f"model.layers.{i}."
    h = L.layer_norm(x, W.vector(p + "input_layernorm.weight"), W.vector(p + "input_layernorm.bias"), spec.norm_eps)
    proj = {n: L.linear(h, W.matrix(p + f"self_attn.{n}_proj.weight"), W.vector(p + f"self_attn.{n}_proj.bias"))
            for n in ("q", "k", "v")}
    att = _attend(spec, ctx, i, proj["q"], proj["k"], proj["v"], cache)
    att = L.linear(att, W.matrix(p + "self_attn.dense.weight"), W.vector(p + "self_attn.dense.bias"))
    m = L.linear(h, W.matrix(p + "mlp.fc1.weight"), W.vector(p + "mlp.fc1.bias"))
    m = mb.gelu(x=m, mode="TANH_APPROXIMATION")  # gelu_new
    m = L.linear(m, W.matrix(p + "mlp.fc2.weight"), W.vector(p + "mlp.fc2.bias"))
    return mb.add(x=x, y=mb.add(x=att, y=m))


@block("phi3")
def phi3_layer(spec, W: L.Weights, i: int, x, ctx, cache):
    """Phi-3 family: x += o_proj(attn(RMS(x))); x += down(silu(gate) * up) with fused qkv and gate_up."""
    p = f"model.layers.{i}."
    q_dim, kv = spec.num_attention_heads * spec.head_dim, spec.kv_dim
    h = L.rms_norm(x, W.vector(p + "input_layernorm.weight"), spec.norm_eps)
    qkv = L.linear(h, W.matrix(p + "self_attn.qkv_proj.weight"))  # (1, T, q + 2kv): rows are [q; k; v]
    q, k, v = mb.split(x=qkv, split_sizes=[q_dim, kv, kv], axis=-1)
    att = _attend(spec, ctx, i, q, k, v, cache)
    x = mb.add(x=x, y=L.linear(att, W.matrix(p + "self_attn.o_proj.weight")))
    h = L.rms_norm(x, W.vector(p + "post_attention_layernorm.weight"), spec.norm_eps)
    gate, up = mb.split(x=L.linear(h, W.matrix(p + "mlp.gate_up_proj.weight")), num_splits=2, axis=-1)  # [gate; up]
    m = mb.mul(x=mb.silu(x=gate), y=up)
    return mb.add(x=x, y=L.linear(m, W.matrix(p + "mlp.down_proj.weight")))


def _head(spec, W: L.Weights, x, embed):
    """Final norm + lm_head; tied checkpoints reuse the embedding constant."""
    if spec.is_phi3:
        x = L.rms_norm(x, W.vector("model.norm.weight"), spec.norm_eps)
        weight = embed if spec.tie_word_embeddings else W.matrix("lm_head.weight")
        return L.linear(x, weight)
    x = L.layer_norm(x, W.vector("model.final_layernorm.weight"), W.vector("model.final_layernorm.bias"),
                     spec.norm_eps)
    return L.linear(x, W.matrix("lm_head.weight"), W.vector("lm_head.bias"))


def cache_shape(spec, context: int) -> tuple[int, int, int, int]:
    return (spec.num_hidden_layers, spec.num_key_value_heads, context, spec.head_dim)


def build_program(spec, W: L.Weights, context: int, drop_cache_write_layer: int | None = None):
    """The MIL program for spec, reading weights through W (one tensor at a time)."""
    if spec.model_type not in BLOCKS:
        raise NotImplementedError(f"Core ML export: model_type {spec.model_type!r} has no block builder; "
                                  f"available: {', '.join(sorted(BLOCKS))}")
    layer_fn = BLOCKS[spec.model_type]
    shape = cache_shape(spec, context)
    specs = [mb.TensorSpec((1, get_new_symbol()), dtype=types.int32), mb.TensorSpec((1,), dtype=types.int32),
             mb.StateTensorSpec(shape, dtype=types.fp16), mb.StateTensorSpec(shape, dtype=types.fp16)]

    @mb.program(input_specs=specs, opset_version=_ios18())
    def prog(input_ids, position, key_cache, value_cache):
        n_new = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2])  # (1,) = T
        end = mb.add(x=position, y=n_new)  # (1,)
        positions = mb.slice_by_index(x=np.arange(context, dtype=np.int32), begin=position, end=end)  # (T,)
        cos, sin = L.rope_cos_sin(spec, context, positions, end)
        ctx = {"position": position, "end": end, "cos": cos, "sin": sin,
               "mask": L.attention_mask(spec, context, positions)}
        embed = W.matrix("model.embed_tokens.weight")
        x = mb.gather(x=embed, indices=input_ids, axis=0)  # (1, T, hidden)
        cache = CacheWriter(spec, context, key_cache, value_cache, drop_cache_write_layer)
        for i in range(spec.num_hidden_layers):
            x = layer_fn(spec, W, i, x, ctx, cache)
        logits = _head(spec, W, x, embed)
        return mb.cast(x=logits, dtype="fp32", name="logits")

    return prog


def _ios18():
    import coremltools as ct

    return ct.target.iOS18
