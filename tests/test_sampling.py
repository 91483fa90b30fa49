"""Samplers and logits processors."""
from __future__ import annotations

import numpy as np
import pytest

from edgephi.sampling import greedy, make_logits_processors, make_sampler, repetition_penalty


def test_greedy_and_temperature_zero():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert greedy(logits) == 1
    assert make_sampler(0.0)(logits) == 1


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float64))
    draws = [make_sampler(1.0, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh sampler with the same seed draws the same token
    s = make_sampler(1.0, seed=1)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_truncations():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = make_sampler(1.0, top_k=2, seed=0)
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = make_sampler(1.0, top_p=0.7, seed=0)  # 0.5 < 0.7, 0.5+0.3 reaches it: keep two
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = make_sampler(1.0, min_p=0.25, seed=0)  # keep p >= 0.125
    assert {s(logits) for _ in range(300)} == {0, 1, 2}


def test_repetition_penalty():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = repetition_penalty(2.0)([0, 1], logits)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    assert make_logits_processors(None) == [] and make_logits_processors(1.0) == []


@pytest.mark.parametrize("kwargs, name", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"top_k": -2}, "top_k"), ({"min_p": 1.0}, "min_p")])
def test_bad_settings_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_sampler(**kwargs)
