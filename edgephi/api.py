"""The Python API: edgephi.load(bundle) -> Model with generate(), stream() and chat()."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import prompt_cache, verify
from .backends.base import Session
from .generate import GenerationResponse, check_max_tokens, stream as _stream
from .manifest import Manifest
from .reasoning import ReasoningSplitter, check_thinking
from .constrain import Constraint, json_schema_grammar
from .sampling import check_min_tokens, check_penalty, check_settings, make_logits_processors, make_sampler
from .select import Choice, select
from .speculate import check_speculate, make_speculator
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Model:
    """A loaded bundle: one backend session with its KV cache, the tokenizer, and the chat so far."""

    def __init__(self, path: Path, manifest: Manifest, choice: Choice, session: Session, tokenizer: Tokenizer):
        self.path, self.manifest, self.choice = path, manifest, choice
        self.session, self.tokenizer = session, tokenizer
        self.backend = choice.backend.name
        self.device = choice.device
        self.format = choice.backend.format
        self.messages: list[dict] = []
        self._cached: list[int] = []  # the tokens the session's cache holds, in order
        # (conversation ids through the last answer, the answer's text, the prompt text it answered)
        self._last_answer: tuple[list[int], str, str] | None = None

    # ---- plumbing --------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, V) logits of ids from an empty cache (for checks)."""
        self.session.reset()
        self._cached = []
        out = self.session.forward(list(ids), all_logits=True)
        self._cached = list(ids)
        return out

    def _gen(self, prompt_ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float | None = None,
             seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False, speculate=None,
             json_schema=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             min_tokens: int = 0) -> Iterator[GenerationResponse]:
        sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
        speculator = make_speculator(self, speculate, temperature=temperature, top_k=top_k, top_p=top_p,
                                     min_p=min_p, seed=seed)
        stops = frozenset(self.manifest.stop_ids) | self.tokenizer.stop_ids
        procs = make_logits_processors(repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, prompt_len=len(prompt_ids),
                                       min_tokens=min_tokens, stop_ids=stops)  # (vLLM's min_tokens)
        stop_ids = frozenset() if ignore_eos else stops
        if json_schema is not None:  # constrained decoding (edgephi/constrain.py): the answer parses and validates
            procs.append(self.constraint(json_schema_grammar(json_schema), start=len(prompt_ids)))
        generated: list[int] = []
        try:
            for r in _stream(self.session, self.tokenizer, prompt_ids, sampler=sampler, logits_processors=procs,
                             max_tokens=max_tokens, stop_ids=stop_ids, stop_strings=stop, cached=self._cached,
                             speculator=speculator):
                if r.token is not None:
                    generated.append(r.token)
                yield r
        finally:  # also on Ctrl-C or an abandoned generator: remember exactly what the cache holds
            self._cached = (prompt_ids + generated)[: self.session.n_past]

    def constraint(self, grammar: str, start: int) -> Constraint:
        """A logits processor that keeps what follows the first `start` tokens inside an llguidance grammar and
        ends it on this model's stop tokens."""
        stops = frozenset(self.manifest.stop_ids) | self.tokenizer.stop_ids
        return Constraint(self.tokenizer, grammar, n_vocab=self.manifest.spec.vocab_size, eos_ids=stops, start=start)

    def _check(self, kwargs: dict) -> None:
        """Refuse bad settings when the call is made, not at the first token (and before a chat turn is recorded)."""
        check_max_tokens(kwargs.get("max_tokens", 256))
        check_min_tokens(kwargs.get("min_tokens", 0), kwargs.get("max_tokens", 256))
        check_settings(kwargs.get("temperature", 0.0), kwargs.get("top_k", 0), kwargs.get("top_p", 1.0),
                       kwargs.get("min_p", 0.0), kwargs.get("repetition_penalty"))
        check_speculate(kwargs.get("speculate"))  # None, "ngram" or a draft bundle (edgephi/speculate.py)
        for name in ("presence_penalty", "frequency_penalty"):
            check_penalty(name, kwargs.get(name, 0.0))
        if kwargs.get("json_schema") is not None:
            for key in ("ignore_eos", "min_tokens"):
                if kwargs.get(key):
                    raise ValueError(f"json_schema ends the answer on a stop token: it cannot be used with {key}")
            self.constraint(json_schema_grammar(kwargs["json_schema"]), start=0)  # compiles: errors raise here

    # ---- public API ------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], **kwargs) -> Iterator[GenerationResponse]:
        """Stream a completion of a raw prompt (text or token ids)."""
        self._check(kwargs)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._gen(ids, **kwargs)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        return "".join(r.text for r in self.stream(prompt, **kwargs))

    def chat(self, message: str, system: str | None = None, thinking: str = "show",
             **kwargs) -> Iterator[GenerationResponse]:
        """Stream the answer to one user turn; the conversation and its KV cache carry over to the next turn.

        A reasoning model's ``<think>`` block (edgephi/reasoning.py): each response's ``reasoning`` is the block's
        text; ``thinking="show"`` keeps the block in ``text`` as the model wrote it, ``"hide"`` leaves the answer."""
        check_thinking(thinking)
        self._check(kwargs)
        for text in (message,) + ((system,) if system is not None else ()):
            if not isinstance(text, str):
                raise TypeError(f"chat() takes str messages, got {type(text).__name__}")
            self.tokenizer.encode(text)  # not UTF-8: refused here, before the turn is recorded
        return self._chat(message, system, thinking, **kwargs)

    def _chat(self, message: str, system: str | None, thinking: str, **kwargs) -> Iterator[GenerationResponse]:
        if system is not None and not self.messages:
            self.messages.append({"role": "system", "content": system})
        self.messages.append({"role": "user", "content": message})
        prompt_text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        ids = self._conversation_ids(prompt_text)
        answer: list[str] = []
        generated: list[int] = []
        splitter = ReasoningSplitter.for_prompt(prompt_text)
        try:
            for r in self._gen(ids, **kwargs):
                answer.append(r.text)
                if r.token is not None:
                    generated.append(r.token)
                reasoning, content = splitter.feed(r.text)
                if r.finish_reason is not None:
                    reasoning, content = (a + b for a, b in zip((reasoning, content), splitter.flush()))
                yield replace(r, text=r.text if thinking == "show" else content, reasoning=reasoning)
        finally:
            text = "".join(answer)
            self.messages.append({"role": "assistant", "content": text})
            exact = self.tokenizer.decode(generated, skip_special_tokens=True) == text
            self._last_answer = (ids + generated, text, prompt_text) if exact else None

    def _conversation_ids(self, text: str) -> list[int]:
        """Token ids of the rendered conversation: what ``apply_chat_template(..., tokenize=True)`` gives (no BOS
        added beyond the one the template writes, as transformers, llama.cpp and onnxruntime-genai do).

        The previous answer is kept as the ids the model generated, not re-tokenized from its text (a re-encoding
        can split differently and would force the cache to be recomputed from there); only the text after it is
        encoded.  Falls back to encoding everything when the template does not render the history as a prefix.
        """
        full = self.tokenizer.encode(text, add_special_tokens=False)
        if self._last_answer is None or len(self.messages) < 3 or self.messages[-2]["role"] != "assistant":
            return full
        conv_ids, answer, prompt_text = self._last_answer
        # render the conversation with a marker in place of the last answer, to see what the template puts
        # around it (a template may end a finished conversation differently, e.g. with an EOS)
        marker = "\u2063edgephi-answer\u2063"
        probe = self.messages[:-2] + [{"role": "assistant", "content": marker}, self.messages[-1]]
        marked = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        if marked.count(marker) != 1:
            return full
        before, after = marked.split(marker)
        if before != prompt_text or text != before + answer + after:
            return full
        return conv_ids + self.tokenizer.encode(after, add_special_tokens=False)

    def save_prompt_cache(self, path: str | os.PathLike, prompt: str | Sequence[int] | None = None) -> int:
        """Save the KV state of `prompt` (evaluated now; default: what the cache holds) to a file outside the
        bundle; returns the token count.  edgephi/prompt_cache.py"""
        return prompt_cache.save_model(self, path, prompt)

    def load_prompt_cache(self, path: str | os.PathLike) -> int:
        """Load a file from save_prompt_cache (refused unless saved from this bundle, format and backend); the next
        prompt reuses its tokens' common prefix.  Returns the token count."""
        return prompt_cache.load_model(self, path)

    def reset(self) -> None:
        """Forget the conversation (the cache is reused only where the new prompt matches it)."""
        self.messages = []
        self._last_answer = None

    def close(self) -> None:
        self.session.close()
        for draft in self.__dict__.pop("_drafts", {}).values():  # speculate=DRAFT_PATH's draft models
            draft.close()

    def __repr__(self) -> str:
        return f"Model({self.path}, backend={self.backend}, device={self.device})"


def load(path: str | os.PathLike | None = None, device: str = "auto", format: str | None = None,
         probe=None, **options) -> Model:
    """Load a bundle (default: the built-in model's bundle) on the best backend this machine has."""
    if path is None:
        from .default_model import bundle_dir

        path = bundle_dir()
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"no bundle given, and the built-in model has none at {path} yet: export it once "
                                    "with `edgephi export default -o " + str(path) + "` (`edgephi chat` and `edgephi "
                                    "run` do it on first use)")
    path = Path(path)
    manifest = Manifest.load(path)
    check = options.pop("verify", True)  # device="auto" trusts an accelerator once it passed its device check
    trust = verify.trust(path, manifest, probe) if check else None
    needs = {f: manifest.memory_bytes(f, options.get("n_ctx")) for f in manifest.formats}
    choice = select(tuple(manifest.formats), device=device, format=format, probe=probe, trust=trust, needs=needs)
    log.info("backend %s on %s\n%s", choice.backend.name, choice.device, choice.explain())
    if device != "auto" and not verify.is_reference(choice.device):
        verdict = verify.cached(path, choice.backend.name, choice.device)
        if verdict is None or not verdict.ok:
            log.warning("%s on %s has %s on this machine (`edgephi devices --verify %s` checks it)",
                        choice.backend.name, choice.device, "not been verified" if verdict is None else
                        "failed its device check", path)
    cache_file = options.pop("prompt_cache", None)  # a saved prefix's KV state (edgephi/prompt_cache.py)
    session = choice.backend.open(path, manifest, choice.device, **options)
    tokenizer = Tokenizer.from_dir(path)
    model = Model(path, manifest, choice, session, tokenizer)
    if cache_file is not None:
        try:
            model.load_prompt_cache(cache_file)
        except BaseException:
            model.close()
            raise
    return model
