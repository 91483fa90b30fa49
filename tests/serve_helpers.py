"""Helpers of the serve tests: servers on 127.0.0.1 in a thread of the test process, and a tiny random Phi-4-mini
checkpoint whose tokenizer has Phi-4-mini's chat and tool tokens and its chat template."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

# microsoft/Phi-4-mini-instruct's chat template: tools ride on the system message, every role is <|role|>...<|end|>
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
    "'<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_SPECIALS = ("<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|/tool|>", "<|tool_call|>",
                 "<|/tool_call|>", "<|tool_response|>")


def phi4_tool_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a tiny phi-4-mini checkpoint whose GPT-2 tokenizer gains Phi-4-mini's special tokens (ids from
    50257, inside the model's 50304 rows) and chat template."""
    from tokenizers import AddedToken, Tokenizer

    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in PHI4_SPECIALS])
    tok.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for t in PHI4_SPECIALS:
        cfg["added_tokens_decoder"][str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    cfg["chat_template"] = PHI4_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@contextlib.contextmanager
def running(bundle, **options):
    """A server on a free port of 127.0.0.1 for the duration of the block; yields (url, server)."""
    from edgephi.serve import ServerThread, load_server

    thread = ServerThread(load_server(bundle, **options), host="127.0.0.1", port=0)
    url = thread.start()
    try:
        yield url, thread.server
    finally:
        thread.stop()


def client(url: str, key: str = "none"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=60, max_retries=0)
