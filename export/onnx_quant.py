"""Blockwise 4-bit weight quantization in the layout of onnxruntime's MatMulNBits (com.microsoft).

Layout (onnxruntime docs/ContribOperators.md, MatMulNBits; packing as in
onnxruntime/python/tools/quantization/matmul_nbits_quantizer.py and MLAS's q4 kernels):

* the weight W of y = x @ W.T is (N, K) (Hugging Face's (out, in)); each row is cut into blocks of ``block``
  consecutive K elements (the last block zero-padded);
* ``B``: uint8 (N, n_blocks, block / 2); element k of a block sits in byte k // 2, the low nibble for even k;
* ``scales``: float (N * n_blocks,);
* ``zero_points`` (asymmetric only): uint8 (N * ceil(n_blocks / 2),), block b's zero point in byte b // 2, low
  nibble for even b; absent means zero point 8 (symmetric).

Dequantized value = (q - zero_point) * scale.

Rounding follows MLAS (MlasQ4BlkQuantize, onnxruntime/core/mlas/lib/q4_common.h):
* symmetric: the element of largest magnitude m maps to -8: scale = m / -8, q = clamp(round(x / scale) + 8, 0, 15)
  (using the signed extreme keeps its sign exact and gives the full range [-8, 7] on that side);
* asymmetric: the range is widened to include 0, scale = (max - min) / 15, zp = clamp(round(-min / scale), 0, 15),
  q = clamp(round(x / scale) + zp, 0, 15).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS_PER_CHUNK = 512  # rows quantized at once: bounds the temporaries to a few MB even for a 200k vocabulary


@dataclass
class Int4Weight:
    packed: np.ndarray  # uint8 (N, n_blocks, block // 2)
    scales: np.ndarray  # float32 (N, n_blocks)
    zero_points: np.ndarray | None  # uint8 (N, ceil(n_blocks / 2)) or None (symmetric)
    n: int
    k: int
    block: int


def _quantize_rows(w: np.ndarray, block: int, symmetric: bool):
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    wb = w.reshape(n, nb, block)  # (N, n_blocks, block)
    if symmetric:
        idx = np.abs(wb).argmax(axis=2)[..., None]
        extreme = np.take_along_axis(wb, idx, axis=2)[..., 0]  # signed element of largest magnitude
        scale = extreme / -8.0
        zp = np.full(scale.shape, 8.0, dtype=np.float32)
    else:
        lo = np.minimum(wb.min(axis=2), 0.0)
        hi = np.maximum(wb.max(axis=2), 0.0)
        scale = (hi - lo) / 15.0
        safe = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(-lo / safe), 0, 15)
    inv = np.where(scale == 0, 0.0, 1.0 / np.where(scale == 0, 1.0, scale)).astype(np.float32)
    q = np.clip(np.round(wb * inv[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, n_blocks, block // 2)
    return packed, scale.astype(np.float32), zp.astype(np.uint8)


def _pack_zero_points(zp: np.ndarray) -> np.ndarray:
    n, nb = zp.shape
    if nb % 2:
        zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)  # (N, ceil(n_blocks / 2))


def quantize_int4(w: np.ndarray, block: int = 32, symmetric: bool = True) -> Int4Weight:
    """Quantize an (N, K) float weight row-chunk by row-chunk."""
    if w.ndim != 2:
        raise ValueError(f"quantize_int4: expected a 2-D (out, in) weight, got shape {list(w.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"quantize_int4: block={block}; MatMulNBits needs a power of two >= 16")
    n, k = w.shape
    nb = -(-k // block)
    packed = np.empty((n, nb, block // 2), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.uint8)
    for r in range(0, n, ROWS_PER_CHUNK):
        rows = np.asarray(w[r:r + ROWS_PER_CHUNK], dtype=np.float32)
        packed[r:r + len(rows)], scales[r:r + len(rows)], zps[r:r + len(rows)] = _quantize_rows(rows, block, symmetric)
    return Int4Weight(packed, scales, None if symmetric else _pack_zero_points(zps), n, k, block)


def dequantize_int4(q: Int4Weight) -> np.ndarray:
    """The (N, K) float32 weight MatMulNBits computes with (tests build their reference from it)."""
    lo = (q.packed & 0x0F).astype(np.float32)
    hi = (q.packed >> 4).astype(np.float32)
    vals = np.empty(q.packed.shape[:2] + (q.block,), np.float32)  # (N, n_blocks, block)
    vals[..., 0::2], vals[..., 1::2] = lo, hi
    if q.zero_points is None:
        zp = np.full(q.scales.shape, 8.0, np.float32)
    else:
        both = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(q.n, -1)
        zp = both[:, :q.scales.shape[1]].astype(np.float32)
    w = (vals - zp[..., None]) * q.scales[..., None]
    return w.reshape(q.n, -1)[:, :q.k]
