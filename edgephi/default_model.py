"""The built-in default model: a trained 4.2M-parameter Phi-3-architecture code model shipped as a Hugging Face
checkpoint in edgephi/data/default-model/ (see its README.md), used when no model or bundle is named.

The runtime only knows where its bundle lives; the exporter writes it (`edgephi export default`, or the CLI's
chat and run on first use), so that an app carrying the runtime never carries the exporters.
"""
from __future__ import annotations

from pathlib import Path

from .paths import cache_home

DATA = Path(__file__).parent / "data" / "default-model"
NAME = "default"


def checkpoint_dir() -> Path:
    """The default model's checkpoint (config.json, model.safetensors, tokenizer)."""
    return DATA


def bundle_dir() -> Path:
    """Where the default model's bundle is kept once exported."""
    return cache_home() / "bundles" / NAME
