"""The bundle writer: manifest, tokenizer, --force, and nothing half-written after a failure."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from edgephi.export import registry
from edgephi.export.bundle import export_bundle
from edgephi.manifest import BundleError, Manifest


@pytest.fixture()
def fake_format():
    """A registered exporter that writes one file per tensor and can fail midway."""
    state = {"fail_after": None, "error": None}

    @registry.register("fake", bits=(4, 16))
    def export(src, out_dir, *, bits, **options):
        for i, name in enumerate(src.spec.tensor_shapes()):
            if state["fail_after"] is not None and i == state["fail_after"]:
                raise state["error"]
            src.tensors.read(name)
            (out_dir / f"{i}.bin").write_bytes(b"x" * 10)
        return registry.FormatResult("fake", [registry.relpath(p, out_dir) for p in sorted(out_dir.iterdir())],
                                     bits, f"fake{bits}", entry="fake/0.bin")

    yield state
    for table in (registry.EXPORTERS, registry.BITS, registry.REQUIRES):
        table.pop("fake")


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_bundle_has_manifest_tokenizer_and_files(tmp_path, tiny_checkpoint, fake_format):
    ckpt = tiny_checkpoint("phi-3-mini-4k")
    out, m = export_bundle(str(ckpt), tmp_path / "b", formats=("fake",), bits=4)
    again = Manifest.load(out)
    assert again.spec == m.spec and again.formats["fake"].quant == "fake4"
    assert set(again.stop_ids) >= {32000, 32001, 32007}
    assert (out / "tokenizer.json").is_file() and "tokenizer.json" in again.tokenizer_files
    assert again.source["sha256"]["model.safetensors"] and again.context_length == 256
    assert again.formats["fake"].nbytes == 10 * len(again.formats["fake"].files)


def test_existing_output_is_refused_unless_forced(tmp_path, tiny_checkpoint, fake_format):
    ckpt = str(tiny_checkpoint("phi-3-mini-4k"))
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(ckpt, out, formats=("fake",))
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="not an edgephi bundle"):  # --force replaces bundles only
        export_bundle(ckpt, out, formats=("fake",), force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_bundle(ckpt, out, formats=("fake",), force=True)  # an empty folder
    (out / "fake" / "0.bin").write_bytes(b"old")
    export_bundle(ckpt, out, formats=("fake",), force=True)  # a bundle
    assert (out / "fake" / "0.bin").read_bytes() == b"x" * 10 and (out / "manifest.json").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_export_leaves_nothing(tmp_path, tiny_checkpoint, fake_format, error):
    fake_format.update(fail_after=5, error=error)
    with pytest.raises(type(error)):
        export_bundle(str(tiny_checkpoint("phi-3-mini-4k")), tmp_path / "b", formats=("fake",))
    assert not (tmp_path / "b").exists() and _leftovers(tmp_path) == []


def test_failed_forced_export_keeps_the_old_bundle(tmp_path, tiny_checkpoint, fake_format):
    ckpt = str(tiny_checkpoint("phi-3-mini-4k"))
    out, _ = export_bundle(ckpt, tmp_path / "b", formats=("fake",))
    fake_format.update(fail_after=3, error=ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        export_bundle(ckpt, out, formats=("fake",), force=True)
    Manifest.load(out)  # still the complete old bundle
    assert _leftovers(tmp_path) == []


def test_bad_requests_fail_before_writing(tmp_path, tiny_checkpoint, fake_format):
    ckpt = str(tiny_checkpoint("phi-3-mini-4k"))
    with pytest.raises(ValueError, match="--bits 8 is not available for fake"):
        export_bundle(ckpt, tmp_path / "b", formats=("fake",), bits=8)
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        export_bundle(ckpt, tmp_path / "b", formats=("tflite",))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_incomplete_manifests(tmp_path, tiny_checkpoint, fake_format):
    out, _ = export_bundle(str(tiny_checkpoint("phi-3-mini-4k")), tmp_path / "b", formats=("fake",))
    path = out / "manifest.json"
    good = path.read_text()
    path.write_text(good[:100])
    with pytest.raises(BundleError, match="corrupt manifest"):
        Manifest.load(out)
    d = json.loads(good)
    del d["spec"]["hidden_size"]
    path.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="manifest.json"):
        Manifest.load(out)
    path.write_text(good)
    (out / "fake" / "3.bin").unlink()
    with pytest.raises(BundleError, match="3.bin"):
        Manifest.load(out)
    path.unlink()
    with pytest.raises(BundleError, match="not a complete edgephi bundle"):
        Manifest.load(out)


def _cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgephi.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("args, words", [
    (("info", "/nonexistent/bundle"), "bundle directory not found"),
    (("run", "/nonexistent/bundle", "-p", "hi"), "bundle directory not found"),
    (("export", "phi-3-mini", "--format", "onnx", "-o", "/tmp/never"), "not in the Hugging Face cache"),
    (("export", "no-such-model", "--format", "onnx"), "not a model alias"),
    (("chat", "x", "--device", "tpu"), "invalid choice: 'tpu'"),
])
def test_cli_errors_are_one_line_without_traceback(args, words, tmp_path):
    r = _cli(*args, env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgephi: error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_corrupt_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    r = _cli("info", str(tmp_path))
    assert r.returncode == 1 and "corrupt manifest" in r.stderr and len(r.stderr.strip().splitlines()) == 1
