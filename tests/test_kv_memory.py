"""Bounded KV memory: the ring buffers for sliding-window models (ONNX: edgephi/backends/onnx_ring.py; llama.cpp:
llamacpp_window.py) and llama.cpp's q8_0 cache, against transformers on the tiny variants.

Logits are compared teacher-forced (the reference's tokens fed to both), so one near-tie flip does not change every
later context; greedy tokens are compared where the reference's top-2 gap exceeds twice the tolerance (tiny random
models have gaps down to 1e-4 of the largest logit)."""
from __future__ import annotations

import numpy as np
import pytest

import tiny
from edgephi.drafters import ReplayDrafter
from edgephi.generate import stream
from edgephi.speculate import Speculator
from spec_bundles import load, tiny_bundles  # noqa: F401 - the fixture

ONNX_TOL, GGUF_TOL = 1e-3, 0.02  # 16-bit bundle on the float32 ONNX graph; test_gguf.py's fp16 tolerance
Q8_TOL = 0.05  # q8_0 keys and values: measured 3.3% of the largest logit on the tiny Phi-3-mini-4k
INT8_TOL = 0.1  # onnxruntime's int8 cache, one static scale per channel: measured 4.5-6.9% on tiny random models
INT8_REAL_TOL = 0.03  # the same on the built-in model's trained weights: measured 0.8%
LONG = "phi-3-mini-4k-long"


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory):
    """A tiny Phi-3-mini-4k with a 1024-token context (positions run past llama.cpp's smallest context, 256 cells):
    (checkpoint, GGUF bundle).  Registered only while it is made, so no per-variant test picks it up."""
    from edgephi.export.bundle import export_bundle

    table = getattr(tiny, "ALL_VARIANTS", tiny.VARIANTS)
    cls, kwargs, *rest = tiny.VARIANTS["phi-3-mini-4k"]
    table[LONG] = (cls, dict(kwargs, max_position_embeddings=1024, original_max_position_embeddings=1024), *rest)
    try:
        ckpt = tiny.make_checkpoint(LONG, tmp_path_factory.mktemp("long"))
    finally:
        del table[LONG]
    out, _ = export_bundle(str(ckpt), tmp_path_factory.mktemp("long-b") / "b", formats=("gguf",), bits=16)
    return ckpt, out


def forced(session, prompt, ref_tokens) -> np.ndarray:
    return np.stack([session.forward(prompt)] + [session.forward([t]) for t in ref_tokens[:-1]])


def check(logits, ref_logits, tol):
    err = np.abs(logits - ref_logits).max()
    assert err <= tol * np.abs(ref_logits).max()
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * err  # no error this large can flip these
    assert clear.any()
    assert (logits.argmax(1) == ref_logits.argmax(1))[clear].all()


def test_onnx_ring_holds_the_window_and_equals_transformers(tiny_bundles, tiny_checkpoint, reference_model):
    ckpt = tiny_checkpoint("phi-3-mini-4k")
    prompt = tiny.random_prompt(100, 32064, seed=2)  # longer than the ring: evaluated in pieces
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, 120)
    path = tiny_bundles("phi-3-mini-4k")
    model = load(path, "onnx", kv_ring=20)  # window 48 + 20 positions instead of 256
    try:
        s = model.session
        assert s.ring_capacity == 68 and all(a.shape[2] == 68 for a in s._arrays)
        check(forced(s, prompt, ref_toks), ref_logits, ONNX_TOL)
        assert s._ring.shifts > 3 and s.offset > 100
        # speculation's rewinds stay inside the ring; a prompt that leaves the cached text long ago recomputes
        s.rewind(0)
        plain = [r.token for r in stream(s, model.tokenizer, prompt, max_tokens=60)]
        spec = Speculator(ReplayDrafter(len(prompt), plain[:-1], miss=0.3, seed=2), k=8)
        again = [r.token for r in stream(s, model.tokenizer, prompt, max_tokens=60, speculator=spec,
                                         cached=prompt + plain[:-2])]
        assert again == plain and spec.stats.accepted > 10  # the ring no longer held prompt[:99]: recomputed
        assert s.reusable(len(prompt) - 30) == 0
    finally:
        model.close()


def test_onnx_ring_prompt_cache_and_refusals(tiny_bundles, tmp_path):
    path = tiny_bundles("phi-3-mini-4k")
    prompt = tiny.random_prompt(90, 32064, seed=3)
    model = load(path, "onnx", kv_ring=20)
    try:
        model.save_prompt_cache(tmp_path / "ring.kv", prompt)
        assert model.session.offset > 0
        expected = model.generate(prompt + [500, 600], max_tokens=8, ignore_eos=True)
    finally:
        model.close()
    again = load(path, "onnx", kv_ring=20, prompt_cache=tmp_path / "ring.kv")
    try:
        assert again.generate(prompt + [500, 600], max_tokens=8, ignore_eos=True) == expected
        assert again.session.n_evaluated == 2 + 7
    finally:
        again.close()
    with pytest.raises(ValueError, match="layout"):  # a ring's state does not fit a full cache
        load(path, "onnx", prompt_cache=tmp_path / "ring.kv")
    with pytest.raises(ValueError, match="kv_type='q8_0'; allowed: 'f32', 'int8'"):
        load(path, "onnx", kv_type="q8_0")


@pytest.mark.parametrize("variant, opts", [("phi-3-mini-4k", {}), ("phi-3-mini-4k", {"kv_ring": 20}),
                                           ("phi-3-mini-128k", {}), ("phi-4-mini", {})])
def test_onnx_int8_cache_against_transformers(variant, opts, tiny_bundles, tiny_checkpoint, reference_model, tmp_path):
    """onnxruntime's 8-bit cache with scales calibrated at load (onnx_int8.py): plain, in the ring (keys rotated
    back in float and quantized again), LongRoPE past its switch, partial rotary (Phi-4-mini)."""
    n = 100 if opts else 70  # past the ring (68) and past the 128k variant's switch (64)
    prompt = tiny.random_prompt(n - 30, 32064, seed=6)
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(tiny_checkpoint(variant)), prompt, 30)
    path = tiny_bundles(variant)
    model = load(path, "onnx", kv_type="int8", **opts)
    try:
        s = model.session
        assert s.kv_type == "int8" and all(a.dtype == np.int8 for a in s._arrays)
        check(forced(s, prompt, ref_toks), ref_logits, INT8_TOL)
        if opts:
            assert s._ring.shifts > 0
        with pytest.raises(ValueError, match="float32 cache"):  # a prompt cache holds float32 K and V
            model.save_prompt_cache(tmp_path / "x.kv", prompt)
    finally:
        model.close()


def test_llamacpp_ring_and_q8_0_against_transformers(long_bundle, reference_model):
    import llama_cpp

    ckpt, path = long_bundle
    prompt = tiny.random_prompt(60, 32064, seed=4)
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, 210)  # to position 270
    sizes = {}
    for opts, tol in (({"kv_ring": True}, GGUF_TOL), ({"kv_ring": True, "kv_type": "q8_0"}, Q8_TOL)):
        model = load(path, "gguf", n_ctx=1024, **opts)
        try:
            s = model.session
            assert s.ring_cells is not None and s.ring_cells <= 256 < s.n_ctx  # 48 + 64, rounded up by llama.cpp
            check(forced(s, prompt, ref_toks), ref_logits, tol)
            assert s._window.archive_from == len(prompt) + len(ref_toks) - 1 - s.ring_cells  # oldest dropped
            assert llama_cpp.llama_memory_seq_pos_min(s._mem, 1) >= s._window.archive_from
            sizes[opts.get("kv_type", "f16")] = llama_cpp.llama_state_seq_get_size(s._ctx, 0)
        finally:
            model.close()
    assert sizes["q8_0"] < 0.6 * sizes["f16"]  # 8.5 bits a value instead of 16


def test_onnx_int8_cache_on_the_built_in_model(tiny_bundle, reference_model):
    """Real (trained) weights: the calibrated scales fit real text much better than random checkpoints' values."""
    from edgephi.default_model import DATA

    model = load(tiny_bundle("default"), "onnx", kv_type="int8")
    try:
        prompt = model.encode('def mean(values):\n    """Return the arithmetic mean of values."""\n')
        ref_toks, ref_logits = tiny.reference_greedy(reference_model(DATA), prompt, 40)
        check(forced(model.session, prompt, ref_toks), ref_logits, INT8_REAL_TOL)
        model.session.reset()
        assert [r.token for r in model.stream(prompt, max_tokens=40, ignore_eos=True) if r.token is not None] \
            == list(ref_toks)  # greedy decoding on the 8-bit cache writes transformers' 40 tokens
    finally:
        model.close()


@pytest.mark.parametrize("variant", ["phi-3-mini-4k", "phi-3-medium"])
def test_q8_0_cache_on_the_plain_context(variant, tiny_bundles, tiny_checkpoint, reference_model):
    prompt = tiny.random_prompt(40, 32064, seed=5)
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(tiny_checkpoint(variant)), prompt, 30)
    model = load(tiny_bundles(variant, ("onnx", "gguf")), "gguf", kv_type="q8_0")
    try:
        check(forced(model.session, prompt, ref_toks), ref_logits, Q8_TOL)
    finally:
        model.close()


def test_llamacpp_reads_the_weights_on_cpu_instead_of_mapping_them(tiny_bundles):
    """mmap="auto" on CPU reads the GGUF (llama.cpp repacks the weights, so a mapping would keep a second copy
    resident); "on" maps it; both compute the same logits; other values are refused."""
    path = tiny_bundles("phi-3-mini-4k", ("onnx", "gguf"))
    prompt = tiny.random_prompt(24, 32064, seed=6)
    logits = {}
    for mode in ("auto", "on"):
        model = load(path, "gguf", mmap=mode)
        try:
            gguf = str(next((path / "gguf").glob("*.gguf")).resolve())
            mapped = any(line.rstrip().endswith(gguf) for line in open("/proc/self/maps"))
            assert mapped == (mode == "on"), f"mmap={mode}: mapped={mapped}"
            logits[mode] = model.session.forward(prompt, all_logits=True)
        finally:
            model.close()
    np.testing.assert_array_equal(logits["auto"], logits["on"])
    with pytest.raises(ValueError, match="mmap='yes'; choose one of auto, on, off"):
        load(path, "gguf", mmap="yes")
