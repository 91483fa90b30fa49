"""Speculative decoding over any Session: drafts (edgephi/drafters.py) verified by one multi-token forward.

Each round feeds the pending token (sampled, not yet evaluated) and k drafted tokens to the target in one forward
with all_logits=True, accepts drafts left to right, and ends with one token of the target's own (the correction
at the first rejected draft, or the bonus token after the last accepted one), which becomes the next pending
token.  The cache is rewound to drop rejected drafts before any token of the round is yielded, so at every yield
the cache holds the tokens before the yielded one (and perhaps accepted tokens after it; never a rejected one).

Acceptance:
* greedy: a draft is accepted when it is the argmax of the target's (processed) logits at its position, so the
  output is token-identical to plain greedy decoding up to the floating-point difference between evaluating
  tokens one at a time and in one call;
* sampling: speculative sampling (Leviathan et al. 2023, "Fast inference from transformers via speculative
  decoding", algorithm 1; Chen et al. 2023): accept draft x with probability min(1, p(x) / q(x)), else draw from
  norm(max(0, p - q)) and end the round; after k acceptances draw the bonus token from p.  p is the target's
  distribution after processors, temperature and the truncations, exactly as edgephi.sampling draws; q is a point
  mass for deterministic drafts (prompt lookup: accept with p(x), else draw from p with x removed).
  Tokens are then distributed exactly as plain sampling's.

Where one call must equal one-at-a-time decoding:
* LongRoPE (transformers' dynamic_rope_update, and edgephi's ONNX and NPU graphs) picks short or long factors by
  the call's last position: a verify call never crosses `no_cross` (original_max_position_embeddings): it ends at
  or before it, or starts after it;
* llama.cpp's sliding-window emulation evaluates tokens past the window one at a time (batch_limit), so a verify
  call there is exact too (and costs k single steps: no speed-up past the window on that backend).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .drafters import AdaptiveK
from .sampling import pick, truncated

log = logging.getLogger(__name__)


@dataclass
class SpecStats:
    drafted: int = 0  # draft tokens sent to the target for verification
    accepted: int = 0  # of those, accepted
    rounds: int = 0  # verify forwards


def probabilities(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> np.ndarray:
    """(V,) float64: the distribution edgephi.sampling.make_sampler draws from (edgephi.sampling.truncated)."""
    idx, p = truncated(logits, temperature, top_k, top_p, min_p)
    out = np.zeros(logits.shape[-1], dtype=np.float64)
    out[idx] = p
    return out


class Speculator:
    """Drafter + draft-length controller + the sampling settings; run() is the speculative token loop."""

    def __init__(self, drafter, *, k: int = 4, k_max: int = 16, no_cross: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 rng: np.random.Generator | None = None):
        self.drafter, self.control = drafter, AdaptiveK(k, k_max)
        self.no_cross = no_cross
        self.settings = (temperature, int(top_k), top_p, min_p)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stats = SpecStats()

    @property
    def greedy(self) -> bool:
        return self.settings[0] == 0

    def _p(self, logits: np.ndarray) -> np.ndarray:
        return probabilities(logits, *self.settings)

    def _cap(self, k: int, n_past: int, n_ctx: int, left: int) -> int:
        """Longest draft whose verify call [n_past, n_past + 1 + k) fits the context, the token budget and the
        LongRoPE rule."""
        k = min(k, n_ctx - n_past - 1, left - 1)
        if self.no_cross is not None and n_past < self.no_cross:
            k = min(k, self.no_cross - n_past - 1)
        return max(0, k)

    def _draft(self, tokens: list[int], k: int) -> tuple[list[int], np.ndarray | None]:
        if k <= 0:
            return [], None
        if self.greedy or self.drafter.name == "ngram":
            drafts, q = self.drafter.propose(tokens, k)
        else:
            drafts, q = self.drafter.propose(tokens, k, probs=self._p, rng=self.rng)
        return drafts[:k], (q[:k] if q is not None else None)

    def _judge(self, tokens: list[int], drafts: list[int], q, rows: np.ndarray, processors) -> list[tuple]:
        """(token, processed logits) of the round: accepted drafts, then the target's own token."""
        if self.greedy and not processors:  # the argmax of every row at once
            best = np.argmax(rows[:len(drafts) + 1], axis=-1).tolist()
            m = 0
            while m < len(drafts) and best[m] == drafts[m]:
                m += 1
            return [(best[i], rows[i]) for i in range(m + 1)]
        out: list[tuple] = []
        ctx = list(tokens)
        for i in range(len(drafts) + 1):
            logits = rows[i]
            for proc in processors:
                logits = proc(ctx, logits)
            if i == len(drafts):  # every draft accepted: the bonus token
                tok = int(np.argmax(logits)) if self.greedy else self._draw(self._p(logits))
                out.append((tok, logits))
                break
            d = drafts[i]
            if self.greedy:
                tok = int(np.argmax(logits))
                out.append((tok, logits))
                if tok != d:
                    break
            else:
                p = self._p(logits)
                qd = 1.0 if q is None else q[i][d]
                if qd > 0 and self.rng.random() < min(1.0, p[d] / qd):
                    out.append((d, logits))
                else:
                    resid = np.maximum(p - (np.eye(1, len(p), d)[0] if q is None else q[i]), 0.0)
                    out.append((self._draw(resid if resid.sum() > 0 else p), logits))
                    break
            ctx.append(out[-1][0])
        return out

    def _draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def run(self, prompt: Sequence[int], session, sampler, processors: Sequence, max_tokens: int,
            history: Sequence[int] = ()) -> Iterator[tuple[int, np.ndarray]]:
        """generate_step's contract: (token, processed logits) pairs; the first token is plain decoding's."""
        tokens = list(history) + list(prompt)
        tok, logits = pick(tokens, session.forward(list(prompt)), processors, sampler)
        yield tok, logits
        tokens.append(tok)
        n = 1
        while n < max_tokens and session.n_past + 1 <= session.n_ctx:
            k = self._cap(self.control.next_k(), session.n_past, session.n_ctx, max_tokens - n)
            drafts, q = self._draft(tokens, k)
            if not drafts:  # plain decoding step
                t0 = time.perf_counter()
                logits = session.forward([tokens[-1]])
                self.control.observe(1, time.perf_counter() - t0)
                tok, logits = pick(tokens, logits, processors, sampler)
                yield tok, logits
                tokens.append(tok)
                n += 1
                continue
            base = session.n_past
            t0 = time.perf_counter()
            rows = session.forward([tokens[-1]] + drafts, all_logits=True)  # (1 + k, V)
            self.control.observe(1 + len(drafts), time.perf_counter() - t0)
            round_ = self._judge(tokens, drafts, q, rows, processors)
            m = len(round_) - 1  # accepted drafts
            session.rewind(base + 1 + m)  # keep the pending token and the accepted drafts
            self.stats.drafted += len(drafts)
            self.stats.accepted += m
            self.stats.rounds += 1
            self.control.update(len(drafts), m)
            for tok, logits in round_:
                yield tok, logits
                tokens.append(tok)
                n += 1


def check_speculate(value) -> None:
    """speculate= is None, "ngram" or a draft bundle's directory (refused at the call, before anything runs)."""
    import os
    from pathlib import Path

    if value is None or value == "ngram":
        return
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"speculate={value!r}: expected 'ngram' or the path of a draft bundle")
    if not (Path(value) / "manifest.json").is_file():
        raise FileNotFoundError(f"speculate={str(value)!r}: not 'ngram' and not a bundle directory (no "
                                f"manifest.json in it): give 'ngram' or a draft bundle from `edgephi export`")


def make_speculator(model, speculate, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, seed: int | None = None) -> Speculator | None:
    """The Speculator for one generate/stream/chat call of `model` (edgephi.api.Model), or None."""
    from .drafters import ModelDrafter, NgramDrafter

    check_speculate(speculate)
    if speculate is None:
        return None
    spec = getattr(model.manifest, "spec", None)
    rs = getattr(spec, "rope_scaling", None)
    no_cross = rs.original_max_position_embeddings if rs is not None else None
    if speculate == "ngram":
        drafter = NgramDrafter()
    else:
        draft = _draft_model(model, speculate)
        drs = getattr(getattr(draft.manifest, "spec", None), "rope_scaling", None)
        drafter = ModelDrafter(draft.session, getattr(spec, "vocab_size", None) or model.tokenizer.vocab_size,
                               no_cross=drs.original_max_position_embeddings if drs is not None else None,
                               holder=draft)  # the draft's cache is reused by the next call (a chat's turns)
    return Speculator(drafter, no_cross=no_cross, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      rng=np.random.default_rng(seed))


def _draft_model(model, path):
    """The draft bundle's session, loaded once per Model (same device, and format when it has it); refused when
    its tokenizer maps any id differently from the target's."""
    from pathlib import Path

    from .api import load
    from .drafters import tokenizer_difference
    from .manifest import Manifest

    key = str(Path(path).resolve())
    drafts = model.__dict__.setdefault("_drafts", {})
    if key not in drafts:
        fmt = model.format if model.format in Manifest.load(path).formats else None
        try:  # the target's device and format where the draft has them, else the draft's own best backend
            draft = load(path, device=model.device if fmt else "auto", format=fmt)
        except (ValueError, RuntimeError) as e:
            log.info("draft %s: not on %s/%s (%s); loading it on its best backend", path, model.device, fmt, e)
            draft = load(path)
        why = tokenizer_difference(model.tokenizer, draft.tokenizer)
        if why is not None:
            draft.close()
            raise ValueError(f"speculate={str(path)!r}: this draft cannot draft for {model.path}: its tokenizer "
                             f"differs ({why})")
        drafts[key] = draft
    return drafts[key]
