"""config.json -> PhiSpec: both dialects, every field type-checked before it is used.

The published dialect keeps ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` at the top level;
transformers 5 writes ``rope_parameters``.  A config.json is untrusted input: a field of the wrong type is refused
with its name and value (``"tie_word_embeddings": "false"`` is not false, it is an error), and sizes are bounded by
PhiSpec.validate (spec.LIMITS) before anything is built from them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from . import arch
from .spec import LIMITS, LONGROPE_NAMES, UNSUPPORTED_MODEL_TYPES, LongRope, PhiSpec, is_int, is_number


def parse_config(config: Mapping[str, Any] | str | Path, name: str | None = None) -> PhiSpec:
    """A config.json (a dict, a file, or a checkpoint directory) as a validated PhiSpec."""
    source = "config"
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        source = str(path)
        if not path.is_file():
            if path.exists():  # a FIFO or a device would block the read
                raise ValueError(f"{path}: not a regular file (a directory, FIFO or device)")
            raise FileNotFoundError(f"{path}: no config.json (a Hugging Face checkpoint directory has one)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise ValueError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from None
        name = name or path.parent.name
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    return _parse(dict(config), source, name)


def _bad(source: str, key: str, v, allowed: str) -> ValueError:
    return ValueError(f"{source}: field {key!r} is {v!r:.80}; {allowed}")


def _require(cfg: dict, key: str, source: str, kind: type = int):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: missing required field {key!r}")
    v = cfg[key]
    if kind is int and not is_int(v):
        raise ValueError(f"{source}: field {key!r} must be an integer, got {v!r:.80}")
    if kind is float and not is_number(v):
        raise ValueError(f"{source}: field {key!r} must be a finite number, got {v!r:.80}")
    return kind(v)


def _optional(cfg: dict, key: str, source: str, check, allowed: str, default=None):
    v = cfg.get(key)
    if v is None:
        return default
    if not check(v):
        raise _bad(source, key, v, allowed)
    return v


def _rope_params(cfg: dict, source: str) -> dict:
    """Merge both dialects: transformers 5 keeps rope settings in rope_parameters, releases at the top level."""
    merged: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        rs = cfg.get(key)
        if rs is not None and not isinstance(rs, dict):
            raise _bad(source, key, rs, "it must be an object (or null)")
        if key == "rope_parameters" and rs is not None and isinstance(rs.get("full_attention"), dict):
            rs = rs["full_attention"]  # transformers 5 may nest per-attention-type parameters; Phi has one kind
        merged.update(rs or {})
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in merged and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def _token_ids(cfg: dict, source: str) -> tuple[int | None, tuple[int, ...], int | None]:
    bos = _optional(cfg, "bos_token_id", source, is_int, "it must be an integer token id or null")
    pad = _optional(cfg, "pad_token_id", source, is_int, "it must be an integer token id or null")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(is_int(i) for i in eos_ids):
        raise _bad(source, "eos_token_id", eos, "it must be a token id or a list of token ids")
    return bos, eos_ids, pad


def _parse(cfg: dict, source: str, name: str | None) -> PhiSpec:
    mt = cfg.get("model_type")
    if isinstance(mt, str) and mt in UNSUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"{source}: model_type {mt!r} ({UNSUPPORTED_MODEL_TYPES[mt]}) is not supported; edgephi supports "
            f"{arch.supported()}")
    if not isinstance(mt, str) or mt not in arch.model_types():
        raise ValueError(f"{source}: field 'model_type' is {mt!r:.80}; supported: {', '.join(arch.model_types())} "
                         f"(known but unsupported: {', '.join(UNSUPPORTED_MODEL_TYPES)})")
    family = arch.get(mt)
    small = _phi3small_fields(cfg, source) if mt == "phi3small" else {}
    if small:
        cfg = {**cfg, **small.pop("_config")}  # its names for the shared fields, read below as theirs
    if _optional(cfg, "qk_layernorm", source, lambda v: isinstance(v, bool), "it must be true or false"):
        raise NotImplementedError(f"{source}: qk_layernorm=true is not used by any Phi release and is not supported")

    rope = _rope_params(cfg, source)
    heads = _require(cfg, "num_attention_heads", source)
    kv_heads = _optional(cfg, "num_key_value_heads", source, is_int, "it must be an integer", default=heads)
    max_pos = _require(cfg, "max_position_embeddings", source)
    eps_key = family.norm_eps_key
    eps = float(_require(cfg, eps_key, source, float)) if cfg.get(eps_key) is not None else 1e-5
    orig = _optional(rope, "original_max_position_embeddings", source, is_int, "it must be an integer")

    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type is not None and not isinstance(rope_type, str):
        raise _bad(source, "rope_scaling.type", rope_type, "it must be a string")
    longrope = None
    if rope_type in LONGROPE_NAMES:
        longrope = _parse_longrope(rope, max_pos, orig, source)
        orig = longrope.original_max_position_embeddings
    elif rope_type not in (None, "default"):
        raise NotImplementedError(f"{source}: rope type {rope_type!r:.80} is not supported for Phi; "
                                  f"supported: default, longrope (alias su)")

    bos, eos_ids, pad = _token_ids(cfg, source)
    theta = _optional(rope, "rope_theta", source, is_number, "it must be a finite number", default=10000.0)
    prf = _optional(rope, "partial_rotary_factor", source, is_number, "it must be a finite number", default=1.0)
    spec = PhiSpec(
        model_type=mt,
        vocab_size=_require(cfg, "vocab_size", source),
        hidden_size=_require(cfg, "hidden_size", source),
        intermediate_size=_require(cfg, "intermediate_size", source),
        num_hidden_layers=_require(cfg, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rope_theta=float(theta),
        partial_rotary_factor=float(prf),
        norm_eps=eps,
        hidden_act=_optional(cfg, "hidden_act", source, lambda v: isinstance(v, str), "it must be a string",
                             default=family.activations[0]),
        tie_word_embeddings=_optional(cfg, "tie_word_embeddings", source, lambda v: isinstance(v, bool),
                                      "it must be true or false (a JSON boolean, not a string)", default=False),
        sliding_window=_optional(cfg, "sliding_window", source, is_int, "it must be an integer or null"),
        original_max_position_embeddings=orig,
        rope_scaling=longrope,
        bos_token_id=bos,
        eos_token_id=eos_ids,
        pad_token_id=pad,
        torch_dtype=_optional(cfg, "torch_dtype", source, lambda v: isinstance(v, str), "it must be a string",
                              default=cfg.get("dtype") if isinstance(cfg.get("dtype"), str) else None),
        name=name,
        **_moe_fields(cfg, source),
        **small,
    )
    if mt == "phi3small" and longrope is not None:
        spec = _phi3small_longrope(spec, rope, source)
    try:
        spec.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return spec


def _moe_fields(cfg: dict, source: str) -> dict:
    """Phi-3.5-MoE's experts, router and optional biases (absent in the dense families: their defaults)."""
    is_bool = lambda v: isinstance(v, bool)  # noqa: E731
    out = {}
    for key, check, allowed, default in (
            ("num_local_experts", is_int, "it must be an integer", 0),
            ("num_experts_per_tok", is_int, "it must be an integer", 0),
            ("router_jitter_noise", is_number, "it must be a finite number", 0.0),
            ("attention_bias", is_bool, "it must be true or false", False),
            ("lm_head_bias", is_bool, "it must be true or false", False)):
        out[key] = _optional(cfg, key, source, check, allowed, default=default)
    out["router_jitter_noise"] = float(out["router_jitter_noise"])
    return out


def _phi3small_fields(cfg: dict, source: str) -> dict:
    """Phi-3-small's own keys, with Phi3SmallConfig's defaults (configuration_phi3_small.py) where absent; its
    names for shared fields come back under "_config" (intermediate size, rope base, tied embeddings)."""
    is_bool = lambda v: isinstance(v, bool)  # noqa: E731
    positive = lambda v: is_number(v) and v > 0  # noqa: E731
    num, pos_int = "it must be a finite number > 0", "it must be an integer >= 1"
    out: dict[str, Any] = {}
    for key, check, allowed, default in (
            ("mup_embedding_multiplier", positive, num, 10.0), ("mup_width_multiplier", positive, num, 8.0),
            ("mup_attn_multiplier", positive, num, 1.0), ("mup_use_scaling", is_bool, "it must be true or false", True),
            ("rope_position_scale", positive, num, 1.0), ("gegelu_limit", positive, num, 20.0),
            ("blocksparse_block_size", lambda v: is_int(v) and v > 0, pos_int, 64),
            ("blocksparse_num_local_blocks", lambda v: is_int(v) and v > 0, pos_int, 16),
            ("blocksparse_vert_stride", lambda v: is_int(v) and v > 0, pos_int, 8),
            ("blocksparse_homo_head_pattern", is_bool, "it must be true or false", False),
            ("dense_attention_every_n_layers", lambda v: is_int(v) and v >= 0, "it must be an integer >= 0 or null",
             2)):
        out[key] = _optional(cfg, key, source, check, allowed, default=default)
    if "dense_attention_every_n_layers" in cfg and cfg["dense_attention_every_n_layers"] is None:
        out["dense_attention_every_n_layers"] = 0  # the original: every layer block-sparse
    for key in ("mup_embedding_multiplier", "mup_width_multiplier", "mup_attn_multiplier", "rope_position_scale",
                "gegelu_limit"):
        out[key] = float(out[key])
    # the triton kernel's constraint (BlockSparseAttentionLayer): a power of 2 >= 16 dividing the block size
    kernel = _optional(cfg, "blocksparse_triton_kernel_block_size", source, lambda v: is_int(v) and v >= 16,
                       "it must be an integer >= 16", default=out["blocksparse_block_size"])
    if kernel & (kernel - 1) or out["blocksparse_block_size"] % kernel:
        raise _bad(source, "blocksparse_triton_kernel_block_size", kernel,
                   f"it must be a power of 2 dividing blocksparse_block_size={out['blocksparse_block_size']}")
    ff = _optional(cfg, "ff_intermediate_size", source, lambda v: is_int(v) and v > 0, pos_int)
    if ff is None:  # Phi3SmallConfig.intermediate_size: ff_dim_multiplier * (hidden // 3) * 2, padded to 256
        mult = _optional(cfg, "ff_dim_multiplier", source, lambda v: is_int(v) and v > 0, pos_int)
        hidden = _require(cfg, "hidden_size", source)
        if mult is None:
            raise ValueError(f"{source}: Phi-3-small needs 'ff_intermediate_size' or 'ff_dim_multiplier'")
        ff = mult * (hidden // 3) * 2
        if _optional(cfg, "gegelu_pad_to_256", source, is_bool, "it must be true or false", default=True):
            ff = -(-ff // 256) * 256
    from .arch.phi3small import DUMMY_TOKEN_IDS

    vocab = cfg.get("vocab_size")
    out["dummy_token_ids"] = tuple(i for i in DUMMY_TOKEN_IDS if is_int(vocab) and i < vocab)
    base = _optional(cfg, "rope_embedding_base", source, lambda v: is_number(v) and v > 0, num, default=10 ** 6)
    tie = _optional(cfg, "tie_word_embeddings", source, is_bool, "it must be true or false", default=True)
    out["_config"] = {"intermediate_size": ff, "rope_theta": float(base), "tie_word_embeddings": tie,
                      "attention_bias": True}  # query_key_value and dense always have biases
    return out


def _phi3small_longrope(spec: PhiSpec, rope: dict, source: str) -> PhiSpec:
    """Phi-3-small's LongRoPE (positional_embedding.py): cos and sin times short_mscale (1.0 when absent or <= 0)
    with the short factors, long_mscale (else sqrt(1 + ln(s) / ln(L_orig)), s = L / L_orig) with the long ones."""
    import dataclasses

    rs = spec.rope_scaling
    short, long = rope.get("short_mscale"), rope.get("long_mscale")
    s = spec.max_position_embeddings / rs.original_max_position_embeddings
    computed = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(rs.original_max_position_embeddings))
    short = float(short) if is_number(short) and short > 0 else 1.0
    long = float(long) if is_number(long) and long > 0 else computed
    return dataclasses.replace(spec, rope_scaling=dataclasses.replace(rs, attention_factor=short,
                                                                       long_attention_factor=long))


def _parse_longrope(rope: dict, max_pos: int, orig: int | None, source: str) -> LongRope:
    """LongRoPE's factor lists and attention factor (transformers' _compute_longrope_parameters)."""
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, list) or not v:
            raise _bad(source, f"rope_scaling.{key}", v, "it must be a non-empty list of numbers for LongRoPE")
        bad = [i for i, x in enumerate(v) if not (is_number(x) and x > 0)]
        if bad:
            raise _bad(source, f"rope_scaling.{key}[{bad[0]}]", v[bad[0]], "every entry must be a finite number > 0")
    if orig is None:
        raise ValueError(f"{source}: LongRoPE needs 'original_max_position_embeddings'")
    if orig < 2:
        raise _bad(source, "original_max_position_embeddings", orig, "LongRoPE needs an integer >= 2")
    attn = rope.get("attention_factor")
    if attn is None:
        # transformers' _compute_longrope_parameters: sqrt(1 + ln(s) / ln(L_orig)) with s = L / L_orig
        # (the "su" releases carried the same value implicitly).
        factor = rope.get("factor")
        if factor is not None and not (is_number(factor) and factor > 0):
            raise _bad(source, "rope_scaling.factor", factor, "it must be a finite number > 0")
        if factor is None:
            limit = LIMITS["max_position_embeddings"]
            if not 0 < max_pos <= limit:  # checked here too: it is divided before validate() runs
                raise _bad(source, "max_position_embeddings", max_pos, f"it must be an integer in 1..{limit}")
            factor = max_pos / orig
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    if not is_number(attn) or attn <= 0:
        raise _bad(source, "rope_scaling.attention_factor", attn, "it must be a finite number > 0")
    mscale = {}
    for key in ("short_mscale", "long_mscale"):  # Phi-3.5-MoE: cos and sin scaled by these instead
        mscale[key] = _optional(rope, key, source, lambda v: is_number(v) and v > 0, "it must be a number > 0")
    if mscale["short_mscale"] is not None:
        attn = mscale["short_mscale"]
    return LongRope(short_factor=tuple(float(x) for x in rope["short_factor"]),
                    long_factor=tuple(float(x) for x in rope["long_factor"]),
                    original_max_position_embeddings=int(orig), attention_factor=float(attn),
                    long_attention_factor=None if mscale["long_mscale"] is None else float(mscale["long_mscale"]))
