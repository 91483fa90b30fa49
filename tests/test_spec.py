"""PhiSpec: every variant's config parses, in both dialects, with the derived values transformers uses."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

import tiny
from edgephi.spec import PhiSpec

EXPECTED = {  # variant -> (head_dim, rotary_dim, n_rep, tied, effective window, longrope)
    "phi-2": (64, 32, 1, False, None, False),
    "phi-3-mini-4k": (64, 64, 1, False, 48, False),
    "phi-3-mini-128k": (64, 64, 1, False, None, True),
    "phi-3-medium": (32, 32, 4, False, None, False),
    "phi-4-mini": (64, 48, 2, True, None, True),
}


def _config(tiny_checkpoint, variant):
    return json.loads((tiny_checkpoint(variant) / "config.json").read_text())


def to_published_dialect(cfg: dict) -> dict:
    """transformers 5 writes rope_parameters; the releases keep rope_theta/rope_scaling at the top level."""
    cfg = copy.deepcopy(cfg)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    if rp.get("rope_type") == "longrope":
        cfg["original_max_position_embeddings"] = rp.pop("original_max_position_embeddings")
        cfg["rope_scaling"] = {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    else:
        cfg["rope_scaling"] = None
    return cfg


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_tiny_configs_parse_with_derived_values(tiny_checkpoint, variant):
    spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
    hd, rd, rep, tied, window, longrope = EXPECTED[variant]
    assert (spec.head_dim, spec.rotary_dim, spec.n_rep) == (hd, rd, rep)
    assert spec.tie_word_embeddings is tied
    assert spec.effective_sliding_window == window
    assert (spec.rope_scaling is not None) is longrope
    assert spec.model_type == ("phi" if variant == "phi-2" else "phi3")


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_both_dialects_give_the_same_spec(tiny_checkpoint, variant):
    cfg = _config(tiny_checkpoint, variant)
    assert "rope_parameters" in cfg  # transformers 5 wrote it
    assert PhiSpec.from_hf_config(cfg) == PhiSpec.from_hf_config(to_published_dialect(cfg))


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_rope_matches_transformers(tiny_checkpoint, variant):
    """inv_freq (short and long) and the LongRoPE attention factor equal transformers' own computation."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
    config = transformers.AutoConfig.from_pretrained(tiny_checkpoint(variant))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        fn = ROPE_INIT_FUNCTIONS.get("default")
        if fn is None:
            base = 1.0 / (config.rope_parameters["rope_theta"] ** (np.arange(0, spec.rotary_dim, 2) / spec.rotary_dim))
            np.testing.assert_allclose(spec.rope_inv_freq(), base, rtol=1e-6)
            return
    short, attn = ROPE_INIT_FUNCTIONS[rope_type](config, None) if rope_type != "default" else (None, 1.0)
    if short is not None:
        np.testing.assert_allclose(spec.rope_inv_freq(long=False), short.numpy(), rtol=1e-6)
        long, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=spec.original_max_position_embeddings + 1)
        np.testing.assert_allclose(spec.rope_inv_freq(long=True), long.numpy(), rtol=1e-6)
        assert not np.allclose(short.numpy(), long.numpy())
    assert math.isclose(spec.rope_attention_factor, attn, rel_tol=1e-9)
    if spec.rope_scaling is not None:
        assert spec.rope_attention_factor > 1.0


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_tensor_shapes_match_the_checkpoint(tiny_checkpoint, variant):
    from edgephi.weights import Checkpoint

    d = tiny_checkpoint(variant)
    spec = PhiSpec.from_hf_config(d)
    ckpt = Checkpoint(d)
    ckpt.check(spec)
    assert set(spec.tensor_shapes()) == set(ckpt.names())
    assert spec.n_params == sum(math.prod(ckpt.info(n).shape) for n in ckpt.names())


def test_spec_round_trips_through_the_manifest_form(tiny_checkpoint):
    for variant in tiny.VARIANTS:
        spec = PhiSpec.from_hf_config(tiny_checkpoint(variant))
        again = PhiSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec


BASE = dict(model_type="phi3", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.mark.parametrize("change, field", [
    ({"vocab_size": None}, "vocab_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_size": 66}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"model_type": "llama"}, "model_type"),
    ({"sliding_window": -4}, "sliding_window"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8},
      "original_max_position_embeddings": 16}, "short_factor"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_bad_configs_name_the_field(change, field):
    cfg = {**BASE, **change}
    with pytest.raises((ValueError, NotImplementedError), match=field):
        PhiSpec.from_hf_config(cfg)


@pytest.mark.parametrize("model_type, words", [("phi4flash", "Mamba"), ("phi3_v", "image encoder")])
def test_unsupported_architectures_are_refused(model_type, words):
    with pytest.raises(NotImplementedError, match=words) as e:
        PhiSpec.from_hf_config({**BASE, "model_type": model_type})
    assert "supports" in str(e.value)


def test_su_is_longrope_and_missing_files_are_named(tmp_path):
    cfg = {**BASE, "max_position_embeddings": 256, "original_max_position_embeddings": 64,
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    spec = PhiSpec.from_hf_config(cfg)
    assert spec.rope_scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    with pytest.raises(FileNotFoundError, match="config.json"):
        PhiSpec.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        PhiSpec.from_hf_config(tmp_path)


CONFIGS = __import__("pathlib").Path(__file__).parent / "data" / "configs"
# published config.json -> (model_type, head_dim, rotary_dim, n_rep, window, attention factor, tied, billions of params)
PUBLISHED = {
    "phi-1.json": ("phi", 64, 32, 1, None, 1.0, False, 1.418),
    "phi-2.json": ("phi", 80, 32, 1, None, 1.0, False, 2.780),
    "Phi-3-mini-4k-instruct.json": ("phi3", 96, 96, 1, 2047, 1.0, False, 3.821),
    "Phi-3.5-mini-instruct.json": ("phi3", 96, 96, 1, None, math.sqrt(1 + math.log(32) / math.log(4096)), False, 3.821),
    "Phi-3-medium-4k-instruct.json": ("phi3", 128, 128, 4, 2047, 1.0, False, 13.960),
    "Phi-4-mini-instruct.json": ("phi3", 128, 96, 3, None, math.sqrt(1 + math.log(32) / math.log(4096)), True, 3.836),
    "phi-4.json": ("phi3", 128, 128, 4, None, 1.0, False, 14.660),
    "Phi-3-small-8k-instruct.json": ("phi3small", 128, 128, 4, None, 1.0, True, 7.392),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs(name):
    spec = PhiSpec.from_hf_config(CONFIGS / name)
    mt, hd, rd, rep, window, attn, tied, billions = PUBLISHED[name]
    assert (spec.model_type, spec.head_dim, spec.rotary_dim, spec.n_rep) == (mt, hd, rd, rep)
    assert spec.effective_sliding_window == window
    assert spec.rope_attention_factor == pytest.approx(attn)
    assert spec.tie_word_embeddings is tied
    assert spec.n_params / 1e9 == pytest.approx(billions, abs=0.001)
    if spec.rope_scaling is not None:
        assert len(spec.rope_scaling.long_factor) == spec.rotary_dim // 2


def test_published_phi3small_parses():
    """Phi-3-small's own keys (tests/test_phi3small.py checks the model): its intermediate size, rope base and
    norm epsilon under their names, tied embeddings by default, query_key_value always biased."""
    spec = PhiSpec.from_hf_config(CONFIGS / "Phi-3-small-8k-instruct.json")
    assert (spec.intermediate_size, spec.rope_theta, spec.norm_eps, spec.hidden_act) == (14336, 1e6, 1e-5, "gegelu")
    assert spec.attention_bias and spec.dense_attention_every_n_layers == 2 and len(spec.dummy_token_ids) == 91
