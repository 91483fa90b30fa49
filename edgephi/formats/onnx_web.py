"""The web format (bundle/web/): the ONNX graph as browsers run it in onnxruntime-web (WebGPU, WebAssembly).

The graph, its inputs and outputs are the onnx format's (edgephi/formats/onnx.py: GroupQueryAttention, one KV
buffer of n_ctx positions bound as past and present), so the Python ONNX backend runs this folder too
(genai_config.json beside it).  What differs is what a browser needs:

* every weight a WebGPU adapter without ``shader-f16`` can read: the embedding table is float32 (the onnx
  format's float16 table gives all-zero logits on such an adapter, without an error); int4 weights are
  MatMulNBits with float32 scales, and activations and the KV cache are float32;
* accuracy_level 0 (float activations into MatMulNBits), so that WASM, WebGPU and the Python backend compute
  the same thing;
* the external data in pieces a browser can fetch and hold: model.onnx.data.0, .1, ... each at most
  ``piece_bytes`` (a tensor larger than that gets a piece of its own; none may pass MAX_PIECE_BYTES, the
  largest ArrayBuffer every browser allocates), listed with their sizes in web_config.json;
* a memory budget: WebAssembly's 32-bit memory (WASM_MEMORY_BYTES) holds the weights, the KV cache twice (the
  WASM engine passes it in and gets it back each step) and the activations; the exporter picks the largest n_ctx
  (a multiple of N_CTX_STEP) that fits and refuses a model whose weights alone do not fit, with the figures.

web_config.json (WebConfig) is what the browser runtime (android_demo/web/src) reads beside manifest.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import FolderConfig, default_n_ctx
from . import onnx as onnx_fmt

FORMAT = "web"
MODEL_FILE = "model.onnx"
PIECE = MODEL_FILE + ".data.%d"  # external data pieces, numbered from 0
CONFIG = "web_config.json"
SCHEMA = 1
DEFAULT_PIECE_BYTES = 1 << 30
MAX_PIECE_BYTES = (2 << 30) - (1 << 20)  # just under 2 GiB: what one fetch() into an ArrayBuffer can hold anywhere
WASM_MEMORY_BYTES = 4 << 30  # WebAssembly 32-bit linear memory: onnxruntime-web's WASM and WebGPU builds
RESERVE_BYTES = 256 << 20  # onnxruntime's own code, arena and graph beside the tensors below
N_CTX_STEP = 256
ACCURACY_LEVEL = 0
KV_COPIES = 2  # past and present are both in WebAssembly memory during a WASM step


@dataclass(frozen=True)
class Budget:
    """What a browser session of this model needs in WebAssembly memory, in bytes."""

    weights: int
    kv_per_token: int  # one copy of the cache, per position (float32, every layer, key and value)
    activations_per_token: int  # of one forward, per token evaluated at once (logits and the widest layer)
    prefill_chunk: int  # tokens a prompt is evaluated in at once (the runtime splits longer prompts)
    limit: int = WASM_MEMORY_BYTES

    def need(self, n_ctx: int) -> int:
        return (self.weights + KV_COPIES * self.kv_per_token * n_ctx + self.activations_per_token * self.prefill_chunk
                + RESERVE_BYTES)

    def largest_n_ctx(self, context_length: int) -> int:
        """The largest n_ctx (a multiple of N_CTX_STEP, or the model's context when smaller) that fits; 0: none."""
        want = default_n_ctx(context_length)
        if self.need(min(want, N_CTX_STEP)) > self.limit:
            return 0
        if self.need(want) <= self.limit:
            return want
        room = (self.limit - self.need(0)) // (KV_COPIES * self.kv_per_token)
        return max(N_CTX_STEP, room // N_CTX_STEP * N_CTX_STEP)


PREFILL_CHUNK = 256


def budget(spec, weight_bytes: int) -> Budget:
    kv = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 4
    widest = max(spec.vocab_size, 2 * spec.intermediate_size,
                 (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim)
    return Budget(weights=weight_bytes, kv_per_token=kv, activations_per_token=4 * (widest + 4 * spec.hidden_size),
                  prefill_chunk=PREFILL_CHUNK)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass
class WebConfig(FolderConfig):
    """web_config.json.  external_data: [{"path", "bytes"}] in the order written; io: the graph's input and output
    names (the onnx contract's); n_ctx: the largest cache that fits the memory budget (the runtime's default)."""

    CONFIG = CONFIG
    FORMAT = FORMAT

    model: str
    external_data: list
    n_ctx: int
    context_length: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    bits: int
    quant: str
    prefill_chunk: int
    memory: dict
    io: dict = field(default_factory=lambda: {
        "input_ids": onnx_fmt.INPUT_IDS, "attention_mask": onnx_fmt.ATTENTION_MASK, "logits": onnx_fmt.LOGITS,
        "past_key": onnx_fmt.PAST["key"], "past_value": onnx_fmt.PAST["value"],
        "present_key": onnx_fmt.PRESENT["key"], "present_value": onnx_fmt.PRESENT["value"]})
    dtype: str = "float32"
    embedding: str = "float32"
    accuracy_level: int = ACCURACY_LEVEL
    format: str = FORMAT
    schema: int = SCHEMA

    def check(self) -> None:
        if self.schema != SCHEMA or self.format != FORMAT:
            raise ValueError(f"format {self.format!r} schema {self.schema!r}; this edgephi reads {FORMAT!r} "
                             f"schema {SCHEMA}")
        for piece in self.external_data:
            str(piece["path"]), int(piece["bytes"])
