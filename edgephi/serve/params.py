"""Requests as OpenAI sends them, checked field by field: every bad value becomes an APIError (HTTP 400 with
OpenAI's error object naming the parameter), never an exception that reaches the client as a traceback."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGES = 1024
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 5
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024
PENALTY = (-2.0, 2.0)


class APIError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _number(body: dict, key: str, default, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"expected a number, got {value!r:.40}")
    if lo is not None and (value < lo or (lo_open and value == lo)) or hi is not None and value > hi:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise bad(key, f"{value!r} is outside {span}")
    return value


def _integer(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"expected an integer, got {value!r:.40}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise bad(key, f"{value} is outside [{lo}, {hi if hi is not None else '∞'}]")
    return value


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(key, f"expected true or false, got {value!r:.40}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


@dataclass
class Sampling:
    """What every endpoint shares: sampling, limits, stop rules, output options."""

    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # vLLM's: the stop tokens cannot be drawn before this many tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; else how many alternatives per position (0..5)
    grammar: str | None = None  # an llguidance grammar the answer must match
    logit_bias: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def sampling(body: dict, *, default_max_tokens: int | None) -> Sampling:
    """The fields chat and completions share (OpenAI's names; top_k, min_p and repetition_penalty as llama.cpp's
    server takes them)."""
    if _integer(body, "n", 1, 1) != 1:
        raise bad("n", "only n=1 is supported")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 1)
    s = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0),
        min_p=_number(body, "min_p", 0.0, 0.0, 0.999),
        repetition_penalty=_number(body, "repetition_penalty", None, 0.0, 10.0, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, *PENALTY),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, *PENALTY),
        seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 64 - 1),
        min_tokens=_integer(body, "min_tokens", 0, 0, max_tokens),
        stop=_stop(body),
        stream=_bool(body, "stream", False),
    )
    s.logit_bias = _logit_bias(body)
    if s.seed is not None and s.seed < 0:
        s.seed &= (1 << 64) - 1  # numpy's generator takes a non-negative seed; OpenAI's may be negative
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "expected an object")
        if not s.stream:
            raise bad("stream_options", "only allowed when stream is true")
        s.include_usage = _bool(options, "include_usage", False)
    return s


def _logit_bias(body: dict) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"expected an object of at most {MAX_LOGIT_BIAS} token ids")
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise bad("logit_bias", f"{key!r:.20}: expected a token id and a bias in [-100, 100]")
        out[int(key)] = float(value)
    return out


def chat_logprobs(body: dict) -> int | None:
    if not _bool(body, "logprobs", False):
        if body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "needs logprobs: true")
        return None
    return _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)


def completion_logprobs(body: dict) -> int | None:
    return _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)


def response_format(body: dict):
    """None (free text), True (any JSON object) or a JSON schema (dict)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad("response_format", "expected {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema", "expected {\"name\": ..., \"schema\": {...}}")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", "expected a JSON schema object")
        return schema
    raise bad("response_format.type", f"{kind!r:.40} is not one of text, json_object, json_schema")


def content_text(content, param: str) -> str:
    """A message's content: a string, null, or a list of text parts (OpenAI's content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text") \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{param}[{k}]", f"only text parts are supported, got {kind!r:.40}")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(param, f"expected a string or a list of text parts, got {type(content).__name__}")


def messages(body: dict) -> list[dict]:
    """The conversation with each message checked; roles as OpenAI names them (developer is a system message)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of messages")
    if len(msgs) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages, got {len(msgs)}")
    out = []
    for k, m in enumerate(msgs):
        where = f"messages[{k}]"
        if not isinstance(m, dict):
            raise bad(where, "expected an object with role and content")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}.role", f"{role!r:.40} is not one of system, developer, user, assistant, tool")
        calls = m.get("tool_calls") if role == "assistant" else None
        if m.get("content") is None and (role != "assistant" or not calls):
            raise bad(f"{where}.content", "missing")
        msg = {"role": role, "content": content_text(m.get("content"), f"{where}.content")}
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        out.append(msg)
    return out


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(where, "expected a list")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}[{k}]", "expected {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise bad(f"{where}[{k}].function.arguments", "expected a JSON string")
        out.append({"id": c.get("id"), "name": fn["name"], "arguments": args})
    return out
