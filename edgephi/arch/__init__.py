"""Each Phi architecture family written once: its checkpoint tensors, its block in a small op vocabulary, and its
llama.cpp names, one file per family (phi.py, phi3.py), registered by model_type.

An architecture file has no dependencies: it describes, the lowerings compute.  ``forward(ops, spec)`` calls only
the op vocabulary below, on values the lowering owns (ONNX value names, MIL variables, numpy arrays); weights are
named by their checkpoint tensor name and the lowering reads them from the tensor stream when (and if) it needs
them.  Lowerings: export/lower_onnx.py (dynamic shapes, onnxruntime contrib ops), export/lower_npu.py (static
shapes, HTP-friendly standard ops), export/lower_coreml.py (MIL), export/lower_numpy.py (eager numpy: the second
numeric reference of the tests).  GGUF needs no lowering: llama.cpp has its own graph per ``gguf_arch``; the
exporter names tensors with gguf-py's table for that architecture and writes ``gguf_metadata(spec)`` with gguf-py's
``GGUFWriter.add_<key>`` writers.

The op vocabulary (every lowering implements all of it):

  embed(table)                      token embedding lookup                                  -> (T, H)
  rms_norm(x, weight)               RMSNorm (Zhang & Sennrich 2019)
  layer_norm(x, weight, bias)       LayerNorm
  linear(x, weight, bias=None)      x @ W.T (+ b); W is (out, in) as checkpoints store it
  split_linear(x, weight, parts)    one weight whose rows are `parts` equal outputs (Phi-3's fused gate_up): the
                                    lowering chooses one matmul + split or `parts` matmuls
  attention(layer, x, qkv, bias)    projection to q, k, v (qkv: one fused weight with rows q | k | v, or the list
                                    [q, k, v] of weights; bias likewise or None), rotary on spec.rotary_dim
                                    channels (LongRoPE switch included), KV cache of `layer`, causal mask with
                                    spec.effective_sliding_window, grouped KV heads           -> (T, heads*hd)
  act(x, kind)                      "silu" | "gelu_tanh" (gelu_new)
  mul(a, b), add(a, b)              elementwise; add is also the residual sum
  logits(x, weight, bias=None)      the output projection, the graph's output

Adding an architecture: one file here with tensors(), forward() and its GGUF name and metadata (and the spec
fields it needs in spec.py), registered with register(); every lowering then exports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    description: str  # the releases it covers, for messages
    # spec -> {checkpoint tensor name: shape (out, in for weights)}, in checkpoint order
    tensors: Callable[[Any], dict[str, tuple[int, ...]]]
    # forward(ops, spec) -> the lowering's logits value
    forward: Callable[[Any, Any], Any]
    norm_eps_key: str  # the config.json field of the norm epsilon
    activations: tuple[str, ...]  # hidden_act values this family supports (first = default)
    gguf_arch: str  # llama.cpp's architecture name
    # spec -> {GGUFWriter.add_<key> key: value}: the metadata beyond the sizes every architecture writes
    gguf_metadata: Callable[[Any], dict[str, Any]]
    # spec -> (field, why) when the spec is not a valid instance of the family, else None
    check: Callable[[Any], tuple[str, str] | None] = lambda spec: None


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.model_type] = arch
    return arch


def get(model_type: str) -> Architecture:
    _load()
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise NotImplementedError(f"model_type {model_type!r} has no architecture file; "
                                  f"available: {', '.join(sorted(ARCHITECTURES))}") from None


def supported() -> str:
    """One line naming every supported family, for messages."""
    _load()
    return "; ".join(f"{a.description} (model_type {a.model_type!r})" for a in ARCHITECTURES.values())


def model_types() -> tuple[str, ...]:
    _load()
    return tuple(ARCHITECTURES)


def _load() -> None:
    if not ARCHITECTURES:
        from . import phi, phi3  # noqa: F401  (each registers itself)


def checkpoint_tensors(spec, layer: dict[str, tuple[int, ...]], final: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
    """The embedding, every layer's tensors (names relative to "model.layers.{i}.") and the final ones, in
    checkpoint order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update(final)
    return shapes


def head_weight(spec) -> str:
    """The output projection's weight: the embedding table itself when the checkpoint ties them."""
    return "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"


def rope_tables(spec, length: int, long: bool = False):
    """cos, sin (length, rotary_dim / 2) float32 for positions 0..length-1, scaled by LongRoPE's attention factor.

    Reference: transformers' Phi3RotaryEmbedding (freqs = position * inv_freq; cos and sin times
    attention_scaling).  Every lowering takes its tables from here (cast to its own precision).
    """
    import numpy as np

    inv = np.array(spec.rope_inv_freq(long=long), dtype=np.float64)
    freqs = np.outer(np.arange(length, dtype=np.float64), inv)  # (length, rotary_dim / 2)
    af = spec.rope_attention_factor
    return (np.cos(freqs) * af).astype(np.float32), (np.sin(freqs) * af).astype(np.float32)


def uses_long_rope(spec, total_length: int) -> bool:
    """transformers (dynamic_rope_update): the long factors once max(position) + 1 > original_max."""
    return spec.rope_scaling is not None and total_length > spec.rope_scaling.original_max_position_embeddings
