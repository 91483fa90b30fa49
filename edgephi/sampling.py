"""Samplers and logits processors: plain callables that generate_step receives.

A sampler maps float32 logits (V,) to a token id; a logits processor maps (tokens so far, logits) to logits.
Order as in mlx-lm and llama.cpp: processors (repetition penalty), then temperature, then the truncations
(top-k, top-p, min-p) on the probabilities, then a draw.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """temperature 0 is greedy; top_k 0 and top_p 1 and min_p 0 switch those truncations off."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p={min_p}: must be in [0, 1)")
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / temperature
        idx = np.arange(z.shape[-1])
        if top_k and top_k < z.shape[-1]:
            idx = np.argpartition(-z, top_k - 1)[:top_k]
            z = z[idx]
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        idx, p = idx[order], p[order]
        keep = np.ones(p.shape, dtype=bool)
        if top_p < 1.0:  # nucleus (Holtzman et al. 2019): the smallest prefix whose mass reaches top_p
            keep &= (np.cumsum(p) - p) < top_p
        if min_p > 0.0:  # min-p (Nguyen et al. 2024): drop tokens below min_p × the top probability
            keep &= p >= min_p * p[0]
        idx, p = idx[keep], p[keep]
        return int(idx[rng.choice(len(p), p=p / p.sum())])

    return sample


def repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """CTRL's penalty (Keskar et al. 2019): logits of recent tokens divided by penalty if > 0, else multiplied."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty}: must be > 0")

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(np.asarray(tokens[-context_size:], dtype=np.int64))
        if recent.size == 0 or penalty == 1.0:
            return logits
        logits = logits.copy()
        sel = logits[recent]
        logits[recent] = np.where(sel > 0, sel / penalty, sel * penalty)
        return logits

    return process


def make_logits_processors(repetition_penalty_value: float | None = None,
                           repetition_context_size: int = 64) -> list[LogitsProcessor]:
    if repetition_penalty_value is None or repetition_penalty_value == 1.0:
        return []
    return [repetition_penalty(repetition_penalty_value, repetition_context_size)]
