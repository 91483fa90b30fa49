"""PhiSpec: one frozen description of a Phi checkpoint, shared by every exporter, backend and test.

Field names follow Hugging Face's config.json.  Variants within a family are fields, not subclasses; each family
(``model_type``) is one architecture file in edgephi/arch/, which says what its checkpoint holds and how its
block computes.

config.json is parsed by edgephi/hf_config.py (both dialects: the published one and transformers 5's
``rope_parameters``); ``validate`` type-checks every field and bounds every size (``LIMITS``), so a spec from a
config.json or a manifest.json is safe to build tables from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import Any, Mapping

from . import arch

# Architectures that share the Phi name but have no architecture file yet: refuse them with a clear message.
UNSUPPORTED_MODEL_TYPES = {
    "phi3_v": "Phi-3-vision (image encoder)",
    "phi4flash": "Phi-4-mini-flash-reasoning (Mamba layers, differential sliding-window attention, gated memory "
                 "units)",
    "phi4mm": "Phi-4-multimodal (audio and vision encoders)",
    "phi4_multimodal": "Phi-4-multimodal (audio and vision encoders)",
}
# "su" is the name the first Phi-3-128k releases used for LongRoPE.
LONGROPE_NAMES = ("longrope", "su")
# Upper bounds on the sizes a config may give: far above every Phi release (largest: vocab 200064, hidden 5120,
# intermediate 17920, 40 layers, 40 heads, 131072 positions) and low enough that what is built from them before
# the checkpoint is compared (per-layer tables, rotary tables of max_position_embeddings rows: 2**20 rows of
# rotary_dim/2 float32 are 256 MiB at rotary_dim 128) cannot exhaust memory or run for minutes.
LIMITS = {"vocab_size": 2**22, "hidden_size": 2**18, "intermediate_size": 2**18, "num_hidden_layers": 4096,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 2**20,
          "original_max_position_embeddings": 2**20, "sliding_window": 2**24}
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings")
_LONGROPE_KEYS = ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor",
                  "long_attention_factor")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (JSON's NaN and Infinity are not numbers here; bools are not either)."""
    if isinstance(v, float):
        return math.isfinite(v)
    return is_int(v) and abs(v) <= 1e308  # a larger int does not convert to a float


@dataclass(frozen=True)
class LongRope:
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753) as Phi-3 uses it.

    Each rotary frequency i is divided by ``short_factor[i]`` while the sequence is at most
    ``original_max_position_embeddings`` long and by ``long_factor[i]`` beyond; cos and sin are multiplied by
    ``attention_factor`` (transformers: ``_compute_longrope_parameters``), or, where a release gives a short and a
    long mscale (Phi-3.5-MoE), by ``attention_factor`` with the short factors and ``long_attention_factor`` with
    the long ones.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float
    long_attention_factor: float | None = None


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
    # mixture of experts (Phi-3.5-MoE); 0 = a dense MLP
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    router_jitter_noise: float = 0.0  # sparsemixer's eps: experts within 2 x this (relative) of the best share it
    attention_bias: bool = False  # q/k/v/o biases where the family makes them optional (Phi-3.5-MoE)
    lm_head_bias: bool = False
    # Phi-3-small (phi3small): muP scales, rotary position scale, GEGELU, block-sparse attention, masked ids
    mup_embedding_multiplier: float = 1.0  # embeddings times this
    mup_width_multiplier: float = 1.0  # logits divided by this
    mup_attn_multiplier: float = 1.0
    mup_use_scaling: bool = False  # softmax scale mup_attn_multiplier / head_dim instead of 1/sqrt(head_dim)
    rope_position_scale: float = 1.0  # positions times this (without LongRoPE)
    gegelu_limit: float | None = None
    blocksparse_block_size: int = 0
    blocksparse_num_local_blocks: int = 0
    blocksparse_vert_stride: int = 0
    blocksparse_homo_head_pattern: bool = False
    dense_attention_every_n_layers: int = 0  # layer i is dense when (i + 1) % n == 0; 0: none is
    dummy_token_ids: tuple[int, ...] = ()  # their logits are masked (the tokenizer never produces them)
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
            return [b * self.rope_position_scale for b in base]  # (position * scale) * inv_freq
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
        d["dummy_token_ids"] = list(self.dummy_token_ids)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in asdict(self.rope_scaling).items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PhiSpec":
        """Inverse of to_dict (the manifest's form, not config.json); every field checked by validate()."""
        if not isinstance(d, Mapping):
            raise ValueError(f"spec: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(repr(k) for k in d if k not in names)
        if unknown:
            raise ValueError(f"spec: unknown field(s) {', '.join(unknown)[:200]}; known: {', '.join(sorted(names))}")
        missing = [f for f in _SIZES + ("model_type",) if f not in d]
        if missing:
            raise ValueError(f"spec: missing field(s) {', '.join(missing)}")
        d = dict(d)
        rs = d.get("rope_scaling")
        if rs is not None:
            if (not isinstance(rs, Mapping) or not set(_LONGROPE_KEYS[:4]) <= set(rs) <= set(_LONGROPE_KEYS)
                    or not all(isinstance(rs[k], list) for k in _LONGROPE_KEYS[:2])):
                raise ValueError(f"spec: rope_scaling={rs!r:.80}; expected null or {{short_factor: [...], "
                                 "long_factor: [...], original_max_position_embeddings, attention_factor}")
            d["rope_scaling"] = LongRope(tuple(rs["short_factor"]), tuple(rs["long_factor"]),
                                         rs["original_max_position_embeddings"], rs["attention_factor"],
                                         rs.get("long_attention_factor"))
        eos = d.get("eos_token_id")
        if eos is not None and not isinstance(eos, list):
            raise ValueError(f"spec: eos_token_id={eos!r:.80}; expected a list of token ids")
        d["eos_token_id"] = tuple(eos or ())
        dummy = d.get("dummy_token_ids")
        if dummy is not None and not isinstance(dummy, list):
            raise ValueError(f"spec: dummy_token_ids={dummy!r:.80}; expected a list of token ids")
        d["dummy_token_ids"] = tuple(dummy or ())
        spec = cls(**d)
        spec.validate()
        return spec

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path, name: str | None = None) -> "PhiSpec":
        """Build from a config.json (a dict, a file, or a checkpoint directory)."""
        from .hf_config import parse_config

        return parse_config(config, name)

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every field's type and range; sizes within LIMITS; the family's own rules (ValueError naming the field)."""
        def bad(field_name: str, why: str) -> ValueError:  # field_name may be dotted: rope_scaling.long_factor
            return ValueError(f"PhiSpec{f'({self.name!r:.60})' if self.name else ''}: "
                              f"{field_name}={attrgetter(field_name)(self)!r:.80}: {why}")

        if not isinstance(self.model_type, str) or self.model_type not in arch.model_types():
            raise bad("model_type", f"supported: {', '.join(arch.model_types())}")
        family = arch.get(self.model_type)
        for f in _SIZES:
            v = getattr(self, f)
            if not is_int(v) or not 0 < v <= LIMITS[f]:
                raise bad(f, f"must be an integer in 1..{LIMITS[f]}")
        for f in ("sliding_window", "original_max_position_embeddings"):
            v = getattr(self, f)
            if v is not None and (not is_int(v) or not 0 < v <= LIMITS[f]):
                raise bad(f, f"must be null or an integer in 1..{LIMITS[f]}")
        if self.hidden_size % self.num_attention_heads:
            raise bad("hidden_size", f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        for f in ("rope_theta", "partial_rotary_factor", "norm_eps"):
            if not is_number(getattr(self, f)) or not getattr(self, f) > 0:
                raise bad(f, "must be a finite number > 0")
        if not self.partial_rotary_factor <= 1.0:
            raise bad("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise bad("partial_rotary_factor", f"gives rotary_dim={self.rotary_dim}; it must be even and > 0")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in family.activations:
            raise bad("hidden_act", f"{self.model_type} supports {', '.join(family.activations)}")
        for f in ("tie_word_embeddings", "attention_bias", "lm_head_bias", "mup_use_scaling",
                  "blocksparse_homo_head_pattern"):
            if not isinstance(getattr(self, f), bool):
                raise bad(f, "must be true or false")
        for f in ("num_local_experts", "num_experts_per_tok"):
            if not is_int(getattr(self, f)) or not 0 <= getattr(self, f) <= 1024:
                raise bad(f, "must be an integer in 0..1024")
        if not is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise bad("router_jitter_noise", "must be a finite number in [0, 1)")
        self._validate_token_ids(bad)
        self._validate_phi3small(bad)
        for f in ("torch_dtype", "name"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), str):
                raise bad(f, "must be a string or null")
        problem = family.check(self)
        if problem is not None:
            raise bad(*problem)
        self._validate_longrope(bad)

    def _validate_token_ids(self, bad) -> None:
        ok = lambda i: is_int(i) and 0 <= i < self.vocab_size  # noqa: E731
        for f in ("bos_token_id", "pad_token_id"):
            if getattr(self, f) is not None and not ok(getattr(self, f)):
                raise bad(f, f"must be null or a token id in 0..{self.vocab_size - 1} (vocab_size)")
        if not isinstance(self.eos_token_id, tuple) or not all(ok(i) for i in self.eos_token_id):
            raise bad("eos_token_id", f"must be token ids in 0..{self.vocab_size - 1} (vocab_size)")

    def _validate_phi3small(self, bad) -> None:
        for f in ("mup_embedding_multiplier", "mup_width_multiplier", "mup_attn_multiplier", "rope_position_scale"):
            if not is_number(getattr(self, f)) or not getattr(self, f) > 0:
                raise bad(f, "must be a finite number > 0")
        if self.gegelu_limit is not None and not (is_number(self.gegelu_limit) and self.gegelu_limit > 0):
            raise bad("gegelu_limit", "must be null or a finite number > 0")
        for f in ("blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride",
                  "dense_attention_every_n_layers"):
            if not is_int(getattr(self, f)) or not 0 <= getattr(self, f) <= LIMITS["max_position_embeddings"]:
                raise bad(f, f"must be an integer in 0..{LIMITS['max_position_embeddings']}")
        ids = self.dummy_token_ids
        if not isinstance(ids, tuple) or not all(is_int(i) and 0 <= i < self.vocab_size for i in ids):
            raise bad("dummy_token_ids", f"must be token ids in 0..{self.vocab_size - 1} (vocab_size)")

    def _validate_longrope(self, bad) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, LongRope):
            raise bad("rope_scaling", "must be null or LongRoPE parameters")
        half = self.rotary_dim // 2
        for fname in ("short_factor", "long_factor"):
            fac = getattr(rs, fname)
            if not isinstance(fac, tuple):
                raise bad(f"rope_scaling.{fname}", "must be a list of numbers")
            if len(fac) != half:
                raise bad(f"rope_scaling.{fname}", f"has {len(fac)} entries; rotary_dim/2 = {half} needed")
            if not all(is_number(x) and x > 0 for x in fac):
                raise bad(f"rope_scaling.{fname}", "entries must be finite positive numbers")
        limit = LIMITS["original_max_position_embeddings"]
        if not is_int(rs.original_max_position_embeddings) or not 2 <= rs.original_max_position_embeddings <= limit:
            raise bad("rope_scaling.original_max_position_embeddings", f"must be an integer in 2..{limit}")
        if not is_number(rs.attention_factor) or not rs.attention_factor > 0:
            raise bad("rope_scaling.attention_factor", "must be a finite number > 0")
        if rs.long_attention_factor is not None and not (is_number(rs.long_attention_factor)
                                                         and rs.long_attention_factor > 0):
            raise bad("rope_scaling.long_attention_factor", "must be null or a finite number > 0")
