"""export --check: perplexity and KL to the 16-bit model, computed the same way for every format."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgephi.export.bundle import export_bundle
from edgephi.benchmarks.quality import check_bundle, heldout_text, kl_divergence, log_softmax


def test_kl_is_zero_for_identical_and_positive_otherwise():
    rng = np.random.default_rng(0)
    p = [log_softmax(rng.standard_normal((5, 11))).astype(np.float32)]
    q = [log_softmax(rng.standard_normal((5, 11))).astype(np.float32)]
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(p, q) > 0.01


@pytest.mark.parametrize("bits", [16, 4])
def test_check_bundle_scores_every_runnable_format(tmp_path, tiny_checkpoint, bits):
    ckpt = tiny_checkpoint("phi-3-mini-4k")
    out, _ = export_bundle(str(ckpt), tmp_path / "b", formats=("onnx", "gguf"), bits=bits)
    scores = {s.label.split()[0]: s for s in check_bundle(out, max_tokens=120, window=60)}
    ref = scores["reference"]
    assert math.isfinite(ref.ppl) and ref.tokens == 118  # two windows of 60, each scores 59 tokens
    for fmt in ("onnx", "gguf"):
        s = scores[fmt]
        assert s.tokens == ref.tokens and math.isfinite(s.ppl) and s.kl >= 0
        if bits == 16:  # the same 16-bit weights: no divergence worth the name
            assert s.kl < 1e-3 and abs(s.ppl / ref.ppl - 1) < 0.01
        else:  # 4-bit rounding shows
            assert s.kl > 1e-4


def test_heldout_text_is_shipped():
    assert "class Version" in heldout_text()
