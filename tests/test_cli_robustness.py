"""Bad input and bad luck on the command line and in the exporter: one-line errors naming the flag or the user's
path, exit codes, and nothing lost or left half-written (--force on a folder that is not a bundle, signals, two
exports at once, a full disk).  Runs on the built-in 4.2M-parameter model, ONNX only where it can."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgephi import cli, default_model
from edgephi.backends.base import Session
from edgephi.export import staging
from edgephi.export.bundle import export_bundle
from edgephi.sampling import make_logits_processors, make_sampler


# ---- helpers -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out, _ = export_bundle("default", tmp_path_factory.mktemp("b") / "bundle", formats=("onnx",))
    return out


@pytest.fixture()
def ckpt(tmp_path):
    return Path(shutil.copytree(default_model.checkpoint_dir(), tmp_path / "ckpt"))


def _env(home, **extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "EDGEPHI_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _cli(home, *args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "edgephi.cli", *args], capture_output=True, env=_env(home),
                          timeout=timeout, **kw)


def _main(capsys, *args) -> tuple[int, str]:
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _one_error_line(err: str | bytes) -> str:
    err = err.decode(errors="replace") if isinstance(err, bytes) else err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) >= 1, err
    assert lines[-1].startswith("edgephi: error: "), err
    return lines[-1]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


# ---- 1. --force replaces bundles only ------------------------------------------------------------------------
def test_force_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not an edgephi bundle"):
        export_bundle("default", out, formats=("onnx",), force=True)
    assert (out / "thesis.tex").read_text() == "years of work" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["a file", "a foreign manifest.json"])
def test_force_refuses_files_and_foreign_manifests(tmp_path, what):
    out = tmp_path / "web"
    if what == "a file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    with pytest.raises(FileExistsError, match="--force only replaces"):
        export_bundle("default", out, formats=("onnx",), force=True)
    assert (out.read_text() if what == "a file" else (out / "manifest.json").read_text()) != ""


def test_force_never_deletes_the_checkpoint_or_a_folder_holding_it(tmp_path, ckpt):
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(FileExistsError, match="checkpoint"):
        export_bundle(str(ckpt), ckpt, formats=("onnx",), force=True)
    # the parent even looks like a bundle: still refused
    (tmp_path / "manifest.json").write_text(json.dumps({"edgephi_version": "0", "formats": {}}))
    with pytest.raises(FileExistsError, match="checkpoint"):
        export_bundle(str(ckpt), tmp_path, formats=("onnx",), force=True)
    assert sorted(p.name for p in ckpt.iterdir()) == before and (ckpt / "model.safetensors").stat().st_size > 0


def test_cli_force_on_user_files_is_one_line(tmp_path, capsys, ckpt):
    rc, err = _main(capsys, "export", ckpt, "--format", "onnx", "-o", ckpt, "--force", "-q")
    assert rc == 1 and "checkpoint" in _one_error_line(err) and (ckpt / "model.safetensors").is_file()


def test_force_replaces_an_empty_folder_and_a_bundle(tmp_path, bundle):
    out = tmp_path / "empty"
    out.mkdir()
    export_bundle("default", out, formats=("onnx",), force=True)
    copy = shutil.copytree(bundle, tmp_path / "copy")
    export_bundle("default", copy, formats=("onnx",), force=True)
    assert (out / "manifest.json").is_file() and (copy / "manifest.json").is_file()
    assert _leftovers(tmp_path) == []


# ---- 2. signals ------------------------------------------------------------------------------------------------
def _start_export(home, out, *fmt_args):
    return subprocess.Popen([sys.executable, "-m", "edgephi.cli", "export", "default", *fmt_args, "-o", str(out),
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(home))


def test_sigterm_during_export_cleans_up_and_exits_143(tmp_path, home):
    out = tmp_path / "b"
    p = _start_export(home, out, "--format", "onnx,gguf", "--bits", "16")
    assert _wait_for(lambda: any(".partial-" in n for n in _leftovers(tmp_path)))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err.decode()
    assert not out.exists() and _leftovers(tmp_path) == [] and b"Traceback" not in err


def test_sigint_during_the_coremltools_import_is_not_swallowed(tmp_path, home):
    pytest.importorskip("coremltools")
    out = tmp_path / "b"
    p = _start_export(home, out, "--format", "coreml")
    # coremltools is imported once the staging folder is there; it imports torch, sympy, ... inside bare `except:`
    # clauses, which used to eat the KeyboardInterrupt: the export then went on and exited 0
    assert _wait_for(lambda: any(".partial-" in n for n in _leftovers(tmp_path)) or p.poll() is not None)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, -signal.SIGINT), err.decode()[-2000:]
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def python_sigint():
    """SIGINT as the CLI sets it (edgephi/cli.py: Python's default handler), whatever an earlier test in this
    process left installed (a clean-clone run once found a handler there that did not raise); restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_swallowed_or_held_interrupt_still_stops_the_export(python_sigint):
    with staging.Interrupts() as interrupts:
        try:  # a library's bare `except:` eats the KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:
            pass
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    with staging.Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached = True  # the signal waited for the block's end
        assert reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigkill_leftovers_are_cleaned_by_the_next_export(tmp_path, home):
    out = tmp_path / "b"
    p = _start_export(home, out, "--format", "onnx,gguf", "--bits", "16")
    assert _wait_for(lambda: any(".partial-" in n for n in _leftovers(tmp_path)))
    p.kill()
    p.wait(timeout=30)
    assert any(".partial-" in n for n in _leftovers(tmp_path))
    export_bundle("default", out, formats=("onnx",))
    assert (out / "manifest.json").is_file() and _leftovers(tmp_path) == []


def test_a_killed_force_export_gets_the_old_bundle_back(tmp_path, bundle):
    out = tmp_path / "b"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    shutil.copytree(bundle, tmp_path / f".b.old-{int(dead.stdout)}")  # killed between its two renames
    with pytest.raises(FileExistsError, match="already exists"):
        export_bundle("default", out, formats=("onnx",))
    assert (out / "manifest.json").is_file() and _leftovers(tmp_path) == []


# ---- 3. one export per path ----------------------------------------------------------------------------------
def test_second_export_waits_for_the_first_then_says_already_exists(tmp_path, home, bundle):
    out = tmp_path / "b"
    with staging.locked(out):  # an export to `out` in progress
        p = _start_export(home, out, "--format", "onnx")
        first = p.stderr.readline()  # p reached the lock and waits on it
        assert b"another export to it is running" in first and p.poll() is None, first
        shutil.copytree(bundle, out)  # the first export's bundle lands
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "already exists" in _one_error_line(err)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((bundle / "manifest.json").read_text())
    assert _leftovers(tmp_path) == []


# ---- 4. flags ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (("--max-tokens", "0"), "--max-tokens 0: must be >= 1"),
    (("--max-tokens", "-5"), "--max-tokens -5: must be >= 1"),
    (("--ctx", "0"), "--ctx 0: must be >= 1"),
    (("--ctx", "-1"), "--ctx -1"),
    (("--temperature", "-1"), "--temperature -1: must be >= 0"),
    (("--temperature", "nan"), "--temperature nan"),
    (("--top-p", "0"), "--top-p 0"),
    (("--top-p", "1.5"), "--top-p 1.5"),
    (("--top-k", "-1"), "--top-k -1"),
    (("--min-p", "1"), "--min-p 1"),
    (("--repetition-penalty", "nan"), "--repetition-penalty nan: must be a finite number"),
    (("--repetition-penalty", "inf"), "--repetition-penalty inf"),
    (("--repetition-penalty", "0"), "--repetition-penalty 0"),
    (("--threads", "0"), "--threads 0"),
    (("--stop", ""), "--stop"),
])
def test_generation_flags_are_refused_by_name(capsys, bundle, flags, words):
    for command in ("run", "chat"):
        extra = ("-p", "hi") if command == "run" else ()
        rc, err = _main(capsys, command, bundle, *extra, *flags)
        assert rc == 1 and words in _one_error_line(err), err


@pytest.mark.parametrize("flags, words", [
    (("--format", ","), "--format ','"),
    (("--format", " , ,"), "names no format"),
    (("--format", "onnx", "--gguf-quant", "q8_0"), "--gguf-quant"),
    (("--format", "gguf", "--onnx-asym"), "--onnx-asym"),
])
def test_export_flags_are_refused_by_name(tmp_path, capsys, flags, words):
    rc, err = _main(capsys, "export", "default", *flags, "-o", tmp_path / "b", "-q")
    assert rc == 1 and words in _one_error_line(err) and list(tmp_path.iterdir()) == []


def test_library_refuses_empty_formats_and_stray_options(tmp_path):
    with pytest.raises(ValueError, match="no format"):
        export_bundle("default", tmp_path / "b", formats=())
    with pytest.raises(ValueError, match="gguf"):
        export_bundle("default", tmp_path / "b", formats=("onnx",), options={"gguf": {"quant": "q8_0"}})
    assert list(tmp_path.iterdir()) == []


def test_long_output_names(tmp_path, capsys):
    rc, err = _main(capsys, "export", "default", "--format", "onnx", "-o", tmp_path / ("x" * 250), "-q")
    assert rc == 0 and (tmp_path / ("x" * 250) / "manifest.json").is_file() and _leftovers(tmp_path) == []
    rc, err = _main(capsys, "export", "default", "--format", "onnx", "-o", tmp_path / ("y" * 300), "-q")
    line = _one_error_line(err)
    assert rc == 1 and "y" * 300 in line and "at most" in line
    assert ".partial-" not in line and _leftovers(tmp_path) == []


def test_sampling_refuses_non_finite_values():
    for kwargs in ({"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan}, {"top_k": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_sampler(**kwargs)
    for value in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="repetition_penalty"):
            make_logits_processors(value)


def test_api_refuses_max_tokens_below_one(bundle):
    import edgephi

    m = edgephi.load(bundle, format="onnx")
    for n in (0, -5):
        with pytest.raises(ValueError, match="max_tokens"):
            m.generate("hi", max_tokens=n)
    assert len([r for r in m.stream("hi", max_tokens=1) if r.token is not None]) <= 1
    m.close()


# ---- 5. text that is not UTF-8 -------------------------------------------------------------------------------
def test_run_prompt_that_is_not_utf8(home, bundle, capsys):
    r = _cli(home, "run", str(bundle), "-p", b"caf\xe9 \xff")
    assert r.returncode == 1 and "prompt is not valid UTF-8" in _one_error_line(r.stderr)
    rc, err = _main(capsys, "run", bundle, "-p", "hi", "--system", "x\udcfe")
    assert rc == 1 and "--system is not valid UTF-8" in _one_error_line(err)


def test_chat_line_that_is_not_utf8_is_refused_and_chat_goes_on(home, bundle):
    r = _cli(home, "chat", str(bundle), "--max-tokens", "3", input=b"a\xffb\nhello\n/exit\n")
    err = r.stderr.decode()
    assert r.returncode == 0 and "not valid UTF-8" in err and "Traceback" not in err
    assert re.search(rb"\[\d+ tokens", r.stdout)  # the next line was answered


# ---- 6. a full disk --------------------------------------------------------------------------------------------
@pytest.fixture()
def tmpfs(tmp_path):
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_run_with_a_full_cache_disk_still_runs(tmpfs, bundle):
    full = tmpfs("64k")
    (full / "fill").write_bytes(b"\0" * 60_000)
    r = _cli(full, "run", str(bundle), "-p", "hi", "--max-tokens", "3")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr.decode()


@pytest.mark.parametrize("size, fmt", [("1m", "onnx"), ("10m", "gguf")])
def test_export_on_a_full_disk_is_one_line_naming_the_bundle(tmpfs, size, fmt):
    fs = tmpfs(size)
    out = fs / "bundles" / "default"
    r = _cli(fs, "export", "default", "--format", fmt, "-o", str(out), "-q")
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "no space left on device" in line and "nothing was kept" in line, line
    assert str(out) in line and ".partial-" not in line and ".tmp" not in line, line
    assert list((fs / "bundles").iterdir()) == []


def test_run_default_on_a_full_disk_is_one_line(tmpfs):
    fs = tmpfs("300k")
    r = _cli(fs, "run", "-p", "hi", "--max-tokens", "2")
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "no space left on device" in line and ".partial-" not in line, line


def test_stdout_on_a_full_disk(home, bundle):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "edgephi.cli", "run", str(bundle), "-p", "hi", "--max-tokens", "3"],
                           stdout=full, stderr=subprocess.PIPE, env=_env(home), timeout=120)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "standard output" in line and "nothing was kept" not in line


# ---- 7. token ids outside the vocabulary -----------------------------------------------------------------------
def test_onnx_forward_refuses_ids_outside_the_vocabulary(bundle):
    from edgephi.backends.onnx import OnnxBackend

    s = OnnxBackend.open(bundle, None, "cpu", n_ctx=64)
    for ids, bad in (([-1], "-1"), ([5, s.vocab], str(s.vocab)), ([10**9], str(10**9))):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            s.forward(ids)
    assert s.n_past == 0 and s.forward([1, 2]).shape == (s.vocab,)
    s.close()


def test_the_shared_id_check():
    class S(Session):
        n_ctx = 8

        def forward(self, ids, all_logits=False):
            return self.check_ids(ids, 10)

        def rewind(self, n):
            pass

    s = S()
    assert s.forward([0, 9]).tolist() == [0, 9] and s.forward(np.array([3], np.int32)).dtype == np.int64
    for ids, words in (([], "no token ids"), ([10], "token id 10"), ([-1], "token id -1"), ([1.5], "whole"),
                       ([True], "whole")):
        with pytest.raises(ValueError, match=words):
            s.forward(ids)


# ---- 8. errors name the user's paths, not the staging folder ---------------------------------------------------
def test_errors_name_final_paths_not_staging(tmp_path):
    out = tmp_path / "b"
    stage = staging.sibling(out, "partial", 123)
    e = OSError(28, "No space left on device", str(stage / "gguf" / ".model-f16.tmp.gguf"))
    staging.name_user_paths(e, stage, out)
    assert e.filename == str(out / "gguf")
    e = RuntimeError(f"{stage}/gguf/.model-f16.tmp.gguf: llama.cpp's quantizer failed")
    staging.name_user_paths(e, stage, out)
    assert str(e) == f"{out}/gguf: llama.cpp's quantizer failed"
    e = ValueError(f"cannot write '{stage}/onnx/model.onnx.data'")
    staging.name_user_paths(e, stage, out)
    assert str(e) == f"cannot write '{out}/onnx/model.onnx.data'"
    long = tmp_path / ("z" * 250)
    assert len(staging.sibling(long, "partial", 4194304).name) < 200
