"""PhiSpec: one frozen description of a Phi checkpoint, shared by every exporter, backend and test.

Field names follow Hugging Face's config.json.  Variants within a family are fields, not subclasses; each family
(``model_type``) is one architecture file in edgephi/arch/, which says what its checkpoint holds and how its
block computes.

Both config dialects parse: the published one (top-level ``rope_theta``, ``rope_scaling``,
``partial_rotary_factor``) and transformers 5's ``rope_parameters``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import arch

# Architectures that share the Phi name but have no architecture file yet: refuse them with a clear message.
UNSUPPORTED_MODEL_TYPES = {
    "phi3small": "Phi-3-small (blocksparse attention, GEGLU MLP, muP scaling)",
    "phimoe": "Phi-3.5-MoE (mixture-of-experts MLP)",
    "phi3_v": "Phi-3-vision (image encoder)",
    "phi4mm": "Phi-4-multimodal (audio and vision encoders)",
    "phi4_multimodal": "Phi-4-multimodal (audio and vision encoders)",
}
# "su" is the name the first Phi-3-128k releases used for LongRoPE.
LONGROPE_NAMES = ("longrope", "su")


@dataclass(frozen=True)
class LongRope:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753) as Phi-3 uses it.

    Each rotary frequency i is divided by ``short_factor[i]`` while the sequence is at most
    ``original_max_position_embeddings`` long and by ``long_factor[i]`` beyond; cos and sin are multiplied by
    ``attention_factor`` (transformers: ``_compute_longrope_parameters``).
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


@dataclass(frozen=True)
class PhiSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    original_max_position_embeddings: int | None = None
    rope_scaling: LongRope | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    name: str | None = field(default=None, compare=False)

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that are rotated (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 = plain multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def effective_sliding_window(self) -> int | None:
        """The window if it can matter: a window at least as long as the context is no window.

        Convention (transformers' sliding_window_overlay): the query at position p attends to keys at
        positions p - sliding_window < k <= p, i.e. ``sliding_window`` keys including itself.
        """
        sw = self.sliding_window
        if sw is None or sw >= self.max_position_embeddings:
            return None
        return sw

    def rope_inv_freq(self, long: bool = False) -> "list[float]":
        """Inverse rotary frequencies, length rotary_dim / 2, with LongRoPE's factor applied."""
        half = self.rotary_dim // 2
        base = [1.0 / (self.rope_theta ** (2 * i / self.rotary_dim)) for i in range(half)]
        if self.rope_scaling is None:
            return base
        factors = self.rope_scaling.long_factor if long else self.rope_scaling.short_factor
        return [b / f for b, f in zip(base, factors)]

    @property
    def rope_attention_factor(self) -> float:
        return 1.0 if self.rope_scaling is None else self.rope_scaling.attention_factor

    # ---- the checkpoint this spec describes ------------------------------------------------------------------
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hugging Face checkpoint of this spec holds, with its shape (out, in for weights)."""
        return arch.get(self.model_type).tensors(self)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    # ---- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in asdict(self.rope_scaling).items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PhiSpec":
        """Inverse of to_dict (the manifest's form, not config.json)."""
        d = dict(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            d["rope_scaling"] = LongRope(short_factor=tuple(rs["short_factor"]), long_factor=tuple(rs["long_factor"]),
                                         original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                                         attention_factor=float(rs["attention_factor"]))
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        spec = cls(**d)
        spec.validate()
        return spec

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path, name: str | None = None) -> "PhiSpec":
        """Build from a config.json (a dict, a file, or a checkpoint directory)."""
        source = "config"
        if isinstance(config, (str, Path)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no config.json (a Hugging Face checkpoint directory has one)")
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            name = name or path.parent.name
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        return _parse(dict(config), source, name)

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field_name: str, why: str) -> ValueError:
            return ValueError(f"PhiSpec{'(' + self.name + ')' if self.name else ''}: {field_name}={getattr(self, field_name)!r}: {why}")

        if self.model_type not in arch.model_types():
            raise bad("model_type", f"supported: {', '.join(arch.model_types())}")
        family = arch.get(self.model_type)
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(f, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise bad("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise bad("partial_rotary_factor", f"gives rotary_dim={self.rotary_dim}; it must be even and > 0")
        if self.hidden_act not in family.activations:
            raise bad("hidden_act", f"{self.model_type} supports {', '.join(family.activations)}")
        if not self.rope_theta > 0:
            raise bad("rope_theta", "must be > 0")
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be > 0")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise bad("sliding_window", "must be a positive integer or null")
        problem = family.check(self)
        if problem is not None:
            raise bad(*problem)
        rs = self.rope_scaling
        if rs is not None:
            half = self.rotary_dim // 2
            for fname in ("short_factor", "long_factor"):
                fac = getattr(rs, fname)
                if len(fac) != half:
                    raise bad("rope_scaling", f"{fname} has {len(fac)} entries; rotary_dim/2 = {half} needed")
                if any(not (isinstance(x, (int, float)) and x > 0) for x in fac):
                    raise bad("rope_scaling", f"{fname} entries must be positive numbers")
            if rs.original_max_position_embeddings <= 0:
                raise bad("rope_scaling", "original_max_position_embeddings must be > 0")


# ---- config.json parsing -----------------------------------------------------------------------------------------
def _require(cfg: dict, key: str, source: str, kind: type = int):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{source}: missing required field {key!r}")
    v = cfg[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"{source}: field {key!r} must be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"{source}: field {key!r} must be a number, got {v!r}")
    return kind(v)


def _rope_params(cfg: dict) -> dict:
    """Merge both dialects: transformers 5 keeps rope settings in rope_parameters, releases at the top level."""
    merged: dict[str, Any] = {}
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict):
        merged.update(rs)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        # transformers 5 may nest per-attention-type parameters; Phi has one kind of attention
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = rp["full_attention"]
        merged.update(rp)
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in merged and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def _parse(cfg: dict, source: str, name: str | None) -> PhiSpec:
    mt = cfg.get("model_type")
    if mt in UNSUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"{source}: model_type {mt!r} ({UNSUPPORTED_MODEL_TYPES[mt]}) is not supported; edgephi supports "
            f"{arch.supported()}")
    if mt not in arch.model_types():
        raise ValueError(f"{source}: field 'model_type' is {mt!r}; supported: {', '.join(arch.model_types())} "
                         f"(known but unsupported: {', '.join(UNSUPPORTED_MODEL_TYPES)})")
    family = arch.get(mt)
    if cfg.get("qk_layernorm"):
        raise NotImplementedError(f"{source}: qk_layernorm=true is not used by any Phi release and is not supported")

    rope = _rope_params(cfg)
    heads = _require(cfg, "num_attention_heads", source)
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is None:
        kv_heads = heads
    elif isinstance(kv_heads, bool) or not isinstance(kv_heads, int):
        raise ValueError(f"{source}: field 'num_key_value_heads' must be an integer, got {kv_heads!r}")
    max_pos = _require(cfg, "max_position_embeddings", source)
    eps_key = family.norm_eps_key
    eps = float(_require(cfg, eps_key, source, float)) if cfg.get(eps_key) is not None else 1e-5
    orig = rope.get("original_max_position_embeddings")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int)):
        raise ValueError(f"{source}: field 'original_max_position_embeddings' must be an integer, got {orig!r}")

    rope_type = rope.get("rope_type", rope.get("type"))
    longrope = None
    if rope_type in LONGROPE_NAMES:
        longrope = _parse_longrope(rope, cfg, max_pos, orig, source)
        orig = longrope.original_max_position_embeddings
    elif rope_type not in (None, "default"):
        raise NotImplementedError(f"{source}: rope type {rope_type!r} is not supported for Phi; "
                                  f"supported: default, longrope (alias su)")

    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    sw = cfg.get("sliding_window")
    theta = rope.get("rope_theta", 10000.0)
    prf = rope.get("partial_rotary_factor", 1.0)
    for key, v in (("rope_theta", theta), ("partial_rotary_factor", prf)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{source}: field {key!r} must be a number, got {v!r}")
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
        hidden_act=cfg.get("hidden_act", family.activations[0]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=sw,
        original_max_position_embeddings=orig,
        rope_scaling=longrope,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=cfg.get("torch_dtype", cfg.get("dtype")),
        name=name,
    )
    try:
        spec.validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return spec


def _parse_longrope(rope: dict, cfg: dict, max_pos: int, orig: int | None, source: str) -> LongRope:
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"{source}: field 'rope_scaling.{key}' must be a non-empty list for LongRoPE")
    if orig is None:
        raise ValueError(f"{source}: LongRoPE needs 'original_max_position_embeddings'")
    attn = rope.get("attention_factor")
    if attn is None:
        # transformers' _compute_longrope_parameters: sqrt(1 + ln(s) / ln(L_orig)) with s = L / L_orig
        # (the "su" releases carried the same value implicitly).
        factor = rope.get("factor") or max_pos / orig
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    if isinstance(attn, bool) or not isinstance(attn, (int, float)) or attn <= 0:
        raise ValueError(f"{source}: field 'rope_scaling.attention_factor' must be a positive number, got {attn!r}")
    return LongRope(short_factor=tuple(float(x) for x in rope["short_factor"]),
                    long_factor=tuple(float(x) for x in rope["long_factor"]),
                    original_max_position_embeddings=int(orig), attention_factor=float(attn))
