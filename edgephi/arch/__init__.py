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
  sparse_moe(x, router, experts)    Phi-3.5-MoE's mixture of experts: router (E, H) scores the experts,
                                    sparsemixer picks two (spec.router_jitter_noise), each expert (gate, up, down)
                                    a SiLU-gated MLP, their outputs weighted and summed

Keyword arguments extend an op for one family; a lowering supports one when its method takes that keyword
(ops_used names it "op(keyword)", missing_ops checks the lowering's signature, so a lowering without it refuses
the model cleanly).  Phi-3-small's:

  embed(table, scale=s)             the embeddings times s (muP's embedding multiplier)
  attention(..., scale=s)           softmax scale s instead of 1/sqrt(head_dim)
  attention(..., block_sparse=b)    a BlockSparse pattern (below) on top of the causal mask
  act(x, "gegelu", limit=L)         x = [a | b] (two halves): quick_gelu(min(a, L)) * (clip(b, -L, L) + 1), where
                                    quick_gelu(a) = a * sigmoid(1.702 a); half the width out
  logits(..., scale=s, masked=ids)  logits times s, then the ids set to MASKED_LOGIT (float32's lowest)

Tensors whose stored row order is not the one the ops take (Phi-3-small's per-KV-head q..q k v groups, its
interleaved GEGELU halves) are read reordered: ``Architecture.row_order`` (export/source.py applies it).

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
    gguf_arch: str | None  # llama.cpp's architecture name (None: llama.cpp has no graph for it)
    # spec -> {GGUFWriter.add_<key> key: value}: the metadata beyond the sizes every architecture writes
    gguf_metadata: Callable[[Any], dict[str, Any]]
    # spec -> (field, why) when the spec is not a valid instance of the family, else None
    check: Callable[[Any], tuple[str, str] | None] = lambda spec: None
    # spec -> {GGUF-side tensor name: checkpoint tensors stacked into it} (llama.cpp's 3-D expert tensors)
    gguf_stacked: Callable[[Any], dict[str, list[str]]] = lambda spec: {}
    # spec -> {checkpoint tensor: the stored row each row the ops read comes from} (an index array)
    row_order: Callable[[Any], dict[str, Any]] = lambda spec: {}
    # why llama.cpp cannot run the family (gguf_arch is then None)
    gguf_refusal: str | None = None


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
        from . import phi, phi3, phi3small, phimoe  # noqa: F401  (each registers itself)


def checkpoint_tensors(spec, layer: dict[str, tuple[int, ...]], final: dict[str, tuple[int, ...]]
                       ) -> dict[str, tuple[int, ...]]:
    """The embedding, every layer's tensors (names relative to "model.layers.{i}.") and the final ones, in
    checkpoint order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update(final)
    return shapes


class _Tracer:
    """Stands in for a lowering: records which ops forward() calls (every value it returns is itself)."""

    def __init__(self):
        self.used: set[str] = set()

    def __getattr__(self, op: str):
        def record(*args, **kwargs):
            self.used.add(op)
            self.used.update(f"{op}({k})" for k, v in kwargs.items() if v is not None)
            if op == "split_linear":
                return (self,) * (kwargs.get("parts") or args[2])
            return self

        return record


def ops_used(spec) -> set[str]:
    """The op vocabulary an architecture's forward() uses for this spec (a dry run, no weights touched)."""
    tracer = _Tracer()
    get(spec.model_type).forward(tracer, spec)
    return tracer.used


def missing_ops(lowering: type, spec) -> list[str]:
    """The ops forward() needs that a lowering class does not implement."""
    return sorted(op for op in ops_used(spec) if not implements(lowering, op))


def implements(lowering: type, op: str) -> bool:
    """op is a name ("attention") or a name with a keyword ("attention(block_sparse)")."""
    import inspect

    name, _, keyword = op.partition("(")
    fn = getattr(lowering, name, None)
    if not callable(fn):
        return False
    return not keyword or keyword.rstrip(")") in inspect.signature(fn).parameters


MASKED_LOGIT = -3.4028234663852886e38  # float32's lowest: Phi-3-small's masked_fill of its unused ids


@dataclass(frozen=True)
class BlockSparse:
    """Phi-3-small's block-sparse attention (its triton kernel's layout, in token terms).

    With b(p) = p // block_size, the query at q of head h sees the key at k <= q when b(q) - b(k) < local_blocks
    (the local blocks) or (b(k) + h * head_step + 1) % vert_stride == 0 (every vert_stride-th block, shifted per
    head); homo_head: the same blocks for every head (head_step 0).  head_step = max(1, vert_stride //
    num_heads) (microsoft/Phi-3-small's _get_sparse_attn_mask; vLLM's blocksparse_head_sliding_step).
    """

    block_size: int
    local_blocks: int
    vert_stride: int
    head_step: int  # 0 = homogeneous heads

    def heads(self, num_heads: int) -> int:
        """How many distinct head patterns there are: 1 (homogeneous) or num_heads."""
        return 1 if self.head_step == 0 else num_heads

    def block_table(self, num_heads: int, n_blocks: int):
        """(heads, n_blocks, n_blocks) bool: query block bq may see key block bk (bk <= bq; tokens within the
        blocks are then causal)."""
        import numpy as np

        bq, bk = np.arange(n_blocks)[:, None], np.arange(n_blocks)[None, :]
        h = np.arange(self.heads(num_heads))[:, None, None]
        vertical = (bk[None] + h * self.head_step + 1) % self.vert_stride == 0
        return (bk <= bq)[None] & ((bq - bk < self.local_blocks)[None] | vertical)


def head_weight(spec) -> str:
    """The output projection's weight: the embedding table itself when the checkpoint ties them."""
    return "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"


def rope_tables(spec, length: int, long: bool = False):
    """cos, sin (length, rotary_dim / 2) float32 for positions 0..length-1, scaled by LongRoPE's attention factor.

    Reference: transformers' Phi3RotaryEmbedding (freqs = position * inv_freq; cos and sin times
    attention_scaling; Phi-3.5-MoE: its short or long mscale).  Every lowering takes its tables from here (cast to
    its own precision).
    """
    import numpy as np

    inv = np.array(spec.rope_inv_freq(long=long), dtype=np.float64)
    freqs = np.outer(np.arange(length, dtype=np.float64), inv)  # (length, rotary_dim / 2)
    rs = spec.rope_scaling
    af = 1.0 if rs is None else (rs.long_attention_factor or rs.attention_factor) if long else rs.attention_factor
    return (np.cos(freqs) * af).astype(np.float32), (np.sin(freqs) * af).astype(np.float32)


def uses_long_rope(spec, total_length: int) -> bool:
    """transformers (dynamic_rope_update): the long factors once max(position) + 1 > original_max."""
    return spec.rope_scaling is not None and total_length > spec.rope_scaling.original_max_position_embeddings
