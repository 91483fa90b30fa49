"""Incremental decoding of streamed token ids (Tokenizer.detokenizer())."""
from __future__ import annotations


class StreamingDetokenizer:
    """Incremental decoding: ``add(id)`` returns the newly completed text, ``flush()`` the rest; the pieces
    concatenate to exactly ``tokenizer.decode(ids)``.

    Keeps the ids and decodes a short window (prefix offset .. end, as text-generation-inference does), so
    SentencePiece's leading-space rule and byte-level merges behave as in a full decode. Text is held back
    while it ends in U+FFFD (an incomplete UTF-8 sequence) or the last token is a byte-fallback piece (a
    following byte piece may still change how the run decodes).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._keep = getattr(tokenizer, "reasoning_ids", frozenset()) if skip_special_tokens else frozenset()
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this have been emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._segments: list[str] = []

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return "".join(self._segments)

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._skip and token_id in self._tok.special_ids and token_id not in self._keep:
            return ""  # skipped tokens vanish from decode(skip_special_tokens=True) before its decoder runs
        self.ids.append(token_id)
        if self._tok.is_byte_token(token_id):
            return ""
        new = self._decode(self.ids[self._prefix:])
        if len(new) <= len(self._prefix_text) or new.endswith("\ufffd") or not new.startswith(self._prefix_text):
            return ""
        return self._emit(new)

    def flush(self) -> str:
        """The text still held back (call once the stream ends)."""
        if self._read == len(self.ids):
            return ""
        new = self._decode(self.ids[self._prefix:])
        if not new.startswith(self._prefix_text):  # cannot happen with the decoders above; stay exact anyway
            full = self._decode(self.ids)
            out = full[len(self.text):]
            self._segments.append(out)
            self._prefix, self._read, self._prefix_text = len(self.ids), len(self.ids), ""
            return out
        return self._emit(new)

    def _emit(self, new: str) -> str:
        out = new[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        self._segments.append(out)
        return out

    def _decode(self, ids) -> str:
        # skipped ids never enter self.ids, so the kept special tokens decode with skipping off
        skip = self._skip and not self._keep
        if len(ids) == 1:  # the window after an emit is one token, mostly: remembered
            return self._tok.decode_one(ids[0], skip)
        return self._tok.decode(ids, skip_special_tokens=skip)
