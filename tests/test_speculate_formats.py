"""Speculative decoding on every format that runs here (ONNX, GGUF through llama.cpp, onnx-npu on onnxruntime-qnn's x86
HTP emulation): greedy output is token-identical to plain decoding on the same backend, with verify calls that run
past Phi-3-mini-4k's sliding window (48 in the tiny model) and up to, never across, LongRoPE's switch (64).

Drafts come from a previous greedy run with 30% of them replaced (ReplayDrafter: accepted and rejected drafts in
every round), from prompt lookup, and from a draft bundle (the target's own bundle: every draft accepted; Phi-3-mini
drafting for Phi-3-medium; Phi-4-mini's different tokenizer refused)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tiny
from edgephi.devices import probe
from edgephi.drafters import ReplayDrafter
from edgephi.generate import stream
from spec_bundles import load, tiny_bundles as bundles  # noqa: F401 - the fixture
from edgephi.speculate import Speculator

PROMPT_LEN, GEN, WINDOW, SWITCH = 40, 40, 48, 64
NPU_PROMPT, NPU_GEN = 44, 24  # the x86 HTP emulation takes ~0.3 s a token: to position 68
HAVE_QNN = probe().qnn_htp == "emulated"


def record_calls(session) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    forward = session.forward

    def recorded(ids, all_logits=False):
        calls.append((session.n_past, len(ids)))
        return forward(ids, all_logits)

    session.forward = recorded
    return calls


def greedy(model, prompt, n, speculator=None):
    rs = stream(model.session, model.tokenizer, prompt, max_tokens=n, speculator=speculator)
    return [r.token for r in rs if r.token is not None]


def check_boundaries(variant, calls):
    verify = [(p, t) for p, t in calls[1:] if t > 1]  # after the prompt: the verify calls
    assert verify, "no multi-token verify call was made"
    if variant == "phi-3-mini-4k":
        assert any(p >= WINDOW for p, t in verify), f"no verify call past the sliding window: {verify}"
    else:
        assert all(p + t <= SWITCH or p >= SWITCH for p, t in verify), f"a verify call crossed {SWITCH}: {verify}"
        assert any(p >= SWITCH for p, t in verify) and any(p + t <= SWITCH for p, t in verify), verify


@pytest.mark.parametrize("variant", ["phi-3-mini-4k", "phi-3-mini-128k"])
@pytest.mark.parametrize("fmt", ["onnx", "gguf", "onnx-npu"])
def test_greedy_speculation_equals_plain_decoding(fmt, variant, bundles):
    if fmt == "onnx-npu" and not HAVE_QNN:
        pytest.skip("onnxruntime-qnn's x86 HTP emulation is not installed here")
    path = bundles(variant)
    n, n_prompt = (NPU_GEN, NPU_PROMPT) if fmt == "onnx-npu" else (GEN, PROMPT_LEN)
    prompt = tiny.random_prompt(n_prompt, 32064, seed=3)
    model = load(path, fmt)
    try:
        plain = greedy(model, prompt, n)
        calls = record_calls(model.session)
        spec = Speculator(ReplayDrafter(n_prompt, plain, miss=0.3, seed=1), k=6, no_cross=SWITCH
                          if variant == "phi-3-mini-128k" else None)
        assert greedy(model, prompt, n, spec) == plain
        assert 0 < spec.stats.accepted < spec.stats.drafted
        check_boundaries(variant, calls)
        if fmt != "onnx-npu":  # through the API: prompt lookup, and the bundle drafting for itself
            looped = prompt + prompt[:6]  # the lookup proposes what followed the prompt's start: mostly rejected
            assert greedy(model, looped, n, None) == [r.token for r in model.stream(
                looped, max_tokens=n, ignore_eos=True, speculate="ngram") if r.token is not None]
            rs = list(model.stream(prompt, max_tokens=n, ignore_eos=True, speculate=str(path)))
            assert [r.token for r in rs if r.token is not None] == plain
            assert rs[-1].accepted_tokens >= 0.9 * rs[-1].drafted_tokens > 0
    finally:
        model.close()


def test_a_verify_call_across_the_longrope_switch_would_differ(bundles):
    """Why speculation must not cross original_max_position_embeddings: one call over positions 60..67 uses the
    long factors for all of them, one-at-a-time decoding the short ones up to 63 (and keeps those keys)."""
    model = load(bundles("phi-3-mini-128k"), "onnx")
    try:
        ids = tiny.random_prompt(68, 32064, seed=4)
        model.session.forward(ids[:60])
        one_call = model.session.forward(ids[60:], all_logits=True)
        model.session.rewind(60)
        stepwise = np.stack([model.session.forward([t]) for t in ids[60:]])
        assert np.abs(one_call[:4] - stepwise[:4]).max() > 0.1 * np.abs(stepwise).max()
    finally:
        model.close()


def test_a_draft_with_the_same_tokenizer_drafts_and_another_is_refused(bundles):
    target = load(bundles("phi-3-medium", ("onnx", "gguf")), "onnx")
    try:
        prompt = tiny.random_prompt(PROMPT_LEN, 32064, seed=5)
        plain = greedy(target, prompt, GEN)
        rs = list(target.stream(prompt, max_tokens=GEN, ignore_eos=True, speculate=str(bundles("phi-3-mini-4k"))))
        assert [r.token for r in rs if r.token is not None] == plain and rs[-1].drafted_tokens > 0
        with pytest.raises(ValueError, match="tokenizer differs"):
            target.generate(prompt, max_tokens=4, speculate=str(bundles("phi-4-mini", ("onnx",))))
    finally:
        target.close()
