"""MIL building blocks of the Core ML lowering: weights as constants, norms, rotary embedding, attention.

Everything runs in fp16 (the precision Core ML's GPU and Neural Engine compute in).  Shapes in comments use
T = tokens of this call (flexible), C = context length (the cache's size), H = query heads, Hk = KV heads,
d = head_dim, r = rotary_dim // 2.
"""
from __future__ import annotations

import logging
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from edgephi import arch
from edgephi.formats import MASK_VALUE

from .coreml_quant import BLOCK, can_quantize, quantize_int4

log = logging.getLogger(__name__)
FP16 = np.float16


def mil_name(hf_name: str) -> str:
    """MIL names are identifiers: model.layers.0.mlp.fc1.weight -> model_layers_0_mlp_fc1_weight."""
    return hf_name.replace(".", "_")


# kind -> (suffix of the const's name, suffix of where the saved program keeps it): fp16 matrices stay const ops;
# coremltools stores a constexpr op's int4 data and scales inline, as its "data" / "scale" arguments
_CONST_NAMES = {"q": ("_q", "/data"), "scale": ("_scale", "/scale"), "f16": ("", "")}


class Weights:
    """Turns checkpoint tensors into MIL constants, one tensor at a time.

    bits=4: 2-D weights become int4 data + fp16 scales (constexpr_blockwise_shift_scale); bits=16: fp16
    constants.  Vectors (norms, biases) are read now and kept in fp16 always.

    deferred=True (what the exporter uses): a matrix's constants are zero-strided placeholders of the right shape
    and dtype, so the program, its conversion and coremltools' save never hold the weights; coreml_blob.fill then
    quantizes each tensor from the checkpoint, a block of rows at a time, into the saved weight blob at the offsets
    coremltools gave the placeholders.  deferred=False puts the real values in the program (the tests' oracle:
    both must save byte-identical packages).
    """

    def __init__(self, ckpt, bits: int, deferred: bool = False):
        self.ckpt, self.bits, self.deferred = ckpt, bits, deferred
        self.fp16_fallback: list[str] = []
        # placeholders for coreml_blob.fill: where the saved program stores each one (the key of
        # coreml_blob.blob_offsets) -> (checkpoint tensor, "q" | "scale" | "f16")
        self.pending: dict[str, tuple[str, str]] = {}

    def _read(self, name: str) -> np.ndarray:
        return self.ckpt.read(name, np.float32)

    def _const(self, name: str, kind: str, val_or_shape, dtype) -> object:
        """A named const: the real value, or (deferred) a placeholder recorded in self.pending."""
        const_suffix, saved_as = _CONST_NAMES[kind]
        if self.deferred:
            val = np.broadcast_to(np.zeros((), dtype=dtype), val_or_shape)
            self.pending[mil_name(name) + saved_as] = (name, kind)
        else:
            val = val_or_shape
        return mb.const(val=val, name=mil_name(name) + const_suffix)

    def matrix(self, name: str):
        """(out, in) weight as a MIL const (int4 block-wise or fp16)."""
        shape = tuple(self.ckpt.info(name).shape)
        if self.bits == 4 and can_quantize(shape):
            if self.deferred:
                q, scale = shape, (shape[0], shape[1] // BLOCK)
            else:
                q, scale = quantize_int4(self._read(name))
                q = q.astype(types.np_int4_dtype)
            return mb.constexpr_blockwise_shift_scale(data=self._const(name, "q", q, types.np_int4_dtype),
                                                      scale=self._const(name, "scale", scale, FP16),
                                                      name=mil_name(name))
        if self.bits == 4:
            log.warning("%s: shape %s has an input size that is not a multiple of %d; kept in fp16",
                        name, list(shape), BLOCK)
            self.fp16_fallback.append(name)
        return self._const(name, "f16", shape if self.deferred else self._read(name).astype(FP16), FP16)

    def vector(self, name: str) -> np.ndarray:
        return self._read(name).astype(FP16)


# ---- small ops -------------------------------------------------------------------------------------------------
def linear(x, weight, bias=None):
    return mb.linear(x=x, weight=weight, bias=bias) if bias is not None else mb.linear(x=x, weight=weight)


def layer_norm(x, gamma: np.ndarray, beta: np.ndarray, eps: float):
    return mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=FP16(eps))


def rms_norm(x, gamma: np.ndarray, eps: float):
    """RMSNorm as a LayerNorm of [x, -x]: that concatenation has mean 0, so its variance is mean(x²).

    Core ML's fused layer_norm accumulates in higher precision, where a hand-written mean(x*x) in fp16 would
    overflow once |x| passes 256 (the trick Apple's ml-ane-transformers and coremltools' torch frontend use).
    """
    n = gamma.shape[0]
    doubled = mb.concat(values=[x, mb.mul(x=x, y=FP16(-1.0))], axis=-1)  # (1, T, 2n)
    normed = mb.layer_norm(x=doubled, axes=[-1], epsilon=FP16(eps))
    half = mb.slice_by_index(x=normed, begin=[0, 0, 0], end=[0, 0, n], end_mask=[True, True, False])
    return mb.mul(x=half, y=gamma)


def last_dim_slice(x, start: int, stop: int | None):
    """x[..., start:stop] for a rank-4 tensor (stop None = to the end)."""
    return mb.slice_by_index(x=x, begin=[0, 0, 0, start], end=[0, 0, 0, stop or 0],
                             end_mask=[True, True, True, stop is None])


# ---- rotary embedding ------------------------------------------------------------------------------------------
def rope_tables(spec, n_ctx: int, long: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (C, r) in fp16, with LongRoPE's attention factor folded in (edgephi.arch.rope_tables)."""
    cos, sin = arch.rope_tables(spec, n_ctx, long=long)
    return cos.astype(FP16), sin.astype(FP16)


def rope_cos_sin(spec, n_ctx: int, positions, end):
    """cos, sin for this call's positions: (1, T, 1, r).

    LongRoPE (Phi-3 128k, Phi-4-mini) uses the long factors for every position of a call once the sequence
    length (end = last position + 1) passes original_max_position_embeddings, as transformers'
    longrope_frequency_update does; keys cached earlier keep the rotation they were stored with.
    """
    cos_s, sin_s = rope_tables(spec, n_ctx, long=False)
    cos = mb.gather(x=cos_s, indices=positions, axis=0)  # (T, r)
    sin = mb.gather(x=sin_s, indices=positions, axis=0)
    if spec.rope_scaling is not None:
        cos_l, sin_l = rope_tables(spec, n_ctx, long=True)
        use_long = mb.greater(x=end, y=np.int32(spec.rope_scaling.original_max_position_embeddings))  # (1,)
        cos = mb.select(cond=use_long, a=mb.gather(x=cos_l, indices=positions, axis=0), b=cos)
        sin = mb.select(cond=use_long, a=mb.gather(x=sin_l, indices=positions, axis=0), b=sin)
    r = spec.rotary_dim // 2
    return mb.reshape(x=cos, shape=[1, -1, 1, r]), mb.reshape(x=sin, shape=[1, -1, 1, r])


def apply_rope(x, cos, sin, spec):
    """transformers' rotate_half on the first rotary_dim channels of each head; x (1, T, heads, d)."""
    r, d = spec.rotary_dim // 2, spec.head_dim
    x1, x2 = last_dim_slice(x, 0, r), last_dim_slice(x, r, 2 * r)
    parts = [mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin)),
             mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))]
    if 2 * r < d:
        parts.append(last_dim_slice(x, 2 * r, None))
    return mb.concat(values=parts, axis=-1)


# ---- attention -------------------------------------------------------------------------------------------------
def attention_mask(spec, n_ctx: int, positions):
    """Additive mask (n_rep*T, C): query at p sees cache slots k <= p (and k > p - window with a window).

    Slots past the last position of this call hold stale keys after a rewind; k <= p masks them out.
    """
    q_pos = mb.reshape(x=positions, shape=[-1, 1])  # (T, 1)
    k_idx = np.arange(n_ctx, dtype=np.int32)[None, :]  # (1, C)
    allowed = mb.less_equal(x=k_idx, y=q_pos)  # (T, C)
    window = spec.effective_sliding_window
    if window is not None:
        allowed = mb.logical_and(x=allowed, y=mb.greater(x=k_idx, y=mb.sub(x=q_pos, y=np.int32(window))))
    # (1 - allowed) * MASK_VALUE: coremltools 9.0's select takes its result shape from a and b only, not cond
    blocked = mb.sub(x=FP16(1.0), y=mb.cast(x=allowed, dtype="fp16"))
    mask = mb.mul(x=blocked, y=FP16(MASK_VALUE))  # (T, C)
    if spec.n_rep > 1:
        mask = mb.tile(x=mask, reps=[spec.n_rep, 1])  # (n_rep*T, C), rows ordered (rep, t) like the queries
    return mask


def block_sparse_mask(spec, n_ctx: int, positions, bs):
    """Additive mask of a block-sparse layer (edgephi.arch.BlockSparse): (Hk, n_rep*T, C) with a pattern per
    head, rows ordered as grouped_attention stacks the queries; (n_rep*T, C) for homogeneous heads.

    Two gathers from a block-level table (heads, blocks, blocks), by the queries' blocks then by every slot's
    block, times the causal mask: no per-token table of C x C is stored."""
    n_blocks = -(-n_ctx // bs.block_size)
    table = bs.block_table(spec.num_attention_heads, n_blocks).astype(FP16)  # (heads or 1, nb, nb)
    block_of = np.arange(n_ctx, dtype=np.int32) // bs.block_size  # (C,)
    rows = mb.gather(x=table, indices=mb.gather(x=block_of, indices=positions, axis=0), axis=1)  # (h, T, nb)
    sparse = mb.gather(x=rows, indices=block_of, axis=2)  # (h, T, C)
    causal = mb.less_equal(x=np.arange(n_ctx, dtype=np.int32)[None, :], y=mb.reshape(x=positions, shape=[-1, 1]))
    allowed = mb.mul(x=sparse, y=mb.cast(x=causal, dtype="fp16"))  # (h, T, C)
    mask = mb.mul(x=mb.sub(x=FP16(1.0), y=allowed), y=FP16(MASK_VALUE))
    if bs.heads(spec.num_attention_heads) == 1:
        mask = mb.reshape(x=mask, shape=[-1, n_ctx])  # (T, C)
        return mb.tile(x=mask, reps=[spec.n_rep, 1]) if spec.n_rep > 1 else mask
    return mb.reshape(x=mask, shape=[spec.num_key_value_heads, -1, n_ctx])  # head j*rep + i -> [j, i*T + t]


def grouped_attention(q, k_all, v_all, mask, spec):
    """q (1, T, H, d); k_all, v_all (1, Hk, C, d) -> (1, T, H*d).

    Grouped heads without copying the cache: the n_rep query heads that share KV head j are stacked along the
    sequence axis, (1, Hk, n_rep*T, d), so one attention call per KV head serves them all (query head
    h = j*n_rep + i uses KV head j, as transformers' repeat_kv).
    """
    hk, rep, d = spec.num_key_value_heads, spec.n_rep, spec.head_dim
    q = mb.reshape(x=q, shape=[1, -1, hk, rep, d])  # (1, T, Hk, rep, d)
    q = mb.transpose(x=q, perm=[0, 2, 3, 1, 4])  # (1, Hk, rep, T, d)
    q = mb.reshape(x=q, shape=[1, hk, -1, d])  # (1, Hk, rep*T, d)
    o = mb.scaled_dot_product_attention(query=q, key=k_all, value=v_all, attn_mask=mask)  # (1, Hk, rep*T, d)
    o = mb.reshape(x=o, shape=[1, hk, rep, -1, d])  # (1, Hk, rep, T, d)
    o = mb.transpose(x=o, perm=[0, 3, 1, 2, 4])  # (1, T, Hk, rep, d)
    return mb.reshape(x=o, shape=[1, -1, hk * rep * d])  # (1, T, H*d)
