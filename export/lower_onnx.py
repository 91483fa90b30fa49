"""The ONNX lowering: an architecture file's forward() as onnxruntime graph nodes (dynamic batch and length).

Values are ONNX value names.  The graph follows the format contract (edgephi/formats/onnx.py) and the kernels
onnxruntime-genai's own builder picks, so both runtimes run it at their best:

* linear: MatMulNBits (int4, block 32) or MatMul on float16/float32 weights, + Add for a bias;
* split_linear: one matmul per part (Phi-3's gate and up: onnxruntime's int4 kernels decode 3-4% faster that way
  than one N = 2 x intermediate matmul and a Split, Phi-3-mini shape, 2 AVX2 cores);
* add is lazy: a sum that feeds rms_norm becomes SkipSimplifiedLayerNormalization (the norm and the residual sum
  in one kernel), any other use an Add;
* attention: one packed q|k|v projection into GroupQueryAttention with rotary inside (do_rotary), seqlens_k =
  sum(mask) - 1 and total_sequence_length = mask.shape[1]; LongRoPE picks its cos/sin tables with an If node on
  the total length (transformers' dynamic_rope_update).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from edgephi import arch
from edgephi.formats import onnx as fmt

from .onnx_graph import MS_DOMAIN, GraphBuilder

FLOAT = TensorProto.FLOAT


class _Sum:
    """a + b, emitted when first used: as the residual output of a fused norm, or as an Add."""

    def __init__(self, a, b):
        self.a, self.b, self.name = a, b, None


def _prefix(weight: str) -> str:
    """Node names from the weight's checkpoint name: model.layers.0.mlp.fc1.weight -> /model/layers.0/mlp/fc1."""
    parts = weight.rsplit(".", 1)[0].split(".")
    out = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] += "." + p
        else:
            out.append(p)
    return "/" + "/".join(out)


class OnnxLowering:
    def __init__(self, g: GraphBuilder, tensors, spec, mode: str, *, block: int = 32, symmetric: bool = True,
                 accuracy_level: int = 4, quantize_lm_head: bool = True):
        self.g, self.tensors, self.spec, self.mode = g, tensors, spec, mode
        self.block, self.symmetric, self.accuracy_level = block, symmetric, accuracy_level
        self.quantize_lm_head = quantize_lm_head
        self._n = 0

    def build(self) -> None:
        """Inputs, mask and rotary tables, then the architecture's forward; its logits become the output."""
        self._inputs()
        self._mask_info()
        self._rope()
        arch.get(self.spec.model_type).forward(self, self.spec)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _name(self, kind: str) -> str:
        self._n += 1
        return f"/{kind}_{self._n}"

    def _v(self, x) -> str:
        if isinstance(x, _Sum):
            if x.name is None:
                x.name = self.g.op("Add", [self._v(x.a), self._v(x.b)], self._name("residual_add"))
            return x.name
        return x

    def _linear(self, name: str, x: str, w: np.ndarray, b: np.ndarray | None, mode: str | None = None) -> str:
        return self.g.linear(name, x, w, b, mode or self.mode, self.block, self.symmetric, self.accuracy_level)

    def _inputs(self) -> None:
        g, s = self.g, self.spec
        g.add_input(fmt.INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        g.add_input(fmt.ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])
        for i in range(s.num_hidden_layers):
            for kind in ("key", "value"):
                g.add_input(fmt.PAST[kind] % i, FLOAT,
                            ["batch_size", s.num_key_value_heads, "past_sequence_length", s.head_dim])

    def _mask_info(self) -> None:
        """seqlens_k (B,) int32 = sum(mask) - 1; total_sequence_length () int32 = mask.shape[1]."""
        g = self.g
        rs = g.op("ReduceSum", [fmt.ATTENTION_MASK, g.scalar("/const/i64/[1]", [1])], "/mask/ReduceSum", keepdims=0)
        sub = g.op("Sub", [rs, g.scalar("/const/i64/1", 1)], "/mask/Sub")
        self.seqlens_k = g.op("Cast", [sub], "/mask/seqlens_k", to=TensorProto.INT32)
        shape = g.op("Shape", [fmt.ATTENTION_MASK], "/mask/Shape")
        self.total64 = g.op("Gather", [shape, g.scalar("/const/i64/1", 1)], "/mask/Gather", axis=0)
        self.total_len = g.op("Cast", [self.total64], "/mask/total_seq_len", to=TensorProto.INT32)

    def _rope(self) -> None:
        """cos/sin caches; LongRoPE selects short or long ones on total length > original_max (an If node)."""
        g, s = self.g, self.spec
        if s.rope_scaling is None:
            cos, sin = arch.rope_tables(s, s.max_position_embeddings)
            self.cos, self.sin = g.constant("cos_cache", cos), g.constant("sin_cache", sin)
            return
        orig = s.rope_scaling.original_max_position_embeddings
        branches = {}
        for long, tag, length in ((False, "short", orig), (True, "long", s.max_position_embeddings)):
            cos, sin = arch.rope_tables(s, length, long=long)
            tables = (g.constant(f"cos_cache_{tag}", cos), g.constant(f"sin_cache_{tag}", sin))
            outs = [f"/rope/{tag}/cos", f"/rope/{tag}/sin"]
            nodes = [helper.make_node("Identity", [t], [o]) for t, o in zip(tables, outs)]
            branches[tag] = helper.make_graph(nodes, f"rope_{tag}", [],
                                              [helper.make_tensor_value_info(o, FLOAT, None) for o in outs])
        cond = g.op("Greater", [self.total64, g.scalar(f"/const/i64/{orig}", orig)], "/rope/Greater")
        self.cos, self.sin = g.node("If", [cond], "/rope/If", 2, then_branch=branches["long"],
                                    else_branch=branches["short"])

    # ---- the op vocabulary ------------------------------------------------------------------------------------
    def embed(self, table: str) -> str:
        name, cast = self.g.float_table(table, self.tensors.read(table), "f32" if self.mode == "f32" else "f16")
        x = self.g.op("Gather", [name, fmt.INPUT_IDS], _prefix(table) + "/Gather", axis=0)  # (B, S, H)
        return self.g.op("Cast", [x], _prefix(table) + "/Cast", to=FLOAT) if cast else x

    def rms_norm(self, x, weight: str) -> str:
        g, eps = self.g, self.spec.norm_eps
        gamma = g.constant(weight, self.tensors.read(weight))
        if isinstance(x, _Sum) and x.name is None:
            out, _, _, x.name = g.node("SkipSimplifiedLayerNormalization", [self._v(x.a), self._v(x.b), gamma],
                                       _prefix(weight), 4, MS_DOMAIN, unused=(1, 2), epsilon=eps)
            return out
        return g.op("SimplifiedLayerNormalization", [self._v(x), gamma], _prefix(weight), axis=-1, epsilon=eps,
                    stash_type=1)

    def layer_norm(self, x, weight: str, bias: str) -> str:
        g = self.g
        gamma, beta = g.constant(weight, self.tensors.read(weight)), g.constant(bias, self.tensors.read(bias))
        return g.op("LayerNormalization", [self._v(x), gamma, beta], _prefix(weight), axis=-1,
                    epsilon=self.spec.norm_eps)

    def linear(self, x, weight: str, bias: str | None = None) -> str:
        b = None if bias is None else self.tensors.read(bias)
        return self._linear(_prefix(weight), self._v(x), self.tensors.read(weight), b)

    def split_linear(self, x, weight: str, parts: int) -> tuple[str, ...]:
        w = self.tensors.read(weight)
        rows = w.shape[0] // parts
        x = self._v(x)
        return tuple(self._linear(f"{_prefix(weight)}/part{k}", x, w[k * rows:(k + 1) * rows], None)
                     for k in range(parts))

    def act(self, x, kind: str) -> str:
        g, x = self.g, self._v(x)
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], self._name("Sigmoid"))], self._name("silu"))
        if kind == "gelu_tanh":  # com.microsoft FastGelu computes exactly gelu_new's tanh approximation
            return g.op("FastGelu", [x], self._name("FastGelu"), MS_DOMAIN)
        raise NotImplementedError(f"ONNX lowering: activation {kind!r}")

    def mul(self, a, b) -> str:
        return self.g.op("Mul", [self._v(a), self._v(b)], self._name("Mul"))

    def add(self, a, b) -> _Sum:
        return _Sum(a, b)

    def logits(self, x, weight: str, bias: str | None = None) -> str:
        s = self.spec
        mode = self.mode if (self.mode != "int4" or self.quantize_lm_head) else "f16"
        b = None if bias is None else self.tensors.read(bias)
        out = self._linear("/lm_head", self._v(x), self.tensors.read(weight), b, mode)
        self.g.add_output(out, fmt.LOGITS, FLOAT, ["batch_size", "sequence_length", s.vocab_size])
        return out

    def attention(self, layer: int, x, qkv, bias) -> str:
        g, s = self.g, self.spec
        read = self.tensors.read
        if isinstance(qkv, str):
            w, b, name = read(qkv), None if bias is None else read(bias), _prefix(qkv)
        else:  # separate q, k, v projections: packed into one matmul (rows q | k | v)
            w = np.concatenate([read(n) for n in qkv])
            b = None if bias is None else np.concatenate([read(n) for n in bias])
            name = _prefix(qkv[0]).rsplit("/", 1)[0] + "/qkv_proj"
        packed = self._linear(name, self._v(x), w, b)  # (B, S, (n_heads + 2 n_kv) * head_dim)
        del w
        out, pk, pv = g.node("GroupQueryAttention",
                             [packed, "", "", fmt.PAST["key"] % layer, fmt.PAST["value"] % layer,
                              self.seqlens_k, self.total_len, self.cos, self.sin],
                             f"{name.rsplit('/', 1)[0]}/GroupQueryAttention", 3, MS_DOMAIN,
                             num_heads=s.num_attention_heads, kv_num_heads=s.num_key_value_heads,
                             scale=1.0 / math.sqrt(s.head_dim), do_rotary=1, rotary_interleaved=0,
                             local_window_size=fmt.local_window_size(s))
        for kind, src in (("key", pk), ("value", pv)):
            g.add_output(src, fmt.PRESENT[kind] % layer, FLOAT,
                         ["batch_size", s.num_key_value_heads, "total_sequence_length", s.head_dim])
        return out
