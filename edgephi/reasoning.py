"""A reasoning model's thinking told apart from its answer while the text streams.

Phi-4-reasoning and Phi-4-mini-reasoning begin an answer with ``<think> ... </think>`` and then give the answer.
``ReasoningSplitter.feed(piece)`` takes the generated text piece by piece, as the detokenizer emits it (tags
included), and returns ``(reasoning, content)``: the piece's text inside the block and after it.

* A block is recognised only at the start of an answer (leading whitespace allowed), so an answer that mentions the
  tags later is left alone, and a model that does not reason passes through as content, unchanged.  When the prompt
  already opened the block (a template whose generation prompt ends with ``<think>``), ``for_prompt`` starts inside it.
* The tags are not part of either text; whitespace right after ``<think>`` and right after ``</think>`` is dropped.
* Text that may still turn out to be a tag (``"</thi"``) is held back until the next piece decides; ``flush()``
  returns what is held when the stream ends.  The concatenated pieces are independent of how the text was split.

The tags are text: a vocabulary that has them as special tokens must decode them (Tokenizer.reasoning_ids keeps them
in the streaming detokenizer).  Use from a server, for OpenAI's ``reasoning_content``::

    for r in model.chat(text, thinking="hide"):   # r.reasoning -> delta.reasoning_content, r.text -> delta.content
        ...

or on any text stream: ``sp = ReasoningSplitter.for_prompt(prompt_text)``, ``sp.feed(piece)`` per piece, ``sp.flush()``
at the end.  Runtime module: no dependencies.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# Model.chat(thinking=...): "show" keeps the block in the text as the model wrote it; "hide" leaves only the answer
# in the text.  Either way each response's ``reasoning`` carries the block's text.
THINKING = ("show", "hide")


def check_thinking(thinking) -> None:
    if thinking not in THINKING:
        raise ValueError(f"thinking={thinking!r}: expected one of {', '.join(map(repr, THINKING))}")


def _held(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag`` (it may become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streams ``(reasoning, content)`` out of generated text pieces (see the module's docstring)."""

    def __init__(self, in_reasoning: bool = False, open_tag: str = OPEN, close_tag: str = CLOSE):
        if not open_tag or not close_tag:
            raise ValueError("the reasoning tags must be non-empty strings")
        self.open_tag, self.close_tag = open_tag, close_tag
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> content, or start -> content
        self._buf = ""
        self._lstrip = in_reasoning  # drop the whitespace at the start of the part that begins here

    @classmethod
    def for_prompt(cls, prompt_text: str, open_tag: str = OPEN, close_tag: str = CLOSE) -> "ReasoningSplitter":
        """Starts inside the block when the rendered prompt ends with an opening tag it did not close."""
        return cls(prompt_text.rstrip().endswith(open_tag), open_tag, close_tag)

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is still held back, once the stream has ended."""
        buf, self._buf = self._buf, ""
        if self._lstrip:
            buf = buf.lstrip()
        if self.state == "reasoning":
            return buf, ""
        self.state = "content"
        return "", buf

    def split(self, text: str) -> tuple[str, str]:
        """A whole answer at once: (reasoning, content)."""
        r, c = self.feed(text)
        fr, fc = self.flush()
        return r + fr, c + fc

    def _step(self, reasoning: list[str], content: list[str]) -> bool:
        """Consume what can be decided in the buffer; True when the state changed and the loop should go on."""
        if self._lstrip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._lstrip = False
        if self.state == "start":
            head = self._buf.lstrip()
            if head.startswith(self.open_tag):
                self._buf, self.state, self._lstrip = head[len(self.open_tag):], "reasoning", True
                return True
            if not head or self.open_tag.startswith(head):
                return False  # only whitespace, or the beginning of the tag: wait for more
            self.state = "content"
            return True
        if self.state == "reasoning":
            end = self._buf.find(self.close_tag)
            if end >= 0:
                reasoning.append(self._buf[:end])
                self._buf, self.state, self._lstrip = self._buf[end + len(self.close_tag):], "content", True
                return True
            keep = _held(self._buf, self.close_tag)
            reasoning.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        content.append(self._buf)
        self._buf = ""
        return False
