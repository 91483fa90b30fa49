"""Samplers and logits processors: plain callables that generate_step receives.

A sampler maps float32 logits (V,) to a token id; a logits processor maps (tokens so far, logits) to logits.
Order as in mlx-lm and llama.cpp: processors (repetition penalty), then temperature, then the truncations
(top-k, top-p, min-p) on the probabilities, then a draw.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def check_settings(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float | None = None, names: dict[str, str] | None = None) -> None:
    """Raise ValueError for the first bad setting, named as `names` says (the CLI passes its flags), else as
    keyword=value."""
    def bad(key: str, value, rule: str):
        shown = f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else value
        raise ValueError(f"{names[key]} {shown}: {rule}" if names and key in names else f"{key}={shown}: {rule}")

    for key, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                       ("repetition_penalty", repetition_penalty)):
        if value is None and key == "repetition_penalty":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            bad(key, value, "must be a number")
        if not math.isfinite(value):
            bad(key, value, "must be a finite number")
        if key == "top_k" and value != int(value):
            bad(key, value, "must be a whole number")
    if temperature < 0:
        bad("temperature", temperature, "must be >= 0")
    if top_k < 0:
        bad("top_k", top_k, "must be >= 0 (0 switches top-k off)")
    if not 0.0 < top_p <= 1.0:
        bad("top_p", top_p, "must be in (0, 1]")
    if not 0.0 <= min_p < 1.0:
        bad("min_p", min_p, "must be in [0, 1)")
    if repetition_penalty is not None and repetition_penalty <= 0:
        bad("repetition_penalty", repetition_penalty, "must be > 0 (1 switches it off)")


def truncated(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probabilities) that sampling draws from: softmax at `temperature`, then top-k, nucleus and min-p,
    renormalized, most likely first (edgephi/speculate.py's acceptance rule uses the same distribution)."""
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
    return idx, p / p.sum()


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """temperature 0 is greedy; top_k 0 and top_p 1 and min_p 0 switch those truncations off."""
    check_settings(temperature, top_k, top_p, min_p)
    top_k = int(top_k)
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        idx, p = truncated(logits, temperature, top_k, top_p, min_p)
        return int(idx[rng.choice(len(p), p=p)])

    return sample


def pick(tokens: Sequence[int], logits: np.ndarray, processors: Sequence, sampler: Sampler) -> tuple[int, np.ndarray]:
    """One decoding step after a forward: the processors over the logits, then the sampler; (token, logits)."""
    for proc in processors:
        logits = proc(tokens, logits)
    return sampler(logits), logits


def repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """CTRL's penalty (Keskar et al. 2019): logits of recent tokens divided by penalty if > 0, else multiplied."""
    check_settings(repetition_penalty=penalty)

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(np.asarray(tokens[-context_size:], dtype=np.int64))
        if recent.size == 0 or penalty == 1.0:
            return logits
        logits = logits.copy()
        sel = logits[recent]
        logits[recent] = np.where(sel > 0, sel / penalty, sel * penalty)
        return logits

    return process


def check_penalty(name: str, value) -> None:
    """presence_penalty and frequency_penalty: numbers in [-2, 2] (OpenAI's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not -2.0 <= value <= 2.0:
        raise ValueError(f"{name}={value!r}: must be a number in [-2, 2] (0 switches it off)")


def check_min_tokens(min_tokens, max_tokens=None) -> None:
    """min_tokens: a whole number >= 0, at most max_tokens (vLLM's rule)."""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)) or min_tokens < 0:
        raise ValueError(f"min_tokens={min_tokens!r}: must be a whole number >= 0")
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens={min_tokens}: must be <= max_tokens ({max_tokens})")


def suppress_until(ids, min_tokens: int, start: int = 0) -> LogitsProcessor:
    """`ids` (the stop tokens) cannot be drawn until min_tokens tokens follow the first `start`: vLLM's min_tokens,
    transformers' min_new_tokens, onnxruntime-genai's min_length, llama.cpp's --ignore-eos (there for the whole
    answer).  Stateless, so drafts may be judged with it."""
    check_min_tokens(min_tokens)
    ids = np.asarray(sorted(ids), dtype=np.int64)

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if len(tokens) - start >= min_tokens:
            return logits
        logits = logits.copy()
        logits[ids[ids < logits.shape[-1]]] = -np.inf
        return logits

    return process


def presence_frequency_penalty(presence: float = 0.0, frequency: float = 0.0, start: int = 0) -> LogitsProcessor:
    """OpenAI's penalties: logits[j] -= frequency × count[j] + presence × (count[j] > 0), count[j] being how often
    token j was generated so far (tokens[start:], after the prompt).  Stateless, so drafts may be judged with it."""
    check_penalty("presence_penalty", presence)
    check_penalty("frequency_penalty", frequency)

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        generated = np.asarray(tokens[start:], dtype=np.int64)
        if generated.size == 0:
            return logits
        ids, counts = np.unique(generated[generated < logits.shape[-1]], return_counts=True)
        logits = logits.copy()
        logits[ids] -= frequency * counts + presence
        return logits

    return process


def make_logits_processors(repetition_penalty_value: float | None = None,
                           repetition_context_size: int = 64, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, prompt_len: int = 0, min_tokens: int = 0,
                           stop_ids=()) -> list[LogitsProcessor]:
    """The processors for these settings (none when all are off); the OpenAI penalties count the tokens after
    prompt_len, and min_tokens holds stop_ids back for that many tokens after it."""
    check_settings(repetition_penalty=repetition_penalty_value)
    procs = []
    if repetition_penalty_value is not None and repetition_penalty_value != 1.0:
        procs.append(repetition_penalty(repetition_penalty_value, repetition_context_size))
    if presence_penalty or frequency_penalty:
        procs.append(presence_frequency_penalty(presence_penalty, frequency_penalty, prompt_len))
    if min_tokens:
        procs.append(suppress_until(stop_ids, min_tokens, start=prompt_len))
    return procs
