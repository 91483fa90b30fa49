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
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """tiny_bundle(variant) -> a bundle with ONNX and GGUF at 16 bits of a tiny checkpoint ("default": the built-in
    model), exported once per session (tests/test_interop.py and tests/test_phi4.py share them)."""
    cache: dict = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            from edgephi.default_model import DATA as default_model
            from edgephi.export.bundle import export_bundle

            ckpt = default_model if variant == "default" else tiny_checkpoint(variant)
            out = tmp_path_factory.mktemp(f"bundle-{variant}") / "bundle"
            export_bundle(str(ckpt), out, formats=("onnx", "gguf"), bits=16)
            cache[variant] = out
        return cache[variant]

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
