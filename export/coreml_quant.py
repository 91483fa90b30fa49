"""Symmetric block-wise int4 for Core ML's ``constexpr_blockwise_shift_scale`` (iOS 18 opset).

Each row of a weight (out, in) is cut into blocks of ``BLOCK`` inputs; each block gets one fp16 scale
``absmax / 7`` and its values are rounded to the nearest integer in [-7, 7] (round half to even, numpy's rint),
with no offset: ``w ≈ scale * q``.  The restricted range [-7, 7] keeps the grid symmetric around zero, as
coremltools' own ``linear_symmetric`` int4 mode does (coremltools/optimize/coreml/_quantization_passes.py).

Scales are rounded to fp16 first and the integers computed against the rounded scale, so the dequantized weight
is exactly what Core ML reconstructs at load time.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
QMAX = 7
# smallest normal fp16: a block of zeros (or of denormals) gets this scale instead of 0 or a denormal
_MIN_SCALE = np.float32(np.finfo(np.float16).tiny)


def can_quantize(shape: tuple[int, ...], block: int = BLOCK) -> bool:
    return len(shape) == 2 and shape[1] % block == 0


def quantize_int4(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w (out, in) float -> (q int8 (out, in) in [-7, 7], scale fp16 (out, in // block))."""
    if not can_quantize(w.shape, block):
        raise ValueError(f"int4 block quantization needs a 2-D weight whose input size is a multiple of {block}; "
                         f"got shape {list(w.shape)}")
    out, inp = w.shape
    blocks = np.asarray(w, dtype=np.float32).reshape(out, inp // block, block)  # (out, nb, block)
    scale = np.maximum(np.abs(blocks).max(axis=-1) / QMAX, _MIN_SCALE).astype(np.float16)  # (out, nb)
    q = np.rint(blocks / scale.astype(np.float32)[..., None])
    np.clip(q, -QMAX, QMAX, out=q)
    return q.astype(np.int8).reshape(out, inp), scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of quantize_int4 (what Core ML's constexpr computes), as float32."""
    out, inp = q.shape
    nb = scale.shape[1]
    blocks = q.reshape(out, nb, inp // nb).astype(np.float32)
    return (blocks * scale.astype(np.float32)[..., None]).reshape(out, inp)


def fake_quantize(w: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """What the int4 program computes with in place of w (tests build their dequantized reference with it)."""
    if not can_quantize(w.shape, block):
        return np.asarray(w, dtype=np.float16).astype(np.float32)
    return dequantize_int4(*quantize_int4(w, block))
