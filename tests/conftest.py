"""Shared fixtures: tiny random checkpoints of every Phi variant, made once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny  # noqa: E402

DATA = TESTS / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(variant, dtype=None) -> Path of a tiny Hugging Face checkpoint (cached per session)."""
    cache: dict = {}

    def get(variant: str, dtype: str | None = None) -> Path:
        key = (variant, dtype)
        if key not in cache:
            cache[key] = tiny.make_checkpoint(variant, tmp_path_factory.mktemp(variant.replace(".", "_")),
                                              dtype=dtype)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference_model():
    """reference_model(ckpt_dir) -> transformers float32 model (cached per session)."""
    cache: dict = {}

    def get(ckpt_dir: Path):
        if ckpt_dir not in cache:
            cache[ckpt_dir] = tiny.load_reference(ckpt_dir)
        return cache[ckpt_dir]

    return get
