"""edgephi chat driven in a real terminal (pexpect pty): cache reuse counted, Ctrl-C, /reset, context full."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgephi.tokenizer import Tokenizer

pexpect = pytest.importorskip("pexpect")
EDGEPHI = str(Path(sys.executable).with_name("edgephi"))
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, ttft \d+ ms, prompt (\d+) tokens at [\d.]+ tok/s, (\w+)\]")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    out = home / "bundle"
    env = {**os.environ, "EDGEPHI_HOME": str(home)}
    subprocess.run([EDGEPHI, "export", "default", "--format", "onnx", "--bits", "16", "-o", str(out), "-q"],
                   check=True, env=env, capture_output=True, timeout=300)
    return out, env


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _spawn(bundle, *extra, preexec_fn=None):
    out, env = bundle
    child = pexpect.spawn(EDGEPHI, ["chat", str(out), "--format", "onnx", *extra], env=env, encoding="utf-8",
                          timeout=60, dimensions=(40, 200), preexec_fn=preexec_fn)
    child.expect(">>> ")
    return child


def _turn(child, text):
    child.sendline(text)
    child.expect(STATS)
    m = child.match
    child.expect(">>> ")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def test_two_turns_second_evaluates_only_its_new_tokens(bundle):
    tok = Tokenizer.from_dir(bundle[0])
    child = _spawn(bundle, "--max-tokens", "12")
    n1, p1, finish1 = _turn(child, "Hello there, who are you?")
    first_prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there, who are you?"}],
                                           add_generation_prompt=True)
    assert p1 == len(first_prompt)
    n2, p2, _ = _turn(child, "Tell me more.")
    # the second turn's new tokens: the text the template puts after the first answer
    msgs = [{"role": "user", "content": "Hello there, who are you?"}, {"role": "assistant", "content": "ANSWER"},
            {"role": "user", "content": "Tell me more."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    suffix = text[text.index("ANSWER") + len("ANSWER"):]
    unfed = 1 if finish1 == "length" else 0  # the last sampled token of a cut-off answer was never evaluated
    assert p2 == len(tok.encode(suffix)) + unfed
    assert p2 < p1 + n1  # far less than the whole conversation
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session_then_reset(bundle):
    # answers end at the context: 2048 tokens take the tiny default model about 2 s, long enough for Ctrl-C to land
    # started with SIGINT ignored, as a background job or some CI runners start it: chat must still take Ctrl-C
    child = _spawn(bundle, "--max-tokens", "100000", "--ctx", "2048", preexec_fn=_ignore_sigint)
    child.sendline("Write a very long story.")
    child.expect_exact("Write a very long story.")  # the terminal's echo of the line, not yet the answer
    child.expect(r"\S", timeout=30)  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    n, p, finish = _turn(child, "Short answer please.")  # the session survived and answers again
    assert finish in ("length", "stop", "context")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect(">>> ")
    _turn(child, "Hi again.")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_full_is_a_clear_message(bundle):
    child = _spawn(bundle, "--ctx", "64", "--max-tokens", "8")
    child.sendline("word " * 80)
    child.expect(r"context full.*/reset starts a new conversation")
    child.expect(">>> ")
    _turn(child, "ok")  # still usable
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_run_prompt_longer_than_context_fails_in_one_line(bundle):
    out, env = bundle
    r = subprocess.run([EDGEPHI, "run", str(out), "--ctx", "32", "-p", "word " * 100], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "context" in lines[0] and "Traceback" not in r.stderr


def test_run_min_tokens_holds_the_stop_tokens_back(bundle):
    out, env = bundle

    def run(*extra):  # -v prints the stats line (and would print a traceback)
        return subprocess.run([EDGEPHI, "run", str(out), "--raw", "-p", "import os\n", "--max-tokens", "30", *extra],
                              capture_output=True, text=True, env=env, timeout=120)

    free, held = run("-v"), run("-v", "--min-tokens", "30")
    assert free.returncode == 0 and held.returncode == 0, held.stderr
    assert STATS.search(free.stderr).group(3) == "stop" and int(STATS.search(free.stderr).group(1)) < 30  # premise
    m = STATS.search(held.stderr)
    assert m.group(3) == "length" and int(m.group(1)) == 30 and held.stdout.startswith(free.stdout.rstrip("\n"))
    bad = run("--min-tokens", "31")
    assert bad.returncode == 1 and "--min-tokens 31" in bad.stderr and "Traceback" not in bad.stderr
