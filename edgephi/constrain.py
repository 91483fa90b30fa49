"""Constrained decoding with llguidance (Microsoft's grammar engine, as in onnxruntime-genai and llama.cpp).

A :class:`Constraint` is a logits processor for generate.py's token loop: called with the tokens so far it first
has its matcher accept the tokens sampled since the last call (the accept step; tokens it no longer sees, such as
rejected speculative drafts, are rolled back), then masks every token the grammar does not allow next to -inf.
Once the grammar is complete only the stop tokens are allowed, so the answer ends there.

Grammars come from a JSON schema (:func:`json_schema_grammar`), a Lark grammar (``lark_grammar``, llguidance's
dialect: ``%json {...}`` embeds a schema, ``<|name|>`` matches a special token) or any JSON value
(``json_schema=True``).  The vocabulary is built once per tokenizer from its tokenizer.json (or, for a
sentencepiece-only tokenizer, from its pieces).  Runtime module: llguidance only, imported on first use.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Sequence

import numpy as np

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Tokenizer -> {(n_vocab, eos): LLTokenizer}
_LOCK = threading.Lock()
# compact JSON as json.dumps writes it (what a model has seen most), no free whitespace: a model that loops on
# blanks cannot run the answer out of tokens
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("structured output needs llguidance: pip install 'edgephi[serve]'") from e
    return llguidance


def json_schema_grammar(schema) -> str:
    """An llguidance grammar for a JSON schema (dict or JSON text); True (or {}) for any JSON value."""
    llg = _llguidance()
    if schema is True:
        schema = {}
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema: expected a JSON object (a schema), got {type(schema).__name__}")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise ValueError(f"json_schema: {e}") from None


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def _vocab_tokens(tokenizer, n_vocab: int) -> list[bytes]:
    """The bytes each id stands for (sentencepiece-only tokenizers): "▁" is a space, <0xNN> a byte."""
    out = []
    for i in range(n_vocab):
        piece = tokenizer.id_to_token(i)
        if piece is None:
            out.append(b"")
        elif tokenizer.is_byte_token(i):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _SentencePieceVocab:
    """What llguidance's TokenizerWrapper reads, from an edgephi Tokenizer without a tokenizer.json."""

    def __init__(self, tokenizer, n_vocab: int, eos: list[int]):
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = _vocab_tokens(tokenizer, n_vocab)
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tok = tokenizer

    def __call__(self, text):
        return self._tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def llg_tokenizer(tokenizer, n_vocab: int, eos_ids: Sequence[int]):
    """llguidance's view of an edgephi Tokenizer with n_vocab logits and these stop ids (built once, ~50 ms)."""
    llg = _llguidance()
    eos = sorted(int(i) for i in eos_ids)
    if not eos:
        raise ValueError("constrained decoding needs at least one stop token id to end the answer on")
    key = (int(n_vocab), tuple(eos))
    with _LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in per:
            path = tokenizer.path / "tokenizer.json"
            if tokenizer.backend == "tokenizers" and path.is_file():
                source = path.read_text(encoding="utf-8")
            else:
                source = llg.TokenizerWrapper(_SentencePieceVocab(tokenizer, n_vocab, eos))
            per[key] = llg.LLTokenizer(source, n_vocab=int(n_vocab), eos_token=eos)
        return per[key]


def check_grammar(tokenizer, grammar: str, n_vocab: int, eos_ids: Sequence[int]) -> None:
    """ValueError naming what is wrong with a grammar (a schema llguidance cannot compile, a bad $ref...)."""
    Constraint(tokenizer, grammar, n_vocab=n_vocab, eos_ids=eos_ids, start=0)


class Constraint:
    """Logits processor that keeps the answer inside a grammar (see the module note)."""

    def __init__(self, tokenizer, grammar: str, *, n_vocab: int, eos_ids: Sequence[int], start: int):
        llg = _llguidance()
        self.n_vocab = int(n_vocab)
        self.start = start  # tokens before this index are the prompt: the grammar starts after them
        self.matcher = llg.LLMatcher(llg_tokenizer(tokenizer, n_vocab, eos_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.consumed: list[int] = []
        self._mask = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    def accept(self, token: int) -> None:
        """The accept step: advance the matcher past a sampled token."""
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self.consumed.append(int(token))

    def _sync(self, generated: Sequence[int]) -> bool:
        """Bring the matcher to `generated`: roll back what it no longer holds, accept what is new.  False when a
        new token is outside the grammar (a speculative draft the mask never allowed: that position is unused)."""
        n = 0
        while n < len(self.consumed) and n < len(generated) and self.consumed[n] == generated[n]:
            n += 1
        if n < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - n)
            del self.consumed[n:]
        new = [int(t) for t in generated[n:]]
        if new:
            k = self.matcher.try_consume_tokens(new)
            self.consumed.extend(new[:k])
            return k == len(new)
        return True

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if not self._sync(tokens[self.start:]):
            return logits
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")
        v = logits.shape[-1]
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little", count=min(v, self.n_vocab))
        out = np.full(v, -np.inf, dtype=logits.dtype)
        keep = np.flatnonzero(allowed)
        if keep.size == 0:
            raise ValueError("constrained decoding: the grammar allows no token here")
        out[keep] = logits[keep]
        return out

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but a stop token may follow."""
        return self.matcher.is_stopped()


def read_json_schema(path) -> dict:
    """A JSON schema from a file (`edgephi run --json-schema FILE`), or ValueError naming the file."""
    from pathlib import Path

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON schema: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema
