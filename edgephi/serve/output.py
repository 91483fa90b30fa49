"""OpenAI's response shapes, whole or as stream chunks, built from a job's steps (edgephi/serve/pool.py).

Chat answers that may hold a tool call are held back while they may still start with the call marker; once they
cannot, the held text goes out as content, and once they do, the call goes out whole at the end.
"""
from __future__ import annotations

import secrets
import time
from functools import lru_cache

from .pool import Step
from .tools import parse_calls, starts_call


def usage(last: Step) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
            **({"completion_tokens_details": {  # --speculate: OpenAI's names for predicted-output tokens
                "accepted_prediction_tokens": last.accepted_tokens,
                "rejected_prediction_tokens": last.drafted_tokens - last.accepted_tokens}}
               if last.drafted_tokens else {})}


class TokenText:
    """A token's text and bytes as logprobs report them (a byte-fallback piece is its one byte)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token: int) -> tuple[str, list[int]]:
        tok = self.tokenizer
        if tok.is_byte_token(token):
            raw = bytes([int(tok.id_to_token(token)[3:5], 16)])
        else:
            raw = tok.decode([token]).encode("utf-8")
        return raw.decode("utf-8", "replace"), list(raw)

    def chat_entry(self, lp: tuple) -> dict:
        token, logprob, top = lp
        text, raw = self.get(token)
        return {"token": text, "logprob": logprob, "bytes": raw,
                "top_logprobs": [{"token": self.get(i)[0], "logprob": v, "bytes": self.get(i)[1]} for i, v in top]}


class ChatOutput:
    def __init__(self, model_id: str, texts: TokenText, *, tools=None, fmt=None, logprobs: int | None = None,
                 include_usage: bool = False, reasoning=None):
        self.id, self.created, self.model = "chatcmpl-" + secrets.token_hex(12), int(time.time()), model_id
        # a reasoning model's <think> block goes to reasoning_content (edgephi.reasoning.ReasoningSplitter)
        self.splitter, self.reasoning, self.thought = reasoning, "", ""
        self.texts, self.tools, self.fmt = texts, tools, fmt
        self.want_logprobs, self.include_usage = logprobs is not None, include_usage
        self.state = "content" if tools is None or tools.choice == "none" else "undecided"
        self.raw, self.held, self.held_lp = "", "", []
        self.started = False

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "edgephi"}

    def _feed(self, steps: list[Step]) -> tuple[str, list]:
        """Text and logprob entries that may go out now (held back while a tool call may be starting)."""
        text, lps = "", []
        for st in steps:
            if st.error is not None:
                break
            lp = [self.texts.chat_entry(st.logprob)] if st.logprob is not None else []
            piece, raw = st.text, st.raw
            if self.splitter is not None:  # only the answer after the thinking is content (and may be a call)
                thought, piece = self.splitter.feed(st.text)
                if st.last:
                    more, rest = self.splitter.flush()
                    thought, piece = thought + more, piece + rest
                self.reasoning, self.thought, raw = self.reasoning + thought, self.thought + thought, piece
            if self.state == "content":
                text += piece
                lps += lp
                continue
            self.raw += raw
            self.held += piece
            self.held_lp += lp
            if self.state == "undecided":
                decided = starts_call(self.raw, self.fmt)
                if decided is False or (decided is None and st.last):
                    self.state = "content"
                    text, lps = text + self.held, lps + self.held_lp
                    self.held, self.held_lp = "", []
                elif decided:
                    self.state = "call"
        return text, lps

    def _calls(self, last: Step) -> list[dict] | None:
        if self.state != "call":
            return None
        calls = parse_calls(self.raw, self.fmt, self.tools)
        if calls is None:  # not a well-formed call after all: the text is the answer
            self.state = "content"
        return calls

    def _finish(self, last: Step, calls) -> str:
        return "tool_calls" if calls else last.finish

    # ---- whole answers ---------------------------------------------------------------------------------------
    def whole(self, steps: list[Step]) -> dict:
        last = steps[-1]
        text, lps = self._feed(steps)
        calls = self._calls(last)
        if calls is None and self.held:
            text, lps = text + self.held, lps + self.held_lp
        message = {"role": "assistant", "content": None if calls else text}
        if self.thought:
            message["reasoning_content"] = self.thought
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": {"content": lps} if self.want_logprobs else None,
                  "finish_reason": self._finish(last, calls)}
        return {**self._base("chat.completion"), "choices": [choice], "usage": usage(last)}

    # ---- stream chunks ---------------------------------------------------------------------------------------
    def chunk(self, delta: dict, finish=None, lps=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": lps} if self.want_logprobs and lps else None,
                  "finish_reason": finish}
        out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def chunks(self, steps: list[Step]) -> list[dict]:
        out = []
        if not self.started:
            self.started = True
            out.append(self.chunk({"role": "assistant", "content": ""}))
        text, lps = self._feed(steps)
        last = steps[-1]
        if self.reasoning:
            out.append(self.chunk({"reasoning_content": self.reasoning}))
            self.reasoning = ""
        if text or lps:
            out.append(self.chunk({"content": text}, lps=lps))
        if not last.last or last.error is not None:
            return out
        calls = self._calls(last)
        if calls:
            out.append(self.chunk({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}))
        elif self.held:
            out.append(self.chunk({"content": self.held}, lps=self.held_lp))
        out.append(self.chunk({}, finish=self._finish(last, calls)))
        if self.include_usage:
            out.append({**self._base("chat.completion.chunk"), "choices": [], "usage": usage(last)})
        return out


class CompletionOutput:
    """The legacy completions shape: text, and logprobs as tokens / token_logprobs / top_logprobs / text_offset."""

    def __init__(self, model_id: str, texts: TokenText, *, logprobs: int | None = None, echo: str = "",
                 include_usage: bool = False):
        self.id, self.created, self.model = "cmpl-" + secrets.token_hex(12), int(time.time()), model_id
        self.texts, self.want_logprobs, self.include_usage = texts, logprobs is not None, include_usage
        self.echo = echo
        self.offset = len(echo)

    def _base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": "edgephi"}

    def _logprobs(self, steps: list[Step]) -> dict | None:
        if not self.want_logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for st in steps:
            if st.logprob is None:
                continue
            token, lp, top = st.logprob
            text = self.texts.get(token)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.texts.get(i)[0]: v for i, v in top})
            out["text_offset"].append(self.offset)
            self.offset += len(st.text)
        return out

    def whole(self, steps: list[Step]) -> dict:
        last = steps[-1]
        text = self.echo + "".join(st.text for st in steps)
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(steps), "finish_reason": last.finish}
        return {**self._base(), "choices": [choice], "usage": usage(last)}

    def chunks(self, steps: list[Step]) -> list[dict]:
        last = steps[-1]
        text = self.echo + "".join(st.text for st in steps if st.error is None)
        self.echo = ""
        done = last.last and last.error is None
        out = []
        if text or done:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(steps),
                      "finish_reason": last.finish if done else None}
            out.append({**self._base(), "choices": [choice], **({"usage": None} if self.include_usage else {})})
        if done and self.include_usage:
            out.append({**self._base(), "choices": [], "usage": usage(last)})
        return out
