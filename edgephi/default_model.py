"""The built-in default model, used when no model or bundle is named.

Until the trained default model ships (its own issue), a tiny Phi-3-architecture checkpoint with random weights
stands in: its config and Phi-3's real tokenizer live in edgephi/data/default-model/, its weights are generated
deterministically (seed 0) on first use into the cache directory.  It exercises every part of the pipeline, but
its answers are noise.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .spec import PhiSpec
from .weights import save_safetensors

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data" / "default-model"
NAME = "default"
VERSION = "random-v1"
CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "original_max_position_embeddings": 2048, "rope_theta": 10000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": 2047,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    "torch_dtype": "float16",
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}


def cache_home() -> Path:
    return Path(os.environ.get("EDGEPHI_HOME", Path.home() / ".cache" / "edgephi"))


def trained() -> bool:
    """True once the trained default model ships in the package (weights beside the tokenizer)."""
    return (DATA / "model.safetensors").is_file() and (DATA / "config.json").is_file()


def checkpoint_dir() -> Path:
    """The default model's Hugging Face-layout checkpoint: the shipped trained one, else the stand-in."""
    if trained():
        return DATA
    out = cache_home() / f"default-model-{VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for f in DATA.iterdir():
            shutil.copy2(f, staging / f.name)
        (staging / "config.json").write_text(json.dumps(CONFIG, indent=2))
        (staging / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
        spec = PhiSpec.from_hf_config(CONFIG)
        rng = np.random.default_rng(0)

        def make(name: str) -> np.ndarray:
            shape = spec.tensor_shapes()[name]
            if len(shape) == 1:  # norm weights near 1
                return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            return 0.08 * rng.standard_normal(shape, dtype=np.float32)

        save_safetensors(staging / "model.safetensors", spec.tensor_shapes(), make, dtype="F16")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote the default model's stand-in checkpoint to %s", out)
    return out


def default_bundle(formats: tuple[str, ...] | None = None) -> Path:
    """The default model's bundle, exported on first use with every format this machine can export."""
    out = cache_home() / "bundles" / (NAME if trained() else f"{NAME}-{VERSION}")
    if (out / "manifest.json").is_file():
        return out
    from edgephi.export.bundle import export_bundle, exportable_formats

    log.warning("exporting the built-in default model to %s (first use)", out)
    export_bundle(NAME, out, formats=formats or exportable_formats(), bits=4, force=True)
    return out
