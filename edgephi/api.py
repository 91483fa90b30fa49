"""The Python API: edgephi.load(bundle) -> Model with generate(), stream() and chat()."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backends.base import Session
from .generate import GenerationResponse, stream as _stream
from .manifest import Manifest
from .sampling import make_logits_processors, make_sampler
from .select import Choice, select
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
             seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False
             ) -> Iterator[GenerationResponse]:
        sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
        procs = make_logits_processors(repetition_penalty)
        stop_ids = frozenset() if ignore_eos else frozenset(self.manifest.stop_ids) | self.tokenizer.stop_ids
        generated: list[int] = []
        try:
            for r in _stream(self.session, self.tokenizer, prompt_ids, sampler=sampler, logits_processors=procs,
                             max_tokens=max_tokens, stop_ids=stop_ids, stop_strings=stop, cached=self._cached):
                if r.token is not None:
                    generated.append(r.token)
                yield r
        finally:  # also on Ctrl-C or an abandoned generator: remember exactly what the cache holds
            self._cached = (prompt_ids + generated)[: self.session.n_past]

    # ---- public API ------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], **kwargs) -> Iterator[GenerationResponse]:
        """Stream a completion of a raw prompt (text or token ids)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._gen(ids, **kwargs)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        return "".join(r.text for r in self.stream(prompt, **kwargs))

    def chat(self, message: str, system: str | None = None, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the answer to one user turn; the conversation and its KV cache carry over to the next turn."""
        if system is not None and not self.messages:
            self.messages.append({"role": "system", "content": system})
        self.messages.append({"role": "user", "content": message})
        prompt_text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        ids = self._conversation_ids(prompt_text)
        answer: list[str] = []
        generated: list[int] = []
        try:
            for r in self._gen(ids, **kwargs):
                answer.append(r.text)
                if r.token is not None:
                    generated.append(r.token)
                yield r
        finally:
            text = "".join(answer)
            self.messages.append({"role": "assistant", "content": text})
            exact = self.tokenizer.decode(generated, skip_special_tokens=True) == text
            self._last_answer = (ids + generated, text, prompt_text) if exact else None

    def _conversation_ids(self, text: str) -> list[int]:
        """Token ids of the rendered conversation.

        The previous answer is kept as the ids the model generated, not re-tokenized from its text (a re-encoding
        can split differently and would force the cache to be recomputed from there); only the text after it is
        encoded.  Falls back to encoding everything when the template does not render the history as a prefix.
        """
        full = self.tokenizer.encode(text, add_special_tokens=self.tokenizer.add_bos_token)
        if self._last_answer is None or len(self.messages) < 3 or self.messages[-2]["role"] != "assistant":
            return full
        conv_ids, answer, prompt_text = self._last_answer
        # render the conversation with a marker in place of the last answer, to see what the template puts
        # around it (a template may end a finished conversation differently, e.g. with an EOS)
        marker = "\u2063edgephi-answer\u2063"
        probe = self.messages[:-2] + [{"role": "assistant", "content": marker}, self.messages[-1]]
        marked = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True)
        if marked.count(marker) != 1:
            return full
        before, after = marked.split(marker)
        if before != prompt_text or text != before + answer + after:
            return full
        return conv_ids + self.tokenizer.encode(after, add_special_tokens=False)

    def reset(self) -> None:
        """Forget the conversation (the cache is reused only where the new prompt matches it)."""
        self.messages = []
        self._last_answer = None

    def close(self) -> None:
        self.session.close()

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
    choice = select(tuple(manifest.formats), device=device, format=format, probe=probe)
    log.info("backend %s on %s\n%s", choice.backend.name, choice.device, choice.explain())
    session = choice.backend.open(path, manifest, choice.device, **options)
    tokenizer = Tokenizer.from_dir(path)
    return Model(path, manifest, choice, session, tokenizer)
