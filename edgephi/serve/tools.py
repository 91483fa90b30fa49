"""Tool calling: the tools in the prompt, calls parsed out of the answer, and required calls forced by a grammar.

Two formats (README, "Serve"):

* **Phi-4-mini's own**, where the tokenizer has its tokens: the tools as a JSON list between ``<|tool|>`` and
  ``<|/tool|>`` at the end of the system message, calls as ``<|tool_call|>[{"name": ..., "arguments": {...}}]
  <|/tool_call|>``, results as ``tool`` messages (rendered by the chat template when it renders that role).
* **generic**, for every other model: the same JSON list between ``<tools>`` and ``</tools>`` after a short
  instruction in the system message, calls as ``<tool_call>[...]</tool_call>``, results as user messages
  ``<tool_response>...</tool_response>`` when the template does not render the ``tool`` role.

A call is recognised when the answer starts with the call marker (after whitespace), streamed or not.  With
``tool_choice`` "required" or a named function the answer is generated under an llguidance grammar: the marker,
then calls whose name is a listed function and whose arguments validate against its parameters, then the end.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from ..constrain import JSON_STYLE, lark_grammar
from .params import MAX_TOOLS, bad

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_PARALLEL_CALLS = 8
DEFAULT_SYSTEM = "You are a helpful assistant with some tools."


@dataclass(frozen=True)
class ToolFormat:
    name: str
    call_open: str
    call_close: str
    special: bool  # the markers are special tokens (the grammar names them as tokens)


PHI4 = ToolFormat("phi-4-mini", "<|tool_call|>", "<|/tool_call|>", True)
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", False)
PHI4_TOKENS = ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>")


def tool_format(tokenizer) -> ToolFormat:
    return PHI4 if all(tokenizer.token_to_id(t) is not None for t in PHI4_TOKENS) else GENERIC


def renders_tool_role(tokenizer) -> bool:
    """Whether the chat template writes ``tool`` messages (Phi-3's drops roles it does not know)."""
    mark = "\u2063edgephi-tool\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": mark}],
                                             add_generation_prompt=True, tokenize=False)
    except ValueError:
        return False
    return mark in text


@dataclass
class Tools:
    functions: list[dict]  # {"name", "description"?, "parameters"?}
    choice: str  # "none", "auto", "required" or "function" (then `name`)
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def parse_tools(body: dict) -> Tools | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad("tools", f"expected a list of at most {MAX_TOOLS} tools")
    functions = []
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise bad(f"tools[{k}]", "expected {\"type\": \"function\", \"function\": {\"name\": [A-Za-z0-9_.-]{1,64}, "
                      "\"description\", \"parameters\"}}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad(f"tools[{k}].function.parameters", "expected a JSON schema object")
        if not isinstance(fn.get("description", ""), str):
            raise bad(f"tools[{k}].function.description", "expected a string")
        entry = {"name": fn["name"], **({"description": fn["description"]} if fn.get("description") else {}),
                 "parameters": params}
        functions.append(entry)
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad("tools", "function names must be unique")
    out = Tools(functions, "auto", parallel=body.get("parallel_tool_calls", True) is not False)
    if choice is None or choice in ("none", "auto", "required"):
        out.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and choice["function"].get("name") in names:
        out.choice, out.name = "function", choice["function"]["name"]
    else:
        raise bad("tool_choice", "expected none, auto, required or {\"type\": \"function\", \"function\": "
                  "{\"name\": <one of the tools>}}")
    return out


def render_messages(messages: list[dict], tools: Tools | None, fmt: ToolFormat, tool_role: bool) -> list[dict]:
    """Plain {role, content} messages for the chat template: tools described in the system message, earlier calls
    and their results written in the format the model reads."""
    out = []
    for m in messages:
        content = m["content"]
        if m.get("tool_calls"):
            calls = [{"name": c["name"], "arguments": _json_or_text(c["arguments"])} for c in m["tool_calls"]]
            content += fmt.call_open + json.dumps(calls, ensure_ascii=False) + fmt.call_close
        if m["role"] == "tool" and not tool_role:
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools is not None and tools.choice != "none":
        listed = json.dumps(tools.functions, ensure_ascii=False)
        if fmt is PHI4:
            extra = f"<|tool|>{listed}<|/tool|>"
        else:
            extra = ("\n\nYou can call these tools (JSON Schema parameters):\n<tools>\n" + listed + "\n</tools>\n"
                     "To call tools, answer with nothing but <tool_call>[{\"name\": \"<tool name>\", \"arguments\": "
                     "{<its arguments>}}]</tool_call>")
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + extra}
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + extra})
    return out


def _json_or_text(value):
    if isinstance(value, dict):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def call_schema(fn: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def grammar(tools: Tools | None, fmt: ToolFormat) -> str | None:
    """The llguidance grammar of a forced call (tool_choice required or a named function), else None."""
    if tools is None or not tools.forced:
        return None
    fns = [f for f in tools.functions if tools.choice == "required" or f["name"] == tools.name]
    schema = call_schema(fns[0]) if len(fns) == 1 else {"anyOf": [call_schema(f) for f in fns]}
    schema["x-guidance"] = JSON_STYLE
    more = f' (", " call){{0,{MAX_PARALLEL_CALLS - 1}}}' if tools.parallel and tools.choice == "required" else ""
    open_, close = (fmt.call_open, fmt.call_close) if fmt.special else (json.dumps(fmt.call_open),
                                                                         json.dumps(fmt.call_close))
    return lark_grammar(f'start: {open_} "[" call{more} "]" {close}\ncall: %json {json.dumps(schema)}\n')


def starts_call(raw: str, fmt: ToolFormat) -> bool | None:
    """True once the answer starts with the call marker, False once it cannot, None while it still may."""
    head = raw.lstrip()
    if head.startswith(fmt.call_open):
        return True
    return None if fmt.call_open.startswith(head) else False


def parse_calls(raw: str, fmt: ToolFormat, tools: Tools) -> list[dict] | None:
    """OpenAI tool_calls from an answer that starts with the call marker; None when it is not a valid call."""
    if starts_call(raw, fmt) is not True:
        return None
    body = raw.lstrip()[len(fmt.call_open):]
    end = body.find(fmt.call_close)
    body = body[:end] if end >= 0 else body
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    data = [data] if isinstance(data, dict) else data
    names = {f["name"] for f in tools.functions}
    if not isinstance(data, list) or not data:
        return None
    calls = []
    for d in data:
        if not isinstance(d, dict) or d.get("name") not in names:
            return None
        args = d.get("arguments", d.get("parameters", {}))
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": d["name"], "arguments": args if isinstance(args, str)
                                   else json.dumps(args, ensure_ascii=False)}})
    return calls
