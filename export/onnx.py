"""ONNX exporter: the Phi graph built node by node from the tensor stream, without torch.

Graph conventions follow onnxruntime-genai's model builder (so onnxruntime-genai runs the folder untouched):
inputs ``input_ids`` (B, S) int64, ``attention_mask`` (B, total) int64, ``past_key_values.{i}.key|value``
(B, n_kv, past, head_dim); outputs ``logits`` (B, S, V) float32 and ``present.{i}.key|value``.
Attention is com.microsoft GroupQueryAttention with rotary inside (``do_rotary``), fed with
seqlens_k = sum(mask) - 1 and total_sequence_length = mask.shape[1]; past and present may be one preallocated
buffer (past_present_share_buffer).

Weights: bits=4 → MatMulNBits (block 32, symmetric by default) with a float16 embedding table; bits=16 → float16
weights cast to float32 at load; bits=32 → float32.  Activations and the KV cache are float32 in every variant.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from edgephi.spec import PhiSpec
from edgephi.weights import Checkpoint

from .onnx_genai import copy_tokenizer_files, write_genai_config
from .onnx_graph import MS_DOMAIN, WEIGHT_MODES, GraphBuilder
from .registry import FormatResult, register, relpath

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FLOAT = TensorProto.FLOAT


def sliding_window_attr(spec: PhiSpec) -> int:
    """GroupQueryAttention's local_window_size for the spec's window (-1: none).

    onnxruntime's kernel lets the query at p see keys p - local_window_size < k <= p, the same convention as
    transformers' sliding_window (checked by tests/test_onnx.py past the window), so the value passes as is.
    """
    sw = spec.effective_sliding_window
    return -1 if sw is None else sw


def rotary_caches(spec: PhiSpec, length: int, long: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (length, rotary_dim / 2) float32, scaled by LongRoPE's attention factor.

    Reference: transformers' Phi3RotaryEmbedding (freqs = position * inv_freq; cos/sin times attention_scaling).
    """
    inv = np.array(spec.rope_inv_freq(long=long), dtype=np.float64)
    freqs = np.outer(np.arange(length, dtype=np.float64), inv)  # (length, rotary_dim / 2)
    af = spec.rope_attention_factor
    return (np.cos(freqs) * af).astype(np.float32), (np.sin(freqs) * af).astype(np.float32)


class _Build:
    """State of one export: the graph builder, the checkpoint and the options."""

    def __init__(self, ckpt: Checkpoint, spec: PhiSpec, g: GraphBuilder, mode: str, options: dict,
                 progress: Callable[[int, int], None] | None):
        self.ckpt, self.spec, self.g, self.mode = ckpt, spec, g, mode
        self.block = int(options.get("block_size", 32))
        self.symmetric = bool(options.get("symmetric", True))
        self.accuracy_level = int(options.get("accuracy_level", 4))
        self.quantize_lm_head = bool(options.get("quantize_lm_head", True))
        self.progress = progress
        self.total = len(spec.tensor_shapes())
        self.done = 0

    def read(self, name: str) -> np.ndarray:
        arr = self.ckpt.read(name)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return arr

    def linear(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None = None, mode: str | None = None):
        return self.g.linear(name, x, weight, bias, mode or self.mode, self.block, self.symmetric, self.accuracy_level)

    # ---- shared pieces ------------------------------------------------------------------------------------
    def inputs(self) -> None:
        g, s = self.g, self.spec
        g.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        g.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        for i in range(s.num_hidden_layers):
            for kind in ("key", "value"):
                g.add_input(f"past_key_values.{i}.{kind}", FLOAT,
                            ["batch_size", s.num_key_value_heads, "past_sequence_length", s.head_dim])

    def mask_info(self) -> None:
        """seqlens_k (B,) int32 = sum(mask) - 1; total_sequence_length () int32 = mask.shape[1]."""
        g = self.g
        one = g.scalar("/const/i64/[1]", [1])
        rs = g.op("ReduceSum", ["attention_mask", one], "/mask/ReduceSum", keepdims=0)
        sub = g.op("Sub", [rs, g.scalar("/const/i64/1", 1)], "/mask/Sub")
        self.seqlens_k = g.op("Cast", [sub], "/mask/seqlens_k", to=TensorProto.INT32)
        shape = g.op("Shape", ["attention_mask"], "/mask/Shape")
        self.total64 = g.op("Gather", [shape, g.scalar("/const/i64/1", 1)], "/mask/Gather", axis=0)
        self.total_len = g.op("Cast", [self.total64], "/mask/total_seq_len", to=TensorProto.INT32)

    def rope(self) -> None:
        """cos/sin caches; LongRoPE selects short or long ones on total length > original_max (an If node)."""
        g, s = self.g, self.spec
        n = s.max_position_embeddings
        if s.rope_scaling is None:
            cos, sin = rotary_caches(s, n, long=False)
            self.cos, self.sin = g.constant("cos_cache", cos), g.constant("sin_cache", sin)
            return
        from onnx import helper

        orig = s.rope_scaling.original_max_position_embeddings
        names = {}
        for long, tag, length in ((False, "short", orig), (True, "long", n)):
            cos, sin = rotary_caches(s, length, long=long)
            names[tag] = (g.constant(f"cos_cache_{tag}", cos), g.constant(f"sin_cache_{tag}", sin))

        def branch(tag: str):
            c, si = names[tag]
            outs = [f"/rope/{tag}/cos", f"/rope/{tag}/sin"]
            nodes = [helper.make_node("Identity", [c], [outs[0]]), helper.make_node("Identity", [si], [outs[1]])]
            vis = [helper.make_tensor_value_info(o, FLOAT, None) for o in outs]
            return helper.make_graph(nodes, f"rope_{tag}", [], vis)

        # transformers (dynamic_rope_update): long factors once max(position) + 1 > original_max_position_embeddings
        cond = g.op("Greater", [self.total64, g.scalar(f"/const/i64/{orig}", orig)], "/rope/Greater")
        self.cos, self.sin = g.node("If", [cond], "/rope/If", 2, then_branch=branch("long"),
                                    else_branch=branch("short"))

    def embed(self) -> str:
        table = self.read("model.embed_tokens.weight")
        name, cast = self.g.float_table("model.embed_tokens.weight", table, "f32" if self.mode == "f32" else "f16")
        x = self.g.op("Gather", [name, "input_ids"], "/model/embed_tokens/Gather", axis=0)  # (B, S, H)
        return self.g.op("Cast", [x], "/model/embed_tokens/Cast", to=FLOAT) if cast else x

    def attention(self, i: int, x: str, qkv_w: np.ndarray, qkv_b: np.ndarray | None) -> str:
        g, s = self.g, self.spec
        p = f"/model/layers.{i}/attn"
        qkv = self.linear(f"{p}/qkv_proj", x, qkv_w, qkv_b)  # (B, S, (n_heads + 2 n_kv) * head_dim), packed
        out, pk, pv = g.node("GroupQueryAttention",
                             [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                              self.seqlens_k, self.total_len, self.cos, self.sin],
                             f"{p}/GroupQueryAttention", 3, MS_DOMAIN, num_heads=s.num_attention_heads,
                             kv_num_heads=s.num_key_value_heads, scale=1.0 / math.sqrt(s.head_dim), do_rotary=1,
                             rotary_interleaved=0, local_window_size=sliding_window_attr(s))
        for kind, src in (("key", pk), ("value", pv)):
            g.add_output(src, f"present.{i}.{kind}", FLOAT,
                         ["batch_size", s.num_key_value_heads, "total_sequence_length", s.head_dim])
        return out

    def lm_head(self, x: str, bias: np.ndarray | None) -> None:
        s = self.spec
        name = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        w = self.ckpt.read(name) if s.tie_word_embeddings else self.read(name)  # tied: the embedding, read again
        mode = self.mode if (self.mode != "int4" or self.quantize_lm_head) else "f16"
        logits = self.linear("/lm_head", x, w, bias, mode)
        self.g.add_output(logits, "logits", FLOAT, ["batch_size", "sequence_length", s.vocab_size])

    # ---- the two block layouts ----------------------------------------------------------------------------
    def phi3(self) -> None:
        """RMSNorm, fused qkv, gate and up as two matmuls, SiLU gate; residual sums carried by
        SkipSimplifiedLayerNormalization."""
        g, s = self.g, self.spec
        eps = s.norm_eps
        x = self.embed()
        h = g.op("SimplifiedLayerNormalization", [x, g.constant("model.layers.0.input_layernorm.weight",
                 self.read("model.layers.0.input_layernorm.weight"))], "/model/layers.0/input_layernorm",
                 axis=-1, epsilon=eps, stash_type=1)
        residual = x
        for i in range(s.num_hidden_layers):
            p = f"model.layers.{i}."
            attn = self.attention(i, h, self.read(p + "self_attn.qkv_proj.weight"), None)
            o = self.linear(f"/model/layers.{i}/attn/o_proj", attn, self.read(p + "self_attn.o_proj.weight"))
            gamma = g.constant(p + "post_attention_layernorm.weight", self.read(p + "post_attention_layernorm.weight"))
            h, residual = self._skip_norm(f"/model/layers.{i}/post_attention_layernorm", o, residual, gamma)
            # gate and up as two matmuls on the checkpoint's fused rows: onnxruntime's int4 kernels decode 3-4%
            # faster that way than one N=2*intermediate matmul and a Split (Phi-3-mini shape, 2 AVX2 cores)
            w = self.read(p + "mlp.gate_up_proj.weight")
            n = w.shape[0] // 2
            gate = self.linear(f"/model/layers.{i}/mlp/gate_proj", h, w[:n])
            up = self.linear(f"/model/layers.{i}/mlp/up_proj", h, w[n:])
            del w
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/model/layers.{i}/mlp/Sigmoid")],
                        f"/model/layers.{i}/mlp/silu")
            act = g.op("Mul", [silu, up], f"/model/layers.{i}/mlp/gate_mul")
            d = self.linear(f"/model/layers.{i}/mlp/down_proj", act, self.read(p + "mlp.down_proj.weight"))
            last = i == s.num_hidden_layers - 1
            nxt = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
            gamma = g.constant(nxt, self.read(nxt))
            h, residual = self._skip_norm("/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm",
                                          d, residual, gamma)
        self.lm_head(h, None)

    def _skip_norm(self, name: str, x: str, skip: str, gamma: str) -> tuple[str, str]:
        """(RMSNorm(x + skip) * gamma, x + skip)."""
        out, _, _, total = self.g.node("SkipSimplifiedLayerNormalization", [x, skip, gamma], name, 4, MS_DOMAIN,
                                       unused=(1, 2), epsilon=self.spec.norm_eps)
        return out, total

    def phi(self) -> None:
        """Phi-1/1.5/2: x + attn(LN(x)) + mlp(LN(x)), biased everything, tanh-approximated GELU."""
        g, s = self.g, self.spec
        x = self.embed()
        for i in range(s.num_hidden_layers):
            p = f"model.layers.{i}."
            h = self._layernorm(f"/model/layers.{i}/input_layernorm", x, p + "input_layernorm")
            qkv_w = np.concatenate([self.read(p + f"self_attn.{n}_proj.weight") for n in "qkv"])  # q, k, v rows
            qkv_b = np.concatenate([self.read(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            attn = self.attention(i, h, qkv_w, qkv_b)
            dense = self.linear(f"/model/layers.{i}/attn/dense", attn, self.read(p + "self_attn.dense.weight"),
                                self.read(p + "self_attn.dense.bias"))
            fc1 = self.linear(f"/model/layers.{i}/mlp/fc1", h, self.read(p + "mlp.fc1.weight"),
                              self.read(p + "mlp.fc1.bias"))
            # gelu_new = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): com.microsoft FastGelu computes exactly this
            act = g.op("FastGelu", [fc1], f"/model/layers.{i}/mlp/FastGelu", MS_DOMAIN)
            fc2 = self.linear(f"/model/layers.{i}/mlp/fc2", act, self.read(p + "mlp.fc2.weight"),
                              self.read(p + "mlp.fc2.bias"))
            both = g.op("Add", [dense, fc2], f"/model/layers.{i}/Add_branches")
            x = g.op("Add", [x, both], f"/model/layers.{i}/residual_add")
        h = self._layernorm("/model/final_layernorm", x, "model.final_layernorm")
        self.lm_head(h, self.read("lm_head.bias"))

    def _layernorm(self, name: str, x: str, prefix: str) -> str:
        gamma = self.g.constant(prefix + ".weight", self.read(prefix + ".weight"))
        beta = self.g.constant(prefix + ".bias", self.read(prefix + ".bias"))
        return self.g.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=self.spec.norm_eps)


# the block layout per model_type
LAYOUTS = {"phi3": _Build.phi3, "phi": _Build.phi}


def quant_name(bits: int, block: int, symmetric: bool) -> str:
    return f"int4-b{block}-{'sym' if symmetric else 'asym'}" if bits == 4 else f"f{bits}"


@register("onnx", bits=tuple(WEIGHT_MODES))
def export(ckpt_dir, spec: PhiSpec, out_dir, *, bits: int, progress=None, **options) -> FormatResult:
    """Write model.onnx + model.onnx.data + genai_config.json + tokenizer files into out_dir.

    options: block_size (32), symmetric (True), accuracy_level (4: int8 activations on CPU; 0 = exact float),
    quantize_lm_head (True; False keeps it float16).
    """
    if bits not in WEIGHT_MODES:
        raise ValueError(f"onnx export: bits={bits}; allowed: {', '.join(map(str, WEIGHT_MODES))}")
    known = {"block_size", "symmetric", "accuracy_level", "quantize_lm_head"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"onnx export: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(ckpt_dir)
    ckpt.check(spec)
    model_path = out_dir / MODEL_FILE
    g = GraphBuilder(out_dir / (MODEL_FILE + ".data"))
    b = _Build(ckpt, spec, g, WEIGHT_MODES[bits], options, progress)
    try:
        b.inputs()
        b.mask_info()
        b.rope()
        LAYOUTS[spec.model_type](b)
        quant = quant_name(bits, b.block, b.symmetric)
        g.save(model_path, f"edgephi-{spec.name or spec.model_type}",
               {"edgephi.spec": json.dumps(spec.to_dict()), "edgephi.quant": quant})
    finally:
        g.close()
    log.info("onnx: wrote %s (%.1f MB of weights)", model_path, g.bytes_written / 1e6)
    genai = write_genai_config(out_dir, spec, ckpt_dir, MODEL_FILE)
    tok = copy_tokenizer_files(ckpt_dir, out_dir)
    files = [model_path, out_dir / (MODEL_FILE + ".data"), genai] + tok
    return FormatResult(format="onnx", files=[relpath(f, out_dir) for f in files], bits=bits, quant=quant,
                        entry=relpath(model_path, out_dir),
                        extra={"block_size": b.block, "symmetric": b.symmetric, "accuracy_level": b.accuracy_level,
                               "quantize_lm_head": b.quantize_lm_head, "genai_config": relpath(genai, out_dir)})
