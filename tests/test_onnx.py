"""ONNX export and the onnxruntime backend against transformers, and onnxruntime-genai on the same folders.

Every prompt runs past the features that switch on length: the sliding window (phi-3-mini-4k, window 48) and
LongRoPE's short→long switch (original_max 64 for the 128k and phi-4-mini variants).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import tiny
from edgephi.backends.base import ContextFullError
from edgephi.backends.onnx import OnnxBackend, OnnxSession
from edgephi.devices import Probe
from edgephi.export.lower_numpy import NumpyModel
from edgephi.export.onnx import export
from edgephi.export.onnx_quant import dequantize_int4, quantize_int4
from edgephi.export.source import Source
from edgephi.spec import PhiSpec
from edgephi.weights import CheckpointError

VARIANTS = list(tiny.VARIANTS)
PROMPT_LEN, STEPS = 80, 12


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    """onnx_export(variant, bits, **options) -> the onnx dir (cached per module)."""
    cache: dict = {}

    def get(variant: str, bits: int, **options) -> Path:
        key = (variant, bits, tuple(sorted(options.items())))
        if key not in cache:
            ckpt = tiny_checkpoint(variant)
            out = tmp_path_factory.mktemp(f"onnx-{variant}-{bits}") / "onnx"
            out.mkdir()
            export(Source.open(ckpt), out, bits=bits, **options)
            cache[key] = out
        return cache[key]

    return get


greedy = tiny.session_greedy


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("bits,tol", [(32, 1e-3), (16, 2e-2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_float_export_matches_transformers(variant, bits, tol, tiny_checkpoint, reference_model, onnx_export):
    ckpt = tiny_checkpoint(variant)
    spec = PhiSpec.from_hf_config(ckpt)
    prompt = tiny.random_prompt(PROMPT_LEN, spec.vocab_size)
    ref_tokens, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)
    session = OnnxSession(onnx_export(variant, bits), n_ctx=128, threads=1)
    tokens, logits = greedy(session, prompt, STEPS)
    assert rel_err(logits, ref_logits) <= tol
    assert tokens == ref_tokens
    assert session.n_past == PROMPT_LEN + STEPS


@pytest.mark.parametrize("variant", ["phi-3-mini-128k", "phi-4-mini"])
def test_longrope_switch_during_decode(variant, tiny_checkpoint, reference_model, onnx_export):
    """A prompt under original_max (64) decoded past it: cached keys keep the short rotation, as transformers."""
    ckpt = tiny_checkpoint(variant)
    spec = PhiSpec.from_hf_config(ckpt)
    prompt = tiny.random_prompt(58, spec.vocab_size, seed=3)
    ref_tokens, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)
    tokens, logits = greedy(OnnxSession(onnx_export(variant, 32), n_ctx=128, threads=1), prompt, STEPS)
    assert rel_err(logits, ref_logits) <= 1e-3 and tokens == ref_tokens


def test_rewind_and_all_logits_equal_full_recompute(tiny_checkpoint, reference_model, onnx_export):
    ckpt = tiny_checkpoint("phi-3-mini-4k")
    prompt = tiny.random_prompt(PROMPT_LEN, 32064, seed=5)
    full = tiny.reference_logits(reference_model(ckpt), prompt)
    s = OnnxSession(onnx_export("phi-3-mini-4k", 32), n_ctx=96, threads=1)
    s.forward(prompt[:50])
    s.forward(tiny.random_prompt(20, 32064, seed=9))  # junk that the rewind drops
    s.rewind(30)
    assert rel_err(s.forward(prompt[30:], all_logits=True), full[30:]) <= 1e-3
    assert s.n_evaluated == 50 + 20 + 50  # (the 50: prompt[:50], then prompt[30:] after the rewind)
    with pytest.raises(ContextFullError):
        s.forward(list(range(100, 120)))
    # short calls write their logits into one reused buffer: what a call returned must not change after the next
    s.rewind(40)
    rows = s.forward(prompt[40:43], all_logits=True)
    last = s.forward(prompt[43:44])
    kept = rows.copy(), last.copy()
    s.forward(prompt[44:47], all_logits=True)
    s.forward(prompt[47:48])
    assert np.array_equal(rows, kept[0]) and np.array_equal(last, kept[1])
    assert rel_err(rows, full[40:43]) <= 1e-3 and rel_err(last[None], full[43:44]) <= 1e-3
    s.reset()
    assert s.n_past == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_lowering_matches_transformers(variant, tiny_checkpoint, reference_model):
    """The architecture files' numpy lowering is a second reference: it must agree with transformers first."""
    ckpt = tiny_checkpoint(variant)
    src = Source.open(ckpt)
    prompt = tiny.random_prompt(PROMPT_LEN, src.spec.vocab_size)
    ref_tokens, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)
    tokens, logits = greedy(NumpyModel(src.tensors, src.spec), prompt, STEPS)
    assert rel_err(logits, ref_logits) <= 1e-4 and tokens == ref_tokens


def dequantized_reference(ckpt: Path, block: int, symmetric: bool) -> NumpyModel:
    """The numpy lowering with every exported linear replaced by its dequantized int4 weight (the head too, also
    when it is the tied embedding) and the embedding table rounded to float16, as the int4 export stores them."""
    def transform(role: str, name: str, w: np.ndarray) -> np.ndarray:
        if role in ("linear", "logits"):
            return dequantize_int4(quantize_int4(w, block, symmetric))
        return w.astype(np.float16).astype(np.float32) if role == "embed" else w

    src = Source.open(ckpt)
    return NumpyModel(src.tensors, src.spec, transform)


@pytest.mark.parametrize("variant,symmetric", [(v, True) for v in VARIANTS] + [("phi-3-medium", False),
                                                                                ("phi-2", False)])
def test_int4_matches_dequantized_reference(variant, symmetric, tiny_checkpoint, onnx_export):
    ckpt = tiny_checkpoint(variant)
    spec = PhiSpec.from_hf_config(ckpt)
    prompt = tiny.random_prompt(PROMPT_LEN, spec.vocab_size, seed=1)
    ref_tokens, ref_logits = greedy(dequantized_reference(ckpt, 32, symmetric), prompt, STEPS)
    # accuracy_level 0: MatMulNBits dequantizes to float32 and multiplies exactly, so the tolerance is tight
    exact = onnx_export(variant, 4, symmetric=symmetric, accuracy_level=0)
    tokens, logits = greedy(OnnxSession(exact, n_ctx=128, threads=1), prompt, STEPS)
    assert rel_err(logits, ref_logits) <= 1e-3 and tokens == ref_tokens
    # accuracy_level 4 (the CPU default) quantizes activations to int8 blockwise: close, not exact
    fast = OnnxSession(onnx_export(variant, 4, symmetric=symmetric), n_ctx=128, threads=1)
    assert rel_err(fast.forward(prompt), ref_logits[0]) <= 8e-2


def test_quantizer_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 100)).astype(np.float32)  # K not a multiple of the block: padded
    for sym in (True, False):
        q = quantize_int4(w, 32, sym)
        assert q.packed.shape == (70, 4, 16) and q.scales.shape == (70, 4)
        err = np.abs(dequantize_int4(q) - w).reshape(-1)
        step = np.repeat(np.abs(q.scales), 32, axis=1)[:, :100].reshape(-1)
        # round to nearest is half a step off; the clipped side (7 steps vs 8, or a rounded zero point) one step
        assert (err <= step + 1e-6).all() and (err <= step * 0.5 + 1e-6).mean() > 0.95


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_genai_runs_the_folder(variant, tiny_checkpoint, onnx_export):
    og = pytest.importorskip("onnxruntime_genai")
    d = onnx_export(variant, 4)
    spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
    prompt = tiny.random_prompt(PROMPT_LEN, spec.vocab_size, seed=2)
    model = og.Model(str(d))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=PROMPT_LEN + STEPS + 4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    theirs = []
    for _ in range(STEPS):
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    ours, _ = greedy(OnnxSession(d, n_ctx=128, threads=1), prompt, STEPS)
    assert ours == theirs
    assert (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()


@pytest.mark.parametrize("variant", ["phi-3-medium", "phi-4-mini"])  # phi-4-mini: LongRoPE tables in an If's branches
def test_optimized_graph_is_cached_outside_the_bundle_and_reused(variant, onnx_export, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "home"))
    d = onnx_export(variant, 32)
    before = sorted(p.name for p in d.iterdir())
    first = OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7])
    cached = sorted((tmp_path / "home" / "onnx").glob("*/model.opt.onnx"))
    assert len(cached) == 1 and sorted(p.name for p in d.iterdir()) == before
    mtime = cached[0].stat().st_mtime_ns
    again = OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7])
    assert cached[0].stat().st_mtime_ns == mtime and np.array_equal(first, again)
    assert "unusable" not in caplog.text  # the saved graph loads as saved, subgraph tensors included


def test_unwritable_cache_only_costs_speed(onnx_export, tmp_path, monkeypatch):
    """No cache folder can be made (a file stands in the way), or the cache folder refuses writes: the session
    loads all the same, without an error, and gives the same logits."""
    from readonly import read_only

    d = onnx_export("phi-3-medium", 32)
    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "fresh"))
    want = OnnxSession(d, n_ctx=16, threads=1, cache_optimized=False).forward([5, 6, 7])
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "file" / "home"))
    assert np.array_equal(OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7]), want)
    home = tmp_path / "ro"
    monkeypatch.setenv("EDGEPHI_HOME", str(home))
    from edgephi.backends.onnx import optimized_path

    key_dir = optimized_path(d / "model.onnx", "CPUExecutionProvider").parent
    key_dir.mkdir(parents=True)
    with read_only(home) as enforced:
        if not enforced:
            pytest.skip("this user can write to a folder without write bits and may not mount it read-only")
        assert np.array_equal(OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7]), want)
        assert not any(key_dir.iterdir())


def test_optimized_graph_cache_is_bounded(onnx_export, tmp_path, monkeypatch):
    """A new entry prunes the least recently used ones beyond EDGEPHI_ONNX_CACHE_GB; a used entry counts as new;
    the entry just made always stays."""
    import os

    from edgephi.backends.onnx import optimized_path, prune_cache

    root = tmp_path / "home" / "onnx"
    for i, name in enumerate(("a", "b", "c")):  # 1 MiB each, used 3, 2, 1 hours ago
        (root / name).mkdir(parents=True)
        (root / name / "model.opt.onnx.data").write_bytes(b"\0" * 2**20)
        t = 1_700_000_000 + 3600 * i
        os.utime(root / name, (t, t))
    assert prune_cache(root, keep=root / "a", max_bytes=2 * 2**20 + 10) == [root / "b"]  # "a" kept though oldest
    assert sorted(p.name for p in root.iterdir()) == ["a", "c"]
    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGEPHI_ONNX_CACHE_GB", "0.000001")  # about 1 KiB: no room but for the entry just made
    d = onnx_export("phi-3-medium", 32)
    first = OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7])
    entry = optimized_path(d / "model.onnx", "CPUExecutionProvider").parent
    assert [p.name for p in root.iterdir()] == [entry.name]  # both old entries went, the new one stayed
    os.utime(entry, (1_700_000_000, 1_700_000_000))
    assert np.array_equal(OnnxSession(d, n_ctx=16, threads=1).forward([5, 6, 7]), first)  # a cache hit
    assert entry.stat().st_mtime > 1_700_000_000  # marked as used


def test_missing_tensor_names_the_file(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tiny_checkpoint("phi-3-mini-4k")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"ckpt.*model\.layers\.1\.mlp\.down_proj\.weight"):
        Source.open(ckpt)


def test_truncated_file_names_the_file(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("phi-2")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        Source.open(ckpt)


def test_bad_options_are_refused(tiny_checkpoint, tmp_path):
    src = Source.open(tiny_checkpoint("phi-2"))
    with pytest.raises(ValueError, match="bits=8"):
        export(src, tmp_path, bits=8)
    with pytest.raises(ValueError, match="blocksize"):
        export(src, tmp_path, bits=4, blocksize=64)


def test_backend_availability():
    cpu = Probe(ort_providers=("CPUExecutionProvider",))
    assert OnnxBackend.unavailable_reason(cpu, "cpu") is None
    assert "CUDAExecutionProvider" in OnnxBackend.unavailable_reason(cpu, "cuda")
    assert "qnn" in OnnxBackend.unavailable_reason(cpu, "npu")
    assert "not installed" in OnnxBackend.unavailable_reason(Probe(ort_providers=()), "cpu")
