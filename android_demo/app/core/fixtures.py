"""Fixtures for the core module's JVM tests, made with edgephi's Python side (run with .venv's python).

OUT/chat.json: for each chat template the Kotlin core writes out (and some it must refuse), conversations and
the text edgephi.chat_template.render gives for them (transformers' rendering); OUT/bundle: the built-in model
exported as ONNX, whose manifest.json and tokenizer_config.json the tests read.
Usage: fixtures.py OUT
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

PHI3_5 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
          "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
          "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
          "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
             "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
             "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
             "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Sum a list?"},
     {"role": "assistant", "content": "sum(xs)"}, {"role": "user", "content": "In C?\nWith a loop."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  and ünïcödé 🙂 "}],
]


def main(out: Path) -> int:
    from tiktoken_vocab import PHI4_MINI_REASONING_TEMPLATE, PHI4_TEMPLATE

    from edgephi.chat_template import PHI3_CHAT_TEMPLATE, render
    from edgephi.export.bundle import export_bundle

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    eos = "<|endoftext|>"
    templates = {"phi3": PHI3_CHAT_TEMPLATE, "phi3.5": PHI3_5, "phi4-mini": PHI4_MINI, "phi4": PHI4_TEMPLATE}
    chat = []
    for name, tpl in templates.items():
        cases = [{"messages": conv, "add_generation_prompt": gen,
                  "text": render(tpl, conv, add_generation_prompt=gen, eos_token=eos, bos_token="<s>")}
                 for conv in CONVERSATIONS for gen in (True, False)]
        chat.append({"name": name, "template": tpl, "eos_token": eos, "cases": cases})
    # templates the core refuses (rendered by the WebView engine's Jinja instead)
    chat.append({"name": "phi4-mini-reasoning", "template": PHI4_MINI_REASONING_TEMPLATE, "eos_token": eos,
                 "cases": [], "refused": True})
    (out / "chat.json").write_text(json.dumps(chat, ensure_ascii=False, indent=1), encoding="utf-8")
    from edgephi.default_model import DATA

    export_bundle(str(DATA), out / "bundle", formats=("onnx",), bits=4, force=True)
    print(f"fixtures.py: {len(chat)} templates and a bundle in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
