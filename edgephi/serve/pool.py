"""N backend sessions, one worker thread each, and a bounded queue in front of them.

Inference is blocking C code, so it never runs on the event loop: each session has its own thread, and a job's
steps go back to the loop through a callback.  A job goes to the idle session whose cache shares the longest prefix
with its prompt (a follow-up turn then evaluates only its new tokens); when every session is busy it waits in a
queue of bounded length, and beyond that it is refused.  A cancelled job (its client went away) stops at the next
token and frees its session.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..backends.base import ContextFullError
from ..generate import common_prefix, stream
from ..sampling import make_logits_processors, make_sampler
from ..speculate import make_speculator
from .params import APIError, Sampling

log = logging.getLogger(__name__)
SIMILARITY = 0.5  # a session is picked for its cache when it holds at least this share of the prompt


@dataclass
class Step:
    """One step of a job as the event loop receives it."""

    text: str = ""  # new answer text (special tokens skipped)
    raw: str = ""  # the same with special tokens (tool-call markers), when the job asked for it
    token: int | None = None
    logprob: tuple | None = None  # (token id, logprob, [(id, logprob), ...]) when asked for
    finish: str | None = None  # set on the last step: stop, length (or context), or None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    drafted_tokens: int = 0  # --speculate: draft tokens verified so far, and how many were accepted
    accepted_tokens: int = 0
    error: APIError | None = None

    @property
    def last(self) -> bool:
        return self.finish is not None or self.error is not None


@dataclass
class Job:
    ids: list[int]  # the prompt encoded on its own
    text: str | None  # the prompt text (lets a session that wrote the previous answer keep that answer's ids)
    settings: Sampling
    emit: Callable[[Step], None] = print
    raw: bool = False  # also decode special tokens (tool calls)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_ids: list[int] = field(default_factory=list)  # what the chosen session evaluates (set at dispatch)


class Slot:
    """One session, its thread, and what its cache holds."""

    def __init__(self, index: int, session):
        self.index, self.session = index, session
        self.cached: list[int] = []
        self.last: tuple[str, list[int]] | None = None  # (prompt text + answer text, their ids)
        self.job: Job | None = None
        self.used = 0.0
        self.wake = threading.Condition()

    def prompt_ids(self, job: Job, tokenizer) -> list[int]:
        """The job's ids; when its text continues this session's last prompt and answer, the answer's ids as the
        model generated them (a re-encoding can split differently), as edgephi's own chat does."""
        if self.last is not None and job.text is not None:
            text, ids = self.last
            if len(job.text) > len(text) and job.text.startswith(text):
                return ids + tokenizer.encode(job.text[len(text):])
        return job.ids


class Pool:
    def __init__(self, model, sessions: list, *, max_queue: int, logprob_view: Callable | None = None,
                 speculate: str | None = None, prefix: list[int] | None = None):
        self.model, self.tokenizer = model, model.tokenizer
        self.speculate = speculate  # "ngram" or a draft bundle (edgephi/speculate.py), for every request
        self.stop_ids = frozenset(model.manifest.stop_ids) | model.tokenizer.stop_ids
        self.slots = [Slot(i, s) for i, s in enumerate(sessions)]
        for slot in self.slots:  # --prompt-cache: each session starts holding the saved prefix
            slot.cached = list(prefix or [])
        self.pending: deque[Job] = deque()
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.closed = False
        self.served = self.cancelled = 0
        self.threads = [threading.Thread(target=self._worker, args=(s,), name=f"edgephi-slot-{s.index}",
                                         daemon=True) for s in self.slots]
        for t in self.threads:
            t.start()

    # ---- called from the event loop ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.lock:
            if self.closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            idle = [s for s in self.slots if s.job is None]
            if idle:
                self._assign(self._best(idle, job), job)
            elif len(self.pending) < self.max_queue:
                self.pending.append(job)
            else:
                raise APIError(503, f"all {len(self.slots)} sessions are busy and {self.max_queue} requests wait "
                               "already; retry shortly", type="server_error", code="server_busy",
                               headers={"Retry-After": "1"})

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self.lock:
            if job in self.pending:
                self.pending.remove(job)
                self.cancelled += 1

    def status(self) -> dict:
        with self.lock:
            return {"sessions": len(self.slots), "busy": sum(s.job is not None for s in self.slots),
                    "queued": len(self.pending), "max_queue": self.max_queue, "served": self.served,
                    "cancelled": self.cancelled,
                    "cached_tokens": [len(s.cached) for s in self.slots]}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for job in self.pending:
                job.cancelled.set()
                job.emit(Step(error=APIError(503, "the server is shutting down", type="server_error",
                                             code="shutting_down")))
            self.pending.clear()
        for s in self.slots:
            if s.job is not None:
                s.job.cancelled.set()
            with s.wake:
                s.wake.notify()
        for t in self.threads:
            t.join(timeout=10)
        for s in self.slots:
            s.session.close()

    # ---- dispatch (under the lock) -------------------------------------------------------------------------------
    def _best(self, idle: list[Slot], job: Job) -> Slot:
        """The idle session sharing the longest prefix with the job when that is most of the prompt (a follow-up
        turn); otherwise the one used longest ago, so that a prompt sharing only the template's first tokens does
        not evict a conversation's cache (llama.cpp's server decides alike, at the same threshold)."""
        shared = {s.index: common_prefix(s.cached, s.prompt_ids(job, self.tokenizer)) for s in idle}
        best = max(idle, key=lambda s: (shared[s.index], -s.used))
        if shared[best.index] >= SIMILARITY * len(job.ids):
            return best
        return min(idle, key=lambda s: s.used)

    def _assign(self, slot: Slot, job: Job) -> None:
        job.prompt_ids = slot.prompt_ids(job, self.tokenizer)
        slot.job = job
        with slot.wake:
            slot.wake.notify()

    # ---- the worker threads ------------------------------------------------------------------------------------
    def _worker(self, slot: Slot) -> None:
        while True:
            with slot.wake:
                while slot.job is None and not self.closed:
                    slot.wake.wait()
            if slot.job is None:
                return
            job = slot.job
            stopped = job.cancelled.is_set()
            try:
                if not stopped:
                    stopped = self._run(slot, job)
            except Exception:  # noqa: BLE001 - a worker must survive anything one request does
                log.exception("request failed")
                job.emit(Step(error=APIError(500, "internal error while generating (see the server log)",
                                             type="server_error")))
            with self.lock:
                slot.used = time.monotonic()
                self.served += 1
                self.cancelled += stopped
                slot.job = None
                if self.pending and not self.closed:
                    self._assign(slot, self.pending.popleft())

    def _run(self, slot: Slot, job: Job) -> bool:
        """Generate the job's answer on the slot's session; True when it was cancelled before its end."""
        s, ids, session = job.settings, job.prompt_ids, slot.session
        room = session.n_ctx - len(ids)
        if room < 1:
            job.emit(Step(error=APIError(400, f"the prompt has {len(ids)} tokens; the context holds "
                                              f"{session.n_ctx}", param="messages", code="context_length_exceeded")))
            return False
        max_tokens = room if s.max_tokens is None else min(s.max_tokens, room)
        procs = make_logits_processors(s.repetition_penalty, presence_penalty=s.presence_penalty,
                                       frequency_penalty=s.frequency_penalty, prompt_len=len(ids),
                                       min_tokens=s.min_tokens, stop_ids=self.stop_ids)
        if s.logit_bias:  # (after min_tokens' mask: a finite bias leaves a held-back stop token at -inf)
            procs.append(_bias(s.logit_bias))
        seen: list[np.ndarray] = []
        if s.logprobs is not None:  # the model's own distribution, before penalties and the grammar's mask
            procs.insert(0, lambda tokens, logits: (seen.append(logits), logits)[1])
        if s.grammar is not None:
            procs.append(self.model.constraint(s.grammar, start=len(ids)))
        sampler = make_sampler(s.temperature, s.top_k, s.top_p, s.min_p, s.seed)
        speculator = make_speculator(self.model, self.speculate, temperature=s.temperature, top_k=s.top_k,
                                     top_p=s.top_p, min_p=s.min_p, seed=s.seed)
        raw = self.tokenizer.detokenizer(skip_special_tokens=False) if job.raw else None
        generated: list[int] = []
        answer: list[str] = []
        gen = stream(session, self.tokenizer, ids, sampler=sampler, logits_processors=procs, max_tokens=max_tokens,
                     stop_ids=self.stop_ids, stop_strings=s.stop, cached=slot.cached, speculator=speculator)
        stopped = False
        try:
            for r in gen:
                if job.cancelled.is_set():
                    stopped = True
                    break
                step = Step(text=r.text, token=r.token, finish=r.finish_reason, prompt_tokens=len(ids),
                            cached_tokens=len(ids) - r.prompt_tokens, completion_tokens=r.generation_tokens,
                            drafted_tokens=r.drafted_tokens, accepted_tokens=r.accepted_tokens)
                if r.token is not None:
                    generated.append(r.token)
                    if seen:
                        step.logprob = _logprob(seen[-1], r.token, s.logprobs)
                        seen.clear()
                if raw is not None:
                    step.raw = raw.add(r.token) if r.token is not None else raw.flush()
                answer.append(r.text)
                if step.finish == "context":
                    step.finish = "length"
                job.emit(step)
        except ContextFullError as e:
            job.emit(Step(error=APIError(400, str(e), param="messages", code="context_length_exceeded")))
        except ValueError as e:  # a grammar the answer cannot finish, a bad setting the checks let through
            job.emit(Step(error=APIError(400, str(e))))
        finally:
            gen.close()
            slot.cached = (ids + generated)[: session.n_past]
            text = "".join(answer)
            exact = job.text is not None and self.tokenizer.decode(generated, skip_special_tokens=True) == text
            slot.last = (job.text + text, ids + generated) if exact else None
        return stopped


def _logprob(logits: np.ndarray, token: int, k: int) -> tuple:
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    top = np.argpartition(-logp, k)[:k] if 0 < k < logp.size else np.arange(0)
    top = top[np.argsort(-logp[top], kind="stable")]
    return token, float(logp[token]), [(int(i), float(logp[i])) for i in top]


def _bias(bias: dict[int, float]):
    """OpenAI's logit_bias: added to the logits of the listed ids (ids past the vocabulary are ignored)."""
    ids = np.array(list(bias), dtype=np.int64)
    values = np.array(list(bias.values()), dtype=np.float32)

    def process(tokens, logits: np.ndarray) -> np.ndarray:
        keep = ids < logits.shape[-1]
        logits = logits.copy()
        logits[ids[keep]] += values[keep]
        return logits

    return process
