"""Prompt caches that outlive the process (edgephi/prompt_cache.py): a prefix's KV state saved by one session and
loaded by another gives the same greedy tokens as recomputing it, evaluates only the new tokens, and a file from
another bundle or format, truncated or altered, is refused with a clear error and never used."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import tiny
from edgephi.devices import probe
from edgephi.prompt_cache import MAGIC, PromptCacheError, _state
from spec_bundles import load, tiny_bundles  # noqa: F401 - the fixture

PREFIX, SUFFIX, STEPS = 60, 6, 8  # the prefix runs past the tiny Phi-3-mini-4k's 48-token sliding window


def greedy(model, ids, n=STEPS):
    return [r.token for r in model.stream(ids, max_tokens=n, ignore_eos=True) if r.token is not None]


@pytest.mark.parametrize("fmt", ["onnx", "gguf", "onnx-npu"])
def test_saved_prefix_gives_the_same_tokens_without_recomputing_it(fmt, tiny_bundles, tmp_path):
    if fmt == "onnx-npu" and probe().qnn_htp != "emulated":
        pytest.skip("onnxruntime-qnn's x86 HTP emulation is not installed here")
    path = tiny_bundles("phi-3-mini-4k")
    ids = tiny.random_prompt(PREFIX + SUFFIX, 32064, seed=7)
    prefix, other = ids[:PREFIX], ids[:PREFIX - 20] + tiny.random_prompt(20 + SUFFIX, 32064, seed=8)
    light = fmt == "onnx-npu"  # the x86 HTP emulation takes ~0.3 s a token: the main path only
    first = load(path, fmt)
    try:
        assert first.save_prompt_cache(tmp_path / "p.kv", prefix) == PREFIX
        expected = greedy(first, ids)
        expected_other = None if light else greedy(first, other)
    finally:
        first.close()
    second = load(path, fmt, prompt_cache=tmp_path / "p.kv")
    try:
        assert second.session.n_past == PREFIX and second.session.n_evaluated == 0
        assert greedy(second, ids) == expected
        assert second.session.n_evaluated == SUFFIX + STEPS - 1  # only the new tokens were evaluated
        if light:
            return
        assert greedy(second, other) == expected_other  # a prompt that leaves the prefix inside it (rewind)
        second.load_prompt_cache(tmp_path / "p.kv")  # and loading into a used session replaces its cache
        assert greedy(second, ids) == expected
        assert second.save_prompt_cache(tmp_path / "q.kv") > PREFIX  # what the cache holds now
    finally:
        second.close()


def test_wrong_files_are_refused_and_never_used(tiny_bundles, tmp_path):
    path = tiny_bundles("phi-3-mini-4k")
    ids = tiny.random_prompt(PREFIX, 32064, seed=9)
    for fmt in ("onnx", "gguf"):
        m = load(path, fmt)
        m.save_prompt_cache(tmp_path / f"{fmt}.kv", ids)
        m.close()
    good = (tmp_path / "onnx.kv").read_bytes()
    (tmp_path / "short.kv").write_bytes(good[:-100])
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.kv").write_bytes(bytes(flipped))
    (tmp_path / "text.kv").write_text("hello")
    head_len = int.from_bytes(good[len(MAGIC):len(MAGIC) + 4], "little")
    header = json.loads(good[len(MAGIC) + 4:len(MAGIC) + 4 + head_len])
    header["tokens"] = header["tokens"][:-1]  # claims fewer tokens than its data holds
    raw = json.dumps(header).encode()
    (tmp_path / "lying.kv").write_bytes(MAGIC + len(raw).to_bytes(4, "little") + raw
                                        + good[len(MAGIC) + 4 + head_len:])
    cases = {"short.kv": "truncated", "flipped.kv": "sha256", "text.kv": "not an edgephi prompt cache",
             "gguf.kv": "format 'gguf'", "lying.kv": "truncated or padded"}
    for name, words in cases.items():
        with pytest.raises(PromptCacheError, match=words):
            load(path, "onnx", prompt_cache=tmp_path / name)
    other = load(tiny_bundles("phi-3-medium", ("onnx", "gguf")), "onnx")
    try:
        with pytest.raises(PromptCacheError, match="another bundle"):
            other.load_prompt_cache(tmp_path / "onnx.kv")
        assert other.session.n_past == 0 and other._cached == []
    finally:
        other.close()


def test_core_ml_says_what_it_would_take():
    with pytest.raises(PromptCacheError, match="MLState"):
        _state(SimpleNamespace(backend="coreml"))


def test_cli_run_saves_then_reuses_and_refuses(tiny_bundles, tmp_path):
    """`edgephi run --prompt-cache FILE --speculate ngram`: the first run saves the prompt's state, the second loads
    it (same answer), and a file from another format is refused with one line, exit status 1."""
    import subprocess
    import sys

    path = tiny_bundles("phi-3-mini-4k")
    cache = tmp_path / "run.kv"

    def run(*extra):
        cmd = [sys.executable, "-m", "edgephi.cli", "run", str(path), "--raw", "-p", "Hello world, hello world",
               "--max-tokens", "8", "-v", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    plain = run("--format", "onnx")
    first = run("--format", "onnx", "--prompt-cache", str(cache), "--speculate", "ngram")
    second = run("--format", "onnx", "--prompt-cache", str(cache))
    assert plain.returncode == first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    assert plain.stdout == first.stdout == second.stdout
    assert "tokens saved to" in first.stderr and "tokens from" in second.stderr
    assert "prompt 1 tokens" in second.stderr  # only the prompt's last token was evaluated again
    wrong = subprocess.run([sys.executable, "-m", "edgephi.cli", "run", str(path), "--raw", "-p", "Hello",
                            "--format", "gguf", "--prompt-cache", str(cache)], capture_output=True, text=True,
                           timeout=300)
    assert wrong.returncode == 1 and wrong.stderr.strip().count("\n") == 0
    assert "format 'onnx'" in wrong.stderr and "not used" in wrong.stderr
