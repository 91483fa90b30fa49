"""Token generation as a generator: one token at a time over any backend's Session (KV cache inside)."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .backends.base import ContextFullError, Session
from .sampling import LogitsProcessor, Sampler, greedy, pick


@dataclass
class GenerationResponse:
    text: str  # the new text of this step (may be "" while a UTF-8 sequence is incomplete)
    token: int | None
    prompt_tokens: int  # tokens evaluated for the prompt (after cache reuse)
    generation_tokens: int
    ttft: float  # seconds from the call to the first token
    prompt_tps: float
    generation_tps: float
    peak_rss_mb: float
    finish_reason: str | None = None  # "stop", "length", "context" or None while generating
    drafted_tokens: int = 0  # speculative decoding: draft tokens verified so far (edgephi/speculate.py)
    accepted_tokens: int = 0  # of those, accepted
    reasoning: str = ""  # Model.chat: the part of this step's text inside the <think> block (edgephi/reasoning.py)


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


_RSS = [0.0, -1.0]  # last peak RSS read and when: per-token responses reuse it for RSS_EVERY seconds
RSS_EVERY = 0.25  # getrusage sums over every thread: measured 3 ms a call beside onnxruntime's pool


def _peak_rss_throttled(now: float, final: bool) -> float:
    if final or now - _RSS[1] > RSS_EVERY:
        _RSS[0], _RSS[1] = peak_rss_mb(), now
    return _RSS[0]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_max_tokens(max_tokens) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}: must be a whole number >= 1")


def generate_step(prompt: Sequence[int], session: Session, sampler: Sampler = greedy,
                  logits_processors: Sequence[LogitsProcessor] = (), max_tokens: int = 256,
                  history: Sequence[int] = (), speculator=None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, logits) pairs.  `prompt` is evaluated after `history`, which the caller says is cached.

    The generator owns the cache while it runs: on exit the cache holds history + prompt + every yielded token
    but the last (which was never evaluated); with a speculator (edgephi/speculate.py: drafts verified in one
    forward) it may also hold accepted tokens that were not yielded yet.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    check_max_tokens(max_tokens)
    session.check_room(len(prompt))
    if speculator is not None:
        yield from speculator.run(prompt, session, sampler, logits_processors, max_tokens, history)
        return
    tokens = list(history) + list(prompt)
    logits = session.forward(prompt)
    n = 0
    while True:
        tok, logits = pick(tokens, logits, logits_processors, sampler)
        yield tok, logits
        tokens.append(tok)
        n += 1
        if n >= max_tokens or session.n_past + 1 > session.n_ctx:
            return
        logits = session.forward([tok])


def stream(session: Session, tokenizer, prompt_ids: Sequence[int], *, sampler: Sampler = greedy,
           logits_processors: Sequence[LogitsProcessor] = (), max_tokens: int = 256,
           stop_ids: frozenset[int] | set[int] = frozenset(), stop_strings: Sequence[str] = (),
           cached: Sequence[int] = (), speculator=None) -> Iterator[GenerationResponse]:
    """Stream decoded text.  `cached` is what the session's cache holds; the common prefix is reused."""
    check_max_tokens(max_tokens)
    start = time.perf_counter()
    keep = common_prefix(cached, prompt_ids)
    if keep == len(prompt_ids):  # something must be evaluated to get logits
        keep -= 1
    keep = session.reusable(keep)  # a ring buffer may no longer hold what position `keep` sees
    session.rewind(keep)
    new = list(prompt_ids[keep:])
    if session.n_past + len(new) > session.n_ctx:
        raise ContextFullError(f"context full: the prompt needs {len(prompt_ids)} tokens but the context holds "
                               f"{session.n_ctx}")
    detok = tokenizer.detokenizer(skip_special_tokens=True)
    text_so_far, emitted = "", 0  # emitted: the characters of text_so_far yielded so far
    n_gen, t_first, prompt_tps = 0, None, 0.0
    finish = "length"
    stats = speculator.stats if speculator is not None else None
    for tok, _ in generate_step(new, session, sampler, logits_processors, max_tokens, history=prompt_ids[:keep],
                                speculator=speculator):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            prompt_tps = len(new) / max(now - start, 1e-9)
        if tok in stop_ids:
            finish = "stop"
            break
        n_gen += 1
        text_so_far += detok.add(tok)
        hits = [i for i in (text_so_far.find(s, max(0, emitted - len(s))) for s in stop_strings) if i >= 0]
        if hits:  # emit up to the (earliest) stop string, not past it
            finish = "stop"
            cut = max(emitted, min(hits))
            yield _response(text_so_far[emitted:cut], tok, len(new), n_gen, start, t_first, prompt_tps, None, stats)
            break
        end = len(text_so_far) - _held(text_so_far, stop_strings)  # a stop string's beginning waits for its end
        yield _response(text_so_far[emitted:end], tok, len(new), n_gen, start, t_first, prompt_tps, None, stats)
        emitted = end
    else:
        if n_gen < max_tokens:
            finish = "context"
    tail = text_so_far[emitted:] + detok.flush() if finish != "stop" else ""
    yield _response(tail, None, len(new), n_gen, start, t_first or time.perf_counter(), prompt_tps, finish, stats)


def _held(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins a stop string (held back until it is decided)."""
    return max((k for s in stop_strings for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


def _response(text, tok, n_prompt, n_gen, start, t_first, prompt_tps, finish, stats=None) -> GenerationResponse:
    now = time.perf_counter()
    gen_time = now - t_first
    return GenerationResponse(text=text, token=tok, prompt_tokens=n_prompt, generation_tokens=n_gen,
                              ttft=t_first - start, prompt_tps=prompt_tps,
                              generation_tps=(n_gen - 1) / gen_time if n_gen > 1 and gen_time > 0 else 0.0,
                              peak_rss_mb=_peak_rss_throttled(now, finish is not None), finish_reason=finish,
                              drafted_tokens=stats.drafted if stats else 0,
                              accepted_tokens=stats.accepted if stats else 0)
