"""A bounded KV cache for sliding-window models on the ONNX backend (option kv_ring): memory stops growing at the
window instead of the context.

GroupQueryAttention writes a new token's key and value at buffer index past_length and rotates it by that index
(do_rotary), so the buffer cannot wrap around.  Instead the buffer holds capacity = window + slack positions, and
when a forward would run past its end, the newest `window - 1 + reserve` positions are moved to its start and
their keys rotated back by the shift D (RoPE is a rotation by position × inv_freq: R(-D) R(p) = R(p - D)); the
session then feeds index-based lengths (true position - offset).  Scores depend only on position differences, so
the result equals the full cache's (to float32 rounding of the rotation), and the window mask (query index i sees
i - W < j <= i) is unchanged.  A shift moves (window + reserve) positions of every layer once per ~slack tokens.

Only for plain RoPE: LongRoPE's ONNX graph picks its factors from the total length, which the ring would change
(no Phi model has both a sliding window and LongRoPE).  rewind(n) continues exactly while the keys position n
sees are still held (reusable); the speculative loop rewinds at most 17 tokens, inside `reserve`.
"""
from __future__ import annotations

import numpy as np

DEFAULT_SLACK = 512  # positions beyond the window: one shift per ~slack - reserve tokens
RESERVE = 32  # positions kept beyond the window at a shift, for rewinds


class ShiftRing:
    def __init__(self, window: int, slack: int, inv_freq, rotary_dim: int):
        self.window, self.slack = int(window), int(slack)
        self.reserve = min(RESERVE, self.slack // 2)
        self.capacity = self.window + self.slack
        self.inv_freq = np.asarray(inv_freq, np.float64)  # (rotary_dim / 2,)
        self.half = rotary_dim // 2
        self.offset = 0  # true position of buffer index 0
        self.shifts = 0

    def max_piece(self) -> int:
        """Longest forward that fits after a shift."""
        return self.capacity - (self.window - 1 + self.reserve)

    def reusable(self, n: int) -> int:
        return n if n == 0 or max(0, n - self.window + 1) >= self.offset else 0

    def make_room(self, n_past: int, t: int, buffers: list[np.ndarray], scales=None) -> None:
        """Before evaluating t tokens at n_past: shift so that index n_past - offset + t fits the capacity.
        buffers: each layer's key then value, (1, n_kv, capacity, hd) views of the session's cache; scales: an int8
        cache's per-channel scales (onnx_int8.py), keys rotated in float and quantized again."""
        used = n_past - self.offset
        if used + t <= self.capacity:
            return
        keep = min(used, self.window - 1 + self.reserve)
        d = used - keep
        angle = -d * self.inv_freq
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        h = self.half
        for i, buf in enumerate(buffers):
            src = buf[:, :, d:d + keep]
            if i % 2 == 0:  # keys: rotate by -d on the rotary dims (non-interleaved halves, as do_rotary)
                sc = scales[i].reshape(1, buf.shape[1], 1, buf.shape[3]) if scales is not None else None
                src = src * sc if sc is not None else src
                x1, x2 = src[..., :h].copy(), src[..., h:2 * h].copy()
                moved = src.copy()
                moved[..., :h] = x1 * cos - x2 * sin
                moved[..., h:2 * h] = x2 * cos + x1 * sin
                if sc is not None:  # (a key pair's scales are equal: a rotation keeps it in range)
                    moved = np.clip(np.rint(moved / sc), -127, 127).astype(np.int8)
            else:
                moved = src.copy()
            buf[:, :, :keep] = moved
        self.offset += d
        self.shifts += 1

    def after_rewind(self, n: int) -> None:
        if self.reusable(n) != n:
            raise ValueError(f"rewind({n}): the ring buffer no longer holds the keys position {n} sees "
                             f"(it starts at {self.offset}); rewind to 0 and evaluate again")
        if n == 0:
            self.offset = 0


def ring_for(spec, kv_ring) -> ShiftRing | None:
    """The ring for option kv_ring (True, or the slack in positions) of a model `spec`; None when it has no
    sliding window (nothing to bound)."""
    if not kv_ring:
        return None
    if isinstance(kv_ring, bool):
        slack = DEFAULT_SLACK
    elif isinstance(kv_ring, int) and kv_ring >= 2:
        slack = kv_ring
    else:
        raise ValueError(f"kv_ring={kv_ring!r}: True, or the positions to hold beyond the window (>= 2)")
    window = getattr(spec, "effective_sliding_window", None) if spec is not None else None
    if window is None:
        return None
    if spec.rope_scaling is not None:
        raise ValueError("kv_ring: the onnx backend's ring buffer needs plain RoPE (LongRoPE's graph picks its "
                         "factors from the total length)")
    return ShiftRing(window, slack, spec.rope_inv_freq(), spec.rotary_dim)
