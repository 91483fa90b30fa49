"""What the browser runtime must reproduce, computed with edgephi's Python side (run by `npm test` with .venv's python).

For the built-in model and a tiny random checkpoint of each Phi family (tests/tiny.py) this exports a bundle with
the web format (int4, float32 embedding, accuracy_level 0) and writes expect.json beside the bundles:

* tokenizer: ids of edgephi.tokenizer.Tokenizer.encode for texts with spaces, tabs, Unicode, special tokens;
* chat: the chat template's text and ids for a multi-turn conversation (add_generation_prompt);
* greedy: tokens of the Python ONNX backend (edgephi/backends/onnx.py, one preallocated KV buffer) on the same
  web/model.onnx, with the gap between the best two logits at each step (a near tie may flip on another engine);
  prompts run past Phi-3-mini-4k's sliding window and the LongRoPE switch; "turn2" is a second chat turn that
  keeps the cache (Runner), as the browser's chat() does.

Usage: expect.py OUT_DIR [VARIANT ...]; OUT_DIR is reused when its key (a hash of edgephi's sources, the tiny
model builders and this script) has not changed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

# the required families first; phi-3-mini-128k (LongRoPE, 4k vocab layout) and phi-3-medium (GQA) with EDGEPHI_WEB_ALL=1
VARIANTS = ("default", "phi-2", "phi-3-mini-4k", "phi-4-mini", "phi-3-mini-128k", "phi-3-medium")
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello world! How are you today?",
    "  two leading spaces,\ttabs\t\tand\n\n\nthree newlines",
    "unicode: héllo wörld — 日本語のテキスト 🙂🚀",
    "<|user|>\nspecial tokens inline<|end|>\n<|assistant|>\n",
    "numbers 12345 3.14159 -0.5e10",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a function that adds two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now add a docstring."},
]
RAW_STEPS, CHAT_STEPS, TURN2_STEPS, PAGE_STEPS = 30, 16, 12, 24
PAGE_CHAT = [{"role": "user", "content": "Write a function that returns the sum of a list."}]


def key() -> str:
    h = hashlib.sha256()
    files = sorted([*ROOT.glob("edgephi/**/*.py"), *ROOT.glob("export/**/*.py"), ROOT / "tests/tiny.py",
                    ROOT / "tests/vocab_build.py", Path(__file__)])
    files += sorted((ROOT / "edgephi/data/default-model").glob("*"))
    for f in files:
        if f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def gaps(logits: np.ndarray) -> list[float]:
    """best minus second-best logit at each step (steps, V) -> (steps,)"""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return [round(float(g), 6) for g in top2[:, 1] - top2[:, 0]]


class Runner:
    """The Python ONNX backend on one folder, keeping its cache between prompts as the browser runtime's chat()
    does: the cached prefix a prompt shares is kept (rewind), the rest evaluated.  This matters past LongRoPE's
    switch, where cached keys keep the short factors a fresh run would not use."""

    def __init__(self, folder: Path):
        from edgephi.backends.onnx import OnnxSession

        self.sess = OnnxSession(folder, threads=1, cache_optimized=False)  # pieces have no .data to key a cache on
        self.cached: list[int] = []

    def greedy(self, prompt: list[int], steps: int, keep: bool = False) -> dict:
        k = 0
        if keep:
            while k < min(len(self.cached), len(prompt)) and self.cached[k] == prompt[k]:
                k += 1
            k = min(k, len(prompt) - 1)
        self.sess.rewind(k)
        logits = [self.sess.forward(prompt[k:])]
        tokens: list[int] = []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits[-1])))
            if len(tokens) < steps:
                logits.append(self.sess.forward([tokens[-1]]))
        self.cached = prompt + tokens[:-1]
        stacked = np.stack(logits)
        return {"prompt": prompt, "tokens": tokens, "gaps": gaps(stacked), "scale": float(np.abs(stacked).max()),
                "evaluated": len(prompt) - k}

    def close(self) -> None:
        self.sess.close()


def one(variant: str, out: Path) -> dict:
    import tiny
    from edgephi.default_model import DATA as default_model
    from edgephi.export.bundle import export_bundle
    from edgephi.manifest import Manifest
    from edgephi.tokenizer import Tokenizer

    ckpt = default_model if variant == "default" else tiny.make_checkpoint(variant, out / f"ckpt-{variant}")
    bundle = out / variant
    export_bundle(str(ckpt), bundle, formats=("web",), bits=4, force=True)
    if ckpt != default_model:
        shutil.rmtree(ckpt)
    m = Manifest.load(bundle)
    tok = Tokenizer.from_dir(bundle)
    run = Runner(bundle / "web")
    chat_ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    chat = run.greedy(chat_ids, CHAT_STEPS)
    answer = tok.decode(chat["tokens"], skip_special_tokens=True)
    # a second turn over the kept cache: the first answer as the assistant's message, then a new user message
    turn2_msgs = CONVERSATION + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Thanks!"}]
    turn2 = run.greedy(tok.apply_chat_template(turn2_msgs, add_generation_prompt=True), TURN2_STEPS, keep=True)
    if variant == "default":
        raw_prompt = tok.encode("def read_config(path):\n    \"\"\"Read a JSON config file.\"\"\"\n")
    else:  # past the sliding window (48) and the LongRoPE switch (64) of the tiny models
        raw_prompt = tiny.random_prompt(50, m.spec.vocab_size, seed=1)
    raw = run.greedy(raw_prompt, RAW_STEPS)
    # short: for slow engines (WebGPU on a software adapter): 62 prompt tokens and 4 steps cross LongRoPE's switch
    short = raw if variant == "default" else run.greedy(tiny.random_prompt(62, m.spec.vocab_size, seed=2), 4)
    page = {"messages": PAGE_CHAT}
    page_tokens = run.greedy(tok.apply_chat_template(PAGE_CHAT, add_generation_prompt=True), PAGE_STEPS)["tokens"]
    run.close()
    stop = next((i for i, t in enumerate(page_tokens) if t in m.stop_ids), len(page_tokens))
    page["answer"] = tok.decode(page_tokens[:stop], skip_special_tokens=True)
    return {
        "bundle": variant, "stop_ids": m.stop_ids, "vocab_size": m.spec.vocab_size,
        "tokenizer": [{"text": t, "ids": tok.encode(t)} for t in TEXTS],
        "chat": {"messages": CONVERSATION, "text": tok.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                         tokenize=False), "ids": chat_ids,
                 "greedy": chat, "answer": answer, "answer_ids": chat["tokens"]},
        "turn2": {"messages": turn2_msgs, "greedy": turn2},
        "raw": raw, "raw_text": tok.decode(raw["tokens"], skip_special_tokens=True), "short": short, "page": page,
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    variants = argv[1:] or list(VARIANTS)
    k = key() + "-" + ",".join(variants)
    stamp = out / "expect.key"
    if stamp.is_file() and stamp.read_text() == k and (out / "expect.json").is_file():
        print(f"expect.py: {out}/expect.json is current")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    result = {v: one(v, out) for v in variants}
    (out / "expect.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    stamp.write_text(k)
    print(f"expect.py: {len(variants)} bundles and their Python results in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
