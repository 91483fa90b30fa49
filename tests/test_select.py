"""Backend selection on simulated machines: what is probed is injected, the registry answers."""
from __future__ import annotations

import pytest

from edgephi.devices import Probe, probe
from edgephi.select import DeviceUnavailableError, availability, select

ALL = ("onnx", "gguf", "coreml")
LINUX_CPU = Probe(system="Linux", machine="x86_64", cpu_count=2, ort_providers=("CPUExecutionProvider",),
                  modules=frozenset({"llama_cpp", "onnxruntime_genai"}))
MAC = Probe(system="Darwin", machine="arm64", macos_version=(15, 1), cpu_count=10,
            ort_providers=("CoreMLExecutionProvider", "CPUExecutionProvider"), llama_gpu_offload=True,
            modules=frozenset({"llama_cpp", "coremltools"}))
OLD_MAC = Probe(system="Darwin", machine="x86_64", macos_version=(13, 6), cpu_count=8,
                ort_providers=("CPUExecutionProvider",), modules=frozenset({"llama_cpp", "coremltools"}))
CUDA_BOX = Probe(system="Linux", machine="x86_64", cpu_count=16, cuda=True, llama_gpu_offload=True,
                 ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), modules=frozenset({"llama_cpp"}))


def pick(formats, device="auto", format=None, p=LINUX_CPU):
    c = select(formats, device=device, format=format, probe=p)
    return c.backend.name, c.device


def test_linux_cpu_machine():
    assert pick(ALL) == ("onnx", "cpu")  # the faster CPU backend in benchmarks/results
    assert pick(("gguf",)) == ("llamacpp", "cpu")
    assert pick(ALL, format="onnx") == ("onnx", "cpu")
    no_llama = Probe(**{**LINUX_CPU.__dict__, "modules": frozenset()})
    with pytest.raises(DeviceUnavailableError, match="llama-cpp-python is not installed"):
        select(("gguf",), probe=no_llama)


def test_apple_silicon_prefers_the_neural_engine_then_metal():
    assert pick(ALL, p=MAC) == ("coreml", "npu")
    assert pick(("onnx", "gguf"), p=MAC) == ("llamacpp", "metal")
    assert pick(ALL, device="metal", p=MAC) == ("llamacpp", "metal")
    assert pick(ALL, device="cpu", p=MAC) == ("onnx", "cpu")
    assert pick(("coreml",), device="metal", p=MAC) == ("coreml", "metal")


def test_old_intel_mac_has_no_core_ml_states():
    assert pick(ALL, p=OLD_MAC) == ("onnx", "cpu")
    with pytest.raises(DeviceUnavailableError, match="macOS 15"):
        select(("coreml",), probe=OLD_MAC)


def test_cuda_machine():
    assert pick(ALL, p=CUDA_BOX) == ("llamacpp", "cuda")
    assert pick(("onnx",), p=CUDA_BOX) == ("onnx", "cuda")
    assert pick(ALL, device="cpu", p=CUDA_BOX) == ("onnx", "cpu")


def test_forced_missing_device_lists_what_exists():
    with pytest.raises(DeviceUnavailableError) as e:
        select(ALL, device="cuda", probe=LINUX_CPU)
    msg = str(e.value)
    assert "device 'cuda'" in msg and "Available here: cpu (llamacpp), cpu (onnx)" in msg
    assert "no NVIDIA GPU" in msg or "CUDAExecutionProvider" in msg
    with pytest.raises(DeviceUnavailableError, match="unknown device 'tpu'"):
        select(ALL, device="tpu", probe=LINUX_CPU)
    with pytest.raises(DeviceUnavailableError, match="no coreml model"):
        select(("onnx",), format="coreml", probe=LINUX_CPU)


def test_every_reason_is_reported():
    rows = availability(LINUX_CPU)
    reasons = {(b, d): why for b, d, why in rows}
    assert reasons[("onnx", "cpu")] is None and reasons[("llamacpp", "cpu")] is None
    assert "macOS" in reasons[("coreml", "npu")]
    assert "Metal" in reasons[("llamacpp", "metal")] or "macOS" in reasons[("llamacpp", "metal")]
    explained = select(ALL, probe=LINUX_CPU).explain()
    assert "chosen" in explained and "no: Core ML runs only on macOS" in explained


def test_this_machine_probe_is_consistent():
    p = probe()
    assert p.cpu_count >= 1 and "CPUExecutionProvider" in p.ort_providers


SNAPDRAGON = Probe(system="Windows", machine="ARM64", cpu_count=12, qnn_htp="hardware",
                   ort_providers=("CPUExecutionProvider",), modules=frozenset({"onnxruntime_qnn", "llama_cpp"}))


def test_snapdragon_prefers_the_npu_when_the_bundle_has_an_npu_model():
    assert pick(ALL + ("onnx-npu",), p=SNAPDRAGON) == ("qnn", "npu")
    assert pick(ALL, p=SNAPDRAGON) == ("onnx", "cpu")  # no NPU graphs in the bundle
    emulated = Probe(**{**SNAPDRAGON.__dict__, "machine": "x86_64", "qnn_htp": "emulated"})
    with pytest.raises(DeviceUnavailableError, match="x86 emulation"):
        select(ALL + ("onnx-npu",), device="npu", probe=emulated)


def test_a_device_that_cannot_hold_the_model_is_refused_with_the_figure():
    small = Probe(**{**LINUX_CPU.__dict__, "memory_bytes": 16 * 10**9})
    assert pick(("onnx",), p=small) == ("onnx", "cpu")
    needs = {"onnx": 24 * 10**9, "gguf": 12 * 10**9}  # e.g. Phi-3.5-MoE's ONNX, and a smaller GGUF
    c = select(("onnx", "gguf"), probe=small, needs=needs)
    assert (c.backend.name, c.device) == ("llamacpp", "cpu")
    assert "needs 24.0 GB" in c.explain() and "has 16.0 GB" in c.explain()
    with pytest.raises(DeviceUnavailableError, match="needs 24.0 GB"):
        select(("onnx",), probe=small, needs=needs)


def test_the_manifest_says_what_running_each_format_takes(tmp_path, tiny_checkpoint):
    from edgephi.export.bundle import export_bundle

    out, m = export_bundle(str(tiny_checkpoint("phi-3-medium")), tmp_path / "b", formats=("onnx", "gguf"), bits=16)
    s = m.spec
    kv = 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * min(m.context_length, 4096)
    assert m.memory_bytes("onnx") == m.formats["onnx"].nbytes + 4 * kv  # float32 cache
    assert m.memory_bytes("gguf") == m.formats["gguf"].nbytes + 2 * kv  # float16 cache
