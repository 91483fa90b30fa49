"""Chat templates rendered as transformers renders them, in a sandbox with bounded work and output.

A template is untrusted input (it ships inside a checkpoint or a bundle), so it runs in Jinja's immutable sandbox
with transformers' extras (``raise_exception``, ``tojson``, loop controls) and three bounds that turn a hostile or
broken template into a ValueError instead of a hang or an exhausted memory:

* ``range`` is a budgeted version: all the ranges one render makes hold at most MAX_RANGE_ITEMS items together
  (nested ``range(100000)`` loops stop at once);
* ``*`` and ``**`` may not build a string or list longer than MAX_OUTPUT characters, nor raise to huge powers;
* the output may not exceed MAX_OUTPUT characters beyond the length of the messages themselves.

Any error inside the template (Jinja's UndefinedError or SecurityError, a ZeroDivisionError, ...) becomes a
ValueError naming the template and what went wrong.

transformers' ``{% generation %} ... {% endgeneration %}`` (it marks the assistant's text for training masks; Phi-4-
reasoning's template has it) renders its body unchanged; ``portable_template`` rewrites it for engines whose Jinja
has no such tag (llama-cpp-python, onnxruntime-genai), with the same output.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

ROLES = ("system", "user", "assistant", "tool")
MAX_RANGE_ITEMS = 1_000_000
MAX_OUTPUT = 1 << 20  # characters of output beyond the messages' own text
# Phi-3-mini-4k-instruct's published template; used when a checkpoint ships none (and exported with the bundle).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


class _Budget:
    def __init__(self):
        self.items = MAX_RANGE_ITEMS

    def range(self, *args):
        r = range(*args)
        self.items -= len(r)
        if self.items < 0:
            raise ValueError(f"its loops ask for more than {MAX_RANGE_ITEMS} items")
        return r


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{k}]: needs 'role' and 'content' keys, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{k}]: unknown role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{k}]: content must be a str, got {type(m['content']).__name__}")


def render(source: str, messages, *, where: str = "chat template", **variables) -> str:
    """The template rendered with messages and variables (add_generation_prompt, bos_token, tools, ...)."""
    check_messages(messages)
    template = _compile(source, where)
    budget = _Budget()
    limit = MAX_OUTPUT + sum(len(m["content"]) for m in messages) + len(json.dumps(variables.get("tools"), default=str))
    out: list[str] = []
    size = 0
    try:
        for chunk in template.generate(messages=messages, range=budget.range, **variables):
            size += len(chunk)
            if size > limit:
                raise ValueError(f"its output passes {limit} characters")
            out.append(chunk)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - anything a template does wrong is the template's error, not ours
        raise ValueError(f"{where} failed: {e.__class__.__name__}: {e}") from None
    return "".join(out)


_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def portable_template(source: str) -> str:
    """The template with transformers' generation tags as ``{% if true %}`` blocks (same output, whitespace
    control kept), for Jinja engines that lack the tag."""
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", source)


def _raise_exception(message):
    raise ValueError(str(message))


@lru_cache(maxsize=8)
def _compile(source: str, where: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise ValueError(f"exponent {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                        raise ValueError(f"'*' would build {len(seq) * n} items")
            return super().call_binop(context, operator, left, right)

    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"{where} does not compile: {e}") from None


def _generation_tag():
    """The Jinja extension for ``{% generation %} ... {% endgeneration %}``: its body, rendered as is."""
    from jinja2.ext import Extension

    class _Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return _Generation
