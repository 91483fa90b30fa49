"""Where speculative drafts come from: prompt lookup (n-grams of the prompt and the text so far) or a draft model.

A drafter proposes up to k tokens that continue `tokens`; edgephi/speculate.py verifies them with the target model
in one forward.  propose() returns (drafts, q): q is None when the drafts are deterministic (prompt lookup, or a
greedy draft model), else (len(drafts), V) float64 probabilities each draft was sampled from (the q of
speculative sampling).

Draft length adapts to the acceptance rate (AdaptiveK): all accepted → doubled (at least +2), else the accepted
count + 1, and after a round where nothing was accepted drafting pauses for a number of tokens that doubles with
each such round (reset on the next acceptance), so text where drafts miss runs at plain decoding's speed.  The
length is then capped where the expected tokens per second peak, from the measured time of the target's forwards
by their token count (a CPU verifies a long draft at prefill speed: past a few tokens a longer draft costs more
than it can save) and the acceptance rate so far.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class AdaptiveK:
    """Draft length from the acceptance so far."""

    def __init__(self, k: int = 4, k_max: int = 16, pause_max: int = 32):
        self.k, self.k_max, self.pause_max = min(k, k_max), k_max, pause_max
        self._pause = 0  # tokens to decode without drafting
        self._backoff = 1
        self.cost: dict[int, float] = {}  # forward of n tokens -> seconds (moving average)
        self.rate = 0.8  # acceptance per draft token (moving average)
        self._curve: np.ndarray | None = None  # _costs() from cost, rebuilt after an observation

    def observe(self, n_tokens: int, seconds: float) -> None:
        old = self.cost.get(n_tokens)
        self.cost[n_tokens] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self._curve = None

    def _costs(self, n: int) -> np.ndarray:
        """Estimated seconds of a forward of 1 .. n tokens: measured, else a line through the nearest measured ones
        (np.interp; flat beyond them until a longer call is measured: optimistic, so that longer drafts get tried)."""
        if self._curve is None or len(self._curve) < n:
            xs = sorted(self.cost)
            self._curve = np.interp(np.arange(1, max(n, self.k_max + 1) + 1), xs, [self.cost[x] for x in xs])
        return self._curve[:n]

    def best_k(self, k: int) -> int:
        """The draft length <= k with the most expected tokens per second of verifying."""
        if 1 not in self.cost:
            return k
        if k < 1:
            return 0
        p = min(self.rate, 0.999)
        j = np.arange(1, k + 1)  # expected tokens of a round with j drafts / its forward's seconds
        speed = (1 - p ** (j + 1)) / (1 - p) / self._costs(k + 1)[1:]
        return int(np.argmax(speed)) + 1

    def next_k(self) -> int:
        if self._pause > 0 or (self.cost and 1 not in self.cost):  # (one plain step measures a single token)
            self._pause = max(0, self._pause - 1)
            return 0
        return self.best_k(self.k)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.rate = 0.8 * self.rate + 0.2 * accepted / drafted
        if accepted == drafted:
            self.k = min(self.k_max, max(self.k + 2, 2 * self.k))  # a run of hits reaches k_max in a few rounds
        else:
            self.k = max(1, accepted + 1)
        if accepted == 0:
            self._pause = self._backoff
            self._backoff = min(self.pause_max, self._backoff * 2)
        else:
            self._backoff = 1


class NgramDrafter:
    """Prompt lookup decoding (Saxena 2023; llama.cpp's lookup, transformers' prompt_lookup_num_tokens): find the
    latest earlier occurrence of the last n tokens (n = max_ngram .. min_ngram) and propose what followed it.

    min_ngram is 2: a single matching token predicts poorly (on the built-in model's tasks, 1-gram drafts cut the
    acceptance of a repeating answer from ~60% to ~35%, and each missed round pauses drafting).  A match that
    ends near the end of the text (a loop of period p) is copied with overlap, as LZ77 does, so a loop drafts k
    tokens, not p."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram sizes {min_ngram}..{max_ngram}: need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, latest occurrence
        self._indexed = 0  # n-grams ending before this index are in _index
        self._tokens: list[int] = []

    def _add_until(self, tokens: Sequence[int], end: int) -> None:
        """Index the n-grams ending at positions _indexed .. end - 1."""
        for i in range(self._indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i - n + 1 >= 0:
                    self._index[tuple(tokens[i - n + 1:i + 1])] = i
        self._indexed = max(self._indexed, end)

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        if k <= 0 or len(tokens) < 2:
            return [], None
        if len(tokens) < self._indexed or self._tokens[:64] != list(tokens[:64]):  # another sequence: start over
            self._index, self._indexed = {}, 0
        self._tokens = list(tokens[:64])
        last = len(tokens) - 1
        self._add_until(tokens, last)  # never the suffix itself: it would match its own end
        for n in range(min(self.max_ngram, last), self.min_ngram - 1, -1):
            j = self._index.get(tuple(tokens[last - n + 1:]))
            if j is not None:  # what followed; a match near the end repeats with its period (an overlapping copy)
                out = list(tokens[j + 1:j + 1 + k])
                while len(out) < k:
                    out.append(out[len(out) - (last - j)])
                return out, None
        return [], None

    def close(self) -> None:
        pass


class ReplayDrafter:
    """Drafts from a known continuation (a previous greedy run), each draft replaced by another token with
    probability `miss`: speculation at a set acceptance rate, for benchmarks and tests.  Drafts nothing once the
    text departs from the reference."""

    name = "ngram"  # deterministic drafts (q is a point mass), like prompt lookup

    def __init__(self, prefix_len: int, reference: Sequence[int], miss: float = 0.0, seed: int = 0,
                 vocab: int = 32000):
        self.prefix_len, self.reference, self.miss = prefix_len, list(reference), miss
        self.rng, self.vocab = np.random.default_rng(seed), vocab

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], None]:
        i = len(tokens) - self.prefix_len
        if k <= 0 or i < 0 or list(tokens[self.prefix_len:]) != self.reference[:i]:
            return [], None
        out = []
        for tok in self.reference[i:i + k]:
            if self.rng.random() < self.miss:
                tok = (tok + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab  # any other token
            out.append(tok)
        return out, None

    def close(self) -> None:
        pass


def tokenizer_difference(target, draft) -> str | None:
    """Why `draft`'s tokenizer cannot draft for `target`'s (None if they map every id to the same token)."""
    if target.vocab_size != draft.vocab_size:
        return f"vocabulary sizes differ: the draft's tokenizer has {draft.vocab_size} tokens, the target's " \
               f"{target.vocab_size}"
    for i in range(target.vocab_size):
        a, b = target.id_to_token(i), draft.id_to_token(i)
        if a != b:
            return f"token id {i} is {b!r} in the draft's tokenizer and {a!r} in the target's"
    if target.special_ids != draft.special_ids:
        diff = sorted(target.special_ids ^ draft.special_ids)
        return f"special tokens differ (ids {diff[:5]})"
    return None


class ModelDrafter:
    """A smaller model with the same vocabulary (a second Session) proposes tokens one at a time; its cache follows
    the target's tokens (common prefix kept, the rest evaluated)."""

    name = "model"

    def __init__(self, session, vocab_size: int, no_cross: int | None = None, holder=None):
        self.session, self.vocab = session, vocab_size
        self.no_cross = no_cross  # the draft's own LongRoPE switch: its catch-up forward is split there
        self.holder = holder  # the draft's edgephi Model: its _cached records the draft cache across calls
        self._cached: list[int] = []

    @property
    def cached(self) -> list[int]:
        return self.holder._cached if self.holder is not None else self._cached

    @cached.setter
    def cached(self, value: list[int]) -> None:
        if self.holder is not None:
            self.holder._cached = value
        else:
            self._cached = value

    def propose(self, tokens: Sequence[int], k: int, probs=None, rng=None) -> tuple[list[int], np.ndarray | None]:
        """k drafts; greedy when probs is None, else sampled from probs(logits) with rng (q returned)."""
        from .generate import common_prefix

        s = self.session
        if k <= 0 or len(tokens) + k > s.n_ctx:
            return [], None
        keep = common_prefix(self.cached, tokens)
        keep = min(keep, len(tokens) - 1, s.n_past)  # at least one token evaluated: its logits start the draft
        s.rewind(keep)
        new = list(tokens[keep:])
        if self.no_cross is not None and keep < self.no_cross < len(tokens):
            s.forward(new[: self.no_cross - keep])
            new = new[self.no_cross - keep:]
        logits = s.forward(new)
        self.cached = list(tokens)
        drafts, qs = [], []
        for i in range(k):
            if probs is None:
                tok = int(np.argmax(logits[: self.vocab]))
            else:
                q = _fit(probs(logits), self.vocab)
                tok = int(rng.choice(len(q), p=q))
                qs.append(q)
            drafts.append(tok)
            if i < k - 1:
                logits = s.forward([tok])
                self.cached.append(tok)
        return drafts, (np.stack(qs) if qs else None)

    def close(self) -> None:
        self.session.close()


def _fit(q: np.ndarray, vocab: int) -> np.ndarray:
    """The draft's distribution over the target's vocabulary (a draft with a padded embedding has more rows)."""
    if len(q) > vocab:
        q = q[:vocab]
        return q / q.sum()
    if len(q) < vocab:
        return np.pad(q, (0, vocab - len(q)))
    return q
