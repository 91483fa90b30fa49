"""The onnx-npu format (bundle/onnx-npu/): static-shape graphs for Qualcomm's Hexagon HTP (QNN), compiled per SoC.

Files: prefill.onnx (S = chunk tokens) and decode.onnx (S = 1), both reading weights.data (each weight stored
once); npu_config.json (this contract's NpuConfig); qnn/<target>/{prefill,decode}.onnx (+ .bin) EPContext models
(QNN context binaries) for each compiled target.

One graph per sequence length S, every shape fixed at export:
inputs   input_ids (1, S) int32; position_ids (1, S) int32 = row of the rotary table (LongRoPE: + rope_long_offset
         for the long rows); attention_bias (1, 1, S, n_ctx + S) float16, 0 = attend, MASK_VALUE = masked, columns
         the n_ctx cache slots then the S new tokens; past_key.{i}, past_value.{i} (1, n_kv, n_ctx, head_dim)
         float16, the whole static cache
outputs  logits (1, S, V) float16; present_key.{i}, present_value.{i} (1, n_kv, S, head_dim) float16, the new
         tokens' K (rotated) and V

The runtime keeps the cache and writes the new K/V into it (the graph never scatters), and builds the mask:
causal order, cache validity, the sliding window and chunk padding all live in attention_bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import MASK_VALUE, FolderConfig

FORMAT = "onnx-npu"
CONFIG = "npu_config.json"
DATA = "weights.data"
GRAPHS = ("prefill", "decode")
DEFAULT_CHUNK = 32
INPUTS = ("input_ids", "position_ids", "attention_bias")
PAST = {"key": "past_key.%d", "value": "past_value.%d"}
PRESENT = {"key": "present_key.%d", "value": "present_value.%d"}
LOGITS = "logits"


@dataclass(frozen=True)
class Target:
    """An HTP architecture and the SoC id QNN uses for it (QNN SDK docs, "Supported Snapdragon devices")."""

    name: str
    htp_arch: int
    soc_model: int
    chip: str


# float16 activations need an HTP that computes in float16 (v73 and later); v68/v69 are left out (see the
# htp_arch 69 notes in export/onnx_npu.py).  With soc_model set, the x86 emulation follows the SoC.
TARGETS = {t.name: t for t in (
    Target("sm8550", 73, 43, "Snapdragon 8 Gen 2 (Hexagon v73)"),
    Target("sc8380xp", 73, 60, "Snapdragon X Elite (Hexagon v73)"),
    Target("sm8650", 75, 57, "Snapdragon 8 Gen 3 (Hexagon v75)"),
    Target("sm8750", 79, 69, "Snapdragon 8 Elite (Hexagon v79)"),
)}
DEFAULT_TARGETS = ("sm8550", "sm8650", "sm8750")


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown QNN target {name!r}; known: {', '.join(TARGETS)}") from None


@dataclass
class NpuConfig(FolderConfig):
    """npu_config.json.  graphs: {graph: {"file", "seq_len"}}; targets: {target: {"htp_arch", "soc_model",
    "chip", "graphs": {graph: context model path}}}, paths relative to the format's folder."""

    CONFIG = CONFIG
    FORMAT = FORMAT

    graphs: dict
    n_ctx: int  # static cache length of the graphs
    chunk: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int | None
    # LongRoPE: rows rope_long_offset.. of the rotary table are the long ones, used once a forward's last
    # position + 1 exceeds rope_long_after (transformers' dynamic_rope_update)
    rope_long_offset: int | None
    rope_long_after: int | None
    bits: int
    quant: str
    quantize_lm_head: bool
    bos_token_id: int | None
    eos_token_id: list[int]
    pad_token_id: int | None
    mask_value: float = MASK_VALUE
    io: dict = field(default_factory=lambda: {"inputs": list(INPUTS) + [PAST["key"], PAST["value"]],
                                              "outputs": [LOGITS, PRESENT["key"], PRESENT["value"]],
                                              "dtype": "float16"})
    targets: dict = field(default_factory=dict)

    def check(self) -> None:
        for name in GRAPHS:
            self.graphs[name]["file"]
        int(self.n_ctx), int(self.chunk), int(self.num_hidden_layers)
