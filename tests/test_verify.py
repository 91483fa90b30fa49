"""The device self-check (edgephi/verify.py) on simulated machines, and the real check between this machine's
ONNX and llama.cpp CPU backends."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

import tiny
from edgephi import select as selection, verify
from edgephi.backends.base import BACKENDS, Backend
from edgephi.backends.onnx import OnnxBackend
from edgephi.devices import Probe
from edgephi.export.bundle import export_bundle

GPU_BOX = Probe(system="Linux", machine="x86_64", cpu_count=8, cuda=True,
                ort_providers=("CPUExecutionProvider",), modules=frozenset({"llama_cpp"}))
STATE = {"bad": False, "opens": 0}


class FakeGpu(Backend):
    """An accelerator whose probe passes; its arithmetic is the CPU's, plus noise when STATE["bad"]."""

    name, format, devices = "fakegpu", "onnx", ("cuda",)

    @classmethod
    def unavailable_reason(cls, probe, device):
        return None if probe.cuda else "no GPU"

    @classmethod
    def open(cls, bundle_dir, manifest, device, **options):
        STATE["opens"] += 1
        session = OnnxBackend.open(bundle_dir, manifest, "cpu", **options)
        if STATE["bad"]:
            plain = session.forward

            def noisy(ids, all_logits=False):
                out = plain(ids, all_logits)
                return out + np.random.default_rng(len(ids)).normal(0, 3.0, out.shape).astype(np.float32)

            session.forward = noisy
        return session


@pytest.fixture()
def machine(monkeypatch, tmp_path):
    """This process sees FakeGpu first on CUDA; verdicts go to a fresh cache."""
    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "home"))
    selection.load_backends()
    monkeypatch.setitem(BACKENDS, FakeGpu.name, FakeGpu)
    monkeypatch.setitem(selection.BACKEND_ORDER, "cuda", (FakeGpu.name,) + selection.BACKEND_ORDER["cuda"])
    STATE.update(bad=False, opens=0)
    return GPU_BOX


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out, _ = export_bundle(str(tiny_checkpoint("phi-3-mini-4k")), tmp_path_factory.mktemp("v") / "bundle",
                           formats=("onnx", "gguf"), bits=16)
    return out


def _load(bundle, probe, **kwargs):
    import edgephi

    model = edgephi.load(bundle, probe=probe, **kwargs)
    model.close()
    return model


def test_an_accelerator_that_fails_its_check_is_passed_over_with_the_reason(bundle, machine):
    STATE["bad"] = True
    model = _load(bundle, machine)
    assert (model.backend, model.device) == ("onnx", "cpu")
    assert "fakegpu" in model.choice.explain() and "failed its device check" in model.choice.explain()
    verdict = verify.cached(bundle, "fakegpu", "cuda")
    assert verdict is not None and not verdict.ok and "logits differ" in verdict.detail
    opens = STATE["opens"]
    _load(bundle, machine)  # the failed verdict is kept: not checked again
    assert STATE["opens"] == opens


def test_a_passing_accelerator_is_cached_and_trusted_next_time(bundle, machine):
    model = _load(bundle, machine)
    assert (model.backend, model.device) == ("fakegpu", "cuda")
    assert STATE["opens"] == 2  # the check, then the session
    verdict = verify.cached(bundle, "fakegpu", "cuda")
    assert verdict.ok and verdict.tokens == f"{verify.STEPS}/{verify.STEPS} greedy tokens agree"
    _load(bundle, machine)
    assert STATE["opens"] == 3  # trusted from the cache: no second check


def test_a_changed_bundle_or_library_asks_again(bundle, machine, monkeypatch, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    _load(copy, machine)
    assert STATE["opens"] == 2
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["created"] = "2030-01-01T00:00:00Z"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _load(copy, machine)
    assert STATE["opens"] == 4  # another bundle: checked again
    plain = verify.library_versions
    monkeypatch.setattr(verify, "library_versions", lambda: {**plain(), "onnxruntime": "99.0"})
    _load(copy, machine)
    assert STATE["opens"] == 6  # another onnxruntime: checked again


def test_forcing_an_unverified_device_runs_it_with_a_note(bundle, machine, caplog):
    with caplog.at_level(logging.WARNING, logger="edgephi.api"):
        model = _load(bundle, machine, device="cuda")
    assert (model.backend, model.device) == ("fakegpu", "cuda") and STATE["opens"] == 1
    assert "has not been verified" in caplog.text and "devices --verify" in caplog.text


def test_verify_all_checks_every_accelerator_and_lists_the_references(bundle, machine):
    rows = {(b, d): v for b, d, v in verify.verify_all(bundle, machine)}
    assert rows[("onnx", "cpu")] == "reference (CPU)"
    assert rows[("fakegpu", "cuda")].ok and "fakegpu on cuda: verified" in rows[("fakegpu", "cuda")].line()


def test_the_real_check_between_llamacpp_and_onnx_on_this_cpu(bundle, tiny_checkpoint, tmp_path, monkeypatch):
    """llama.cpp against onnxruntime on the same 16-bit bundle passes; a GGUF of another model (same shape, other
    weights) swapped into the bundle fails."""
    pytest.importorskip("llama_cpp")
    from edgephi.backends.llamacpp import LlamaCppBackend
    from edgephi.manifest import Manifest

    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "home"))
    good = verify.check(bundle, Manifest.load(bundle), LlamaCppBackend, "cpu", reference="onnx")
    assert good.ok, good.line()
    other = tiny.make_checkpoint("phi-3-mini-4k", tmp_path / "other", seed=7)
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    other_bundle, _ = export_bundle(str(other), tmp_path / "ob", formats=("gguf",), bits=16)
    gguf = next((swapped / "gguf").glob("*.gguf"))
    shutil.copyfile(next((other_bundle / "gguf").glob("*.gguf")), gguf)
    bad = verify.check(swapped, Manifest.load(swapped), LlamaCppBackend, "cpu", reference="onnx")
    assert not bad.ok and bad.detail, bad.line()
