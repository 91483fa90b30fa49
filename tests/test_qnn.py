"""The onnx-npu export on Qualcomm's HTP, run by onnxruntime-qnn's x86 HTP emulation, against the CPU ONNX backend.

What is checked, for the Phi-2 and every Phi-3-family tiny variant:
* placement: every node of the prefill and decode graphs runs on QNN (session.disable_cpu_ep_fallback=1 makes a
  CPU-placed node fail session creation; the recorded assignment lists only QNNExecutionProvider);
* numbers: greedy tokens over an 80-token prompt (past the 48-token sliding window and LongRoPE's switch at 64)
  and 12 decode steps equal those of edgephi/backends/onnx.py on the same weights (the 16-bit export: both graphs
  hold the same float16 weights; int4: the same MatMulNBits blocks with accuracy_level=0, i.e. float compute);
  logits within LOGITS_TOL of the largest |logit|.
  LOGITS_TOL: float16 activations carry a relative rounding error of 2^-11 ≈ 4.9e-4 per operation; through two
  layers, softmax over ≤ 92 keys and 256-long dot products the HTP's logits differ from float32 ones by ≈ 3e-3 of
  max|logit| (measured: 2e-3…4e-3, up to 7e-3 with LongRoPE's long factors), so 1e-2 is 1.5–4× that.
  Greedy tokens can only be compared where the reference is not a near-tie: tiny random models have top-1/top-2
  gaps down to 1e-4 of max|logit|.  The prompt is therefore the first seed (0, 1, …) whose CPU greedy run has
  every step's gap above TIE_MARGIN (2 × the measured float16 error); the rule is fixed, not tuned per run;
* context binaries: compiled offline (EPContext model + .bin), reloaded, and the same tokens again;
* devices: the emulated HTP is never reported as an NPU.
Timings printed here are labelled "x86 HTP emulation": they say nothing about NPU speed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed (pip install 'edgephi[qnn]')")

import tiny  # noqa: E402
from edgephi.backends.onnx import OnnxSession  # noqa: E402
from edgephi.backends.qnn import QnnBackend, QnnSession  # noqa: E402
from edgephi.formats import onnx_npu as npu_fmt  # noqa: E402
from edgephi.formats import qnn as qnn_ep  # noqa: E402
from edgephi.devices import probe  # noqa: E402
from edgephi.export import onnx as onnx_export  # noqa: E402
from edgephi.export import onnx_npu  # noqa: E402
from edgephi.export.source import Source  # noqa: E402
from edgephi.spec import PhiSpec  # noqa: E402

VARIANTS = ["phi-2", "phi-3-mini-4k", "phi-3-mini-128k", "phi-3-medium", "phi-4-mini"]
PROMPT_LEN, STEPS, N_CTX, CHUNK = 80, 12, 96, 32
LOGITS_TOL = 1e-2
TIE_MARGIN = 6e-3
TARGET = "sm8650"  # Hexagon v75, soc_model 57
EMULATED = probe().qnn_htp == "emulated"


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """exports(variant, bits, quantize_lm_head=True) -> (onnx-npu dir, CPU onnx dir) on the same checkpoint."""
    cache: dict = {}

    def get(variant: str, bits: int, quantize_lm_head: bool = True):
        key = (variant, bits, quantize_lm_head)
        if key not in cache:
            src = Source.open(tiny_checkpoint(variant))
            root = tmp_path_factory.mktemp(f"qnn-{variant}-{bits}")
            npu, cpu = root / "onnx-npu", root / "onnx"
            npu.mkdir()
            cpu.mkdir()
            onnx_npu.export(src, npu, bits=bits, n_ctx=N_CTX, chunk=CHUNK, compile=False,
                            quantize_lm_head=quantize_lm_head)
            onnx_export.export(src, cpu, bits=bits, accuracy_level=0, quantize_lm_head=quantize_lm_head)
            cache[key] = npu, cpu
        return cache[key]

    return get


greedy = tiny.session_greedy


def min_gap(logits: np.ndarray) -> float:
    top = np.sort(logits, axis=1)[:, -2:]
    return float((top[:, 1] - top[:, 0]).min() / np.abs(logits).max())


def reference(cpu_dir: Path, vocab: int, n: int = PROMPT_LEN) -> tuple[list[int], list[int], np.ndarray]:
    """(prompt, tokens, logits) from the CPU ONNX backend: the first prompt seed without a near-tie."""
    for seed in range(64):
        prompt = tiny.random_prompt(n, vocab, seed=seed)
        tokens, logits = greedy(OnnxSession(cpu_dir, n_ctx=128, threads=1), prompt, STEPS)
        if min_gap(logits) > TIE_MARGIN:
            return prompt, tokens, logits
    raise AssertionError(f"no prompt seed in 0..63 without a near-tie (gap <= {TIE_MARGIN})")


def check_against_cpu(npu_dir: Path, cpu_dir: Path, vocab: int, label: str, n: int = PROMPT_LEN,
                      **options) -> QnnSession:
    prompt, ref_tokens, ref_logits = reference(cpu_dir, vocab, n)
    session = QnnSession(npu_dir, **options)
    t0 = time.perf_counter()
    tokens, logits = greedy(session, prompt, STEPS)
    print(f"{label}: {n} + {STEPS} tokens in {time.perf_counter() - t0:.1f} s (x86 HTP emulation, "
          f"not NPU speed); logits error {np.abs(logits - ref_logits).max() / np.abs(ref_logits).max():.2e}")
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= LOGITS_TOL * np.abs(ref_logits).max()
    assert session.n_past == n + STEPS
    return session


@pytest.mark.parametrize("variant", VARIANTS)
def test_f16_every_node_on_qnn_and_tokens_match_cpu_onnx(variant, exports, tiny_checkpoint):
    npu, cpu = exports(variant, 16)
    spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
    # strict (the default): session creation fails if any node would fall back to the CPU
    session = check_against_cpu(npu, cpu, spec.vocab_size, f"{variant} 16-bit", target=TARGET, record=True)
    for graph, placed in session.placements().items():
        assert set(placed) == {"QNNExecutionProvider"} and placed["QNNExecutionProvider"] > 50, (graph, placed)


@pytest.mark.parametrize("variant", ["phi-3-mini-128k", "phi-4-mini"])
def test_longrope_switch_during_decode(variant, exports, tiny_checkpoint):
    """A 58-token prompt (under original_max 64) decoded past 64: new tokens rotate with the long factors while
    the cached keys keep the short ones, as in the CPU backend (and transformers)."""
    npu, cpu = exports(variant, 16)
    spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
    check_against_cpu(npu, cpu, spec.vocab_size, f"{variant} LongRoPE switch", n=58, target=TARGET)


def test_int4_tokens_match_cpu_onnx(exports, tiny_checkpoint):
    """MatMulNBits int4 (block 32, symmetric) in every layer.  The emulation runs a 32064 x 256 int4 output
    projection in ~2.3 s, so the token run keeps the head float16 (quantize_lm_head=False, in both exports) and
    test_int4_head_one_step covers the default int4 head."""
    npu, cpu = exports("phi-3-medium", 4, quantize_lm_head=False)
    spec = PhiSpec.from_hf_config(tiny_checkpoint("phi-3-medium"))
    check_against_cpu(npu, cpu, spec.vocab_size, "phi-3-medium int4", target=TARGET)


def test_int4_head_one_step(exports, tiny_checkpoint):
    """The default int4 export (head quantized too): placed on QNN, the prompt's logits as the CPU's."""
    npu, cpu = exports("phi-4-mini", 4)
    spec = PhiSpec.from_hf_config(tiny_checkpoint("phi-4-mini"))
    prompt = tiny.random_prompt(PROMPT_LEN, spec.vocab_size, seed=1)
    ref = OnnxSession(cpu, n_ctx=128, threads=1).forward(prompt, all_logits=True)
    got = QnnSession(npu, target=TARGET).forward(prompt, all_logits=True)
    assert np.abs(got - ref).max() <= LOGITS_TOL * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9  # per-position argmax, near-ties included


@pytest.mark.parametrize("target", list(npu_fmt.TARGETS))
def test_every_target_compiles_and_agrees(target, exports, tmp_path):
    """Each target: the decode graph compiled to a context binary, reloaded, one step as on the CPU."""
    import onnxruntime as ort

    npu, _ = exports("phi-3-mini-4k", 16)
    ctx = tmp_path / "decode.onnx"
    written = qnn_ep.compile_context(npu / "decode.onnx", ctx, npu_fmt.get_target(target))
    assert ctx in written and any(p.suffix == ".bin" for p in written)
    rng = np.random.default_rng(0)
    cpu = ort.InferenceSession(str(npu / "decode.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[1234]], np.int32), "position_ids": np.array([[40]], np.int32),
            "attention_bias": np.where(np.arange(N_CTX + 1) < 40, 0, -30000).astype(np.float16)[None, None, None]}
    feed["attention_bias"][..., -1] = 0
    for i in cpu.get_inputs():
        if i.name.startswith("past_"):
            feed[i.name] = rng.standard_normal(i.shape).astype(np.float16)
    ref = cpu.run(["logits"], feed)[0].astype(np.float32)
    got = qnn_ep.make_session(ctx, npu_fmt.get_target(target)).run(["logits"], feed)[0].astype(np.float32)
    assert np.abs(got - ref).max() <= LOGITS_TOL * np.abs(ref).max()


def test_context_binary_roundtrip(tiny_checkpoint, tmp_path):
    """A bundle with context binaries: listed in the manifest, preferred at load, same tokens as the CPU."""
    from edgephi.export.bundle import export_bundle
    from edgephi.manifest import Manifest

    ckpt = tiny_checkpoint("phi-4-mini")
    out, manifest = export_bundle(str(ckpt), tmp_path / "bundle", formats=("onnx", "onnx-npu"), bits=16,
                                  options={"onnx": {"accuracy_level": 0},
                                           "onnx-npu": {"n_ctx": N_CTX, "chunk": CHUNK, "targets": [TARGET]}})
    entry = Manifest.load(out).formats["onnx-npu"]
    ctx_files = [f for f in entry.files if f.startswith(f"onnx-npu/qnn/{TARGET}/")]
    assert {Path(f).name for f in ctx_files} >= {"prefill.onnx", "decode.onnx"}
    assert any(f.endswith(".bin") for f in ctx_files), ctx_files
    assert entry.extra["qnn_targets"][TARGET]["decode"] == f"onnx-npu/qnn/{TARGET}/decode.onnx"
    for f in ctx_files:
        assert (out / f).is_file()
    session = QnnBackend.open(out, Manifest.load(out), "npu", target=TARGET, allow_emulated=True)
    assert session.from_context
    session.close()
    spec = PhiSpec.from_hf_config(ckpt)
    reloaded = check_against_cpu(out / "onnx-npu", out / "onnx", spec.vocab_size, "phi-4-mini context binary",
                                 target=TARGET)
    assert reloaded.from_context
    cfg = json.loads((out / "onnx-npu" / npu_fmt.CONFIG).read_text())
    assert cfg["targets"][TARGET]["htp_arch"] == 75


def test_chunked_prefill_and_rewind(exports, tiny_checkpoint):
    """all_logits over a prompt that is not a multiple of the chunk; rewind then re-decode gives the same logits."""
    npu, cpu = exports("phi-3-mini-4k", 16)
    spec = PhiSpec.from_hf_config(tiny_checkpoint("phi-3-mini-4k"))
    prompt = tiny.random_prompt(40, spec.vocab_size, seed=7)
    ref = OnnxSession(cpu, n_ctx=128, threads=1).forward(prompt, all_logits=True)
    s = QnnSession(npu, target=TARGET)
    got = s.forward(prompt, all_logits=True)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= LOGITS_TOL * np.abs(ref).max()
    a = s.forward([prompt[0]])
    s.rewind(40)
    b = s.forward([prompt[0]])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="context full"):
        s.forward(list(range(100, 100 + N_CTX)))
    assert QnnSession(npu, target=TARGET, n_ctx=64).n_ctx == 64  # a smaller context than exported


@pytest.mark.skipif(not EMULATED, reason="this machine has a real HTP (or none): the emulation messages do not apply")
def test_emulated_htp_is_not_an_npu(capsys):
    from edgephi.cli import main
    from edgephi.select import DeviceUnavailableError, select

    why = QnnBackend.unavailable_reason(probe(), "npu")
    assert why is not None and "x86 emulation" in why and "not an NPU" in why and "Snapdragon" in why
    assert main(["devices"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "qnn" in x and "npu" in x)
    assert "unavailable" in line and "x86 emulation" in line and "QNN HTP driver" in line
    with pytest.raises(DeviceUnavailableError, match="x86 emulation.*Snapdragon"):
        select(("onnx", "onnx-npu"), device="npu")


@pytest.mark.skipif(not EMULATED, reason="this machine has a real HTP (or none): the emulation messages do not apply")
def test_open_refuses_emulation_unless_asked(exports):
    npu, _ = exports("phi-3-mini-4k", 16)
    with pytest.raises(ValueError, match="x86 emulation"):
        QnnBackend.open(npu.parent, None, "npu")
