"""The static NPU lowering: an architecture file's forward() as fixed-shape graphs for Qualcomm's HTP (QNN EP).

One graph per sequence length S (prefill chunk, decode = 1); the interface is the format contract
(edgephi/formats/onnx_npu.py).  Only ops the HTP runs in float16: Gather, MatMulNBits (3-D activations) or MatMul,
SimplifiedLayerNormalization / LayerNormalization, Split, Reshape, Transpose, Concat, Mul, Add, Sub, Sigmoid,
Gelu, Softmax.  Rotary is written out with those (x1 cos - x2 sin, x2 cos + x1 sin; transformers' rotate_half),
attention is two MatMuls and a Softmax over the cache slots and the new tokens with the caller's additive mask,
and the graph returns the new tokens' K/V instead of scattering them into the cache.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edgephi import arch
from edgephi.formats import onnx_npu as fmt

from .onnx_graph import MS_DOMAIN, GraphBuilder, write_model
from .onnx_quant import quantize_int4

F16 = TensorProto.FLOAT16
I32 = TensorProto.INT32
BLOCK = 32  # MatMulNBits block (symmetric); the HTP needs soc_model set for it


class SharedBuilder(GraphBuilder):
    """GraphBuilder whose weights go once into one data file that several graphs reference."""

    def __init__(self, data_path: Path):
        super().__init__(data_path)
        self._memo: dict[str, TensorProto] = {}
        self._in_graph: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._memo

    def constant(self, name: str, array: np.ndarray | None = None) -> str:
        if name in self._in_graph:
            return name
        self._in_graph.add(name)
        if name in self._memo:
            self.initializers.append(self._memo[name])
            return name
        super().constant(name, array)
        self._memo[name] = self.initializers[-1]
        return name

    def scalar(self, name: str, value, dtype=np.int64) -> str:
        return self.constant(name, np.array(value, dtype=dtype))

    def start_graph(self) -> None:
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._names, self._in_graph = set(), set()

    def save_graph(self, model_path: Path, graph_name: str, metadata: dict[str, str]) -> None:
        self._data.flush()
        write_model(model_path, self, graph_name, metadata)


def rope_table(spec, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (rows, rotary_dim / 2) float16; LongRoPE: short rows 0..n_ctx-1, then long rows n_ctx..2 n_ctx-1."""
    parts = [arch.rope_tables(spec, n_ctx, long=False)]
    if spec.rope_scaling is not None:
        parts.append(arch.rope_tables(spec, n_ctx, long=True))
    return (np.concatenate([c for c, _ in parts]).astype(np.float16),
            np.concatenate([s for _, s in parts]).astype(np.float16))


def _node(weight: str) -> str:
    return "/" + weight.rsplit(".", 1)[0].replace(".", "/")


class NpuLowering:
    """Builds the static graphs into one SharedBuilder; each weight is read and stored once for all graphs."""

    def __init__(self, g: SharedBuilder, tensors, spec, bits: int, n_ctx: int, quantize_lm_head: bool = True):
        self.g, self.tensors, self.spec, self.bits, self.n_ctx = g, tensors, spec, bits, n_ctx
        self.quantize_lm_head = quantize_lm_head
        self._nk: dict[str, tuple[int, int]] = {}  # (N, K) of each quantized linear, for the later graphs
        self._n = 0

    def build(self, S: int) -> None:
        g, s = self.g, self.spec
        self.S, self._n = S, 0
        g.start_graph()
        g.add_input("input_ids", I32, [1, S])
        g.add_input("position_ids", I32, [1, S])
        g.add_input("attention_bias", F16, [1, 1, S, self.n_ctx + S])
        for i in range(s.num_hidden_layers):
            for kind in ("key", "value"):
                g.add_input(fmt.PAST[kind] % i, F16, [1, s.num_key_value_heads, self.n_ctx, s.head_dim])
        cos, sin = rope_table(s, self.n_ctx)
        half = s.rotary_dim // 2
        rows = []
        for tag, table in (("cos", cos), ("sin", sin)):
            gathered = g.op("Gather", [g.constant(f"rope.{tag}", table), "position_ids"], f"/rope/{tag}/Gather",
                            axis=0)  # (1, S, half)
            rows.append(self._reshape(gathered, [1, 1, S, half], f"/rope/{tag}/Reshape"))
        self.cos, self.sin = rows
        self.mask = "attention_bias"
        if s.n_rep > 1:  # rows follow the stacked query layout (r, S)
            self.mask = g.op("Concat", ["attention_bias"] * s.n_rep, "/mask/repeat", axis=2)
        arch.get(s.model_type).forward(self, s)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _name(self, kind: str) -> str:
        self._n += 1
        return f"/{kind}_{self._n}"

    def _const16(self, name: str) -> str:
        if self.g.has(name):
            return self.g.constant(name)
        return self.g.constant(name, self.tensors.read(name).astype(np.float16))

    def _reshape(self, x: str, dims: list[int], name: str) -> str:
        return self.g.op("Reshape", [x, self.g.scalar("/const/shape/" + "x".join(map(str, dims)), dims)], name)

    def _linear(self, name: str, x: str, weight, bias: str | None, bits: int | None = None) -> str:
        """y = x @ W.T (+ b); x (1, S, K) float16; weight() reads W (once: later graphs reuse the stored one).
        bits 4: MatMulNBits (block 32, symmetric, float16 scales)."""
        g = self.g
        if (bits or self.bits) == 4:
            qn, sn = f"{name}.weight_Q4", f"{name}.weight_scales"
            if not g.has(qn):
                w = weight()
                q = quantize_int4(w, BLOCK, True)
                g.constant(qn, q.packed)
                g.constant(sn, q.scales.reshape(-1).astype(np.float16))
                self._nk[name] = w.shape
            n, k = self._nk[name]
            y = g.op("MatMulNBits", [x, g.constant(qn), g.constant(sn)], f"{name}/MatMulNBits", MS_DOMAIN,
                     K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=0)
        else:
            wn = f"{name}.weight"
            if not g.has(wn):
                g.constant(wn, np.ascontiguousarray(weight().T.astype(np.float16)))  # (K, N)
            y = g.op("MatMul", [x, g.constant(wn)], f"{name}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, self._const16(bias)], f"{name}/BiasAdd")
        return y

    def _rotary(self, x: str, name: str) -> str:
        """x (1, heads, S, hd) -> rotated leading rotary_dim channels (rotate_half convention)."""
        g, s = self.g, self.spec
        hd, r = s.head_dim, s.rotary_dim
        if r < hd:
            xr, xp = g.node("Split", [x, g.scalar(f"/const/split/{r}_{hd - r}", [r, hd - r])], f"{name}/SplitPass",
                            2, axis=-1)
        else:
            xr, xp = x, None
        x1, x2 = g.node("Split", [xr, g.scalar(f"/const/split/{r // 2}_{r // 2}", [r // 2, r // 2])],
                        f"{name}/SplitHalf", 2, axis=-1)
        a = g.op("Sub", [g.op("Mul", [x1, self.cos], f"{name}/x1cos"), g.op("Mul", [x2, self.sin], f"{name}/x2sin")],
                 f"{name}/first")
        b = g.op("Add", [g.op("Mul", [x2, self.cos], f"{name}/x2cos"), g.op("Mul", [x1, self.sin], f"{name}/x1sin")],
                 f"{name}/second")
        return g.op("Concat", [a, b] + ([xp] if xp else []), f"{name}/Concat", axis=-1)

    def _heads(self, x: str, n: int, name: str) -> str:
        """(1, S, n * hd) -> (1, n, S, hd)."""
        r = self._reshape(x, [1, self.S, n, self.spec.head_dim], f"{name}/Reshape")
        return self.g.op("Transpose", [r], f"{name}/Transpose", perm=[0, 2, 1, 3])

    # ---- the op vocabulary ------------------------------------------------------------------------------------
    def embed(self, table: str) -> str:
        return self.g.op("Gather", [self._const16(table), "input_ids"], _node(table) + "/Gather", axis=0)

    def rms_norm(self, x: str, weight: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self._const16(weight)], _node(weight), axis=-1,
                         epsilon=self.spec.norm_eps, stash_type=1)

    def layer_norm(self, x: str, weight: str, bias: str) -> str:
        return self.g.op("LayerNormalization", [x, self._const16(weight), self._const16(bias)], _node(weight),
                         axis=-1, epsilon=self.spec.norm_eps)

    def linear(self, x: str, weight: str, bias: str | None = None) -> str:
        return self._linear(_node(weight), x, lambda: self.tensors.read(weight), bias)

    def split_linear(self, x: str, weight: str, parts: int) -> tuple[str, ...]:
        y = self.linear(x, weight)
        n = self.tensors.info(weight).shape[0] // parts
        return tuple(self.g.node("Split", [y, self.g.scalar(f"/const/split/{n}x{parts}", [n] * parts)],
                                 _node(weight) + "/Split", parts, axis=-1))

    def act(self, x: str, kind: str) -> str:
        g = self.g
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], self._name("Sigmoid"))], self._name("silu"))
        if kind == "gelu_tanh":
            return g.op("Gelu", [x], self._name("Gelu"), approximate="tanh")
        raise NotImplementedError(f"NPU lowering: activation {kind!r}")

    def mul(self, a: str, b: str) -> str:
        return self.g.op("Mul", [a, b], self._name("Mul"))

    def add(self, a: str, b: str) -> str:
        return self.g.op("Add", [a, b], self._name("Add"))

    def logits(self, x: str, weight: str, bias: str | None = None) -> str:
        s = self.spec
        out = self._linear("/lm_head", x, lambda: self.tensors.read(weight), bias,
                           None if self.quantize_lm_head else 16)
        self.g.add_output(out, fmt.LOGITS, F16, [1, self.S, s.vocab_size])
        return out

    def attention(self, layer: int, x: str, qkv, bias) -> str:
        g, s, S = self.g, self.spec, self.S
        nh, nkv, hd = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        read = self.tensors.read
        if isinstance(qkv, str):
            p, w, b = _node(qkv), (lambda: read(qkv)), bias
            packed = self._linear(p, x, w, b)
        else:  # separate q, k, v projections: one packed matmul (rows q | k | v)
            p = _node(qkv[0]).rsplit("/", 1)[0] + "/qkv_proj"
            packed = self._linear(p, x, lambda: np.concatenate([read(n) for n in qkv]), None)
            if bias is not None:
                bn = f"{p}.bias"
                if not g.has(bn):
                    g.constant(bn, np.concatenate([read(n) for n in bias]).astype(np.float16))
                packed = g.op("Add", [packed, g.constant(bn)], f"{p}/BiasAdd")
        q, k, v = g.node("Split", [packed, g.scalar("/const/split/qkv", [nh * hd, nkv * hd, nkv * hd])],
                         f"{p}/SplitQKV", 3, axis=-1)
        q = self._rotary(self._heads(q, nh, f"{p}/q"), f"{p}/q_rot")  # (1, nh, S, hd)
        k = self._rotary(self._heads(k, nkv, f"{p}/k"), f"{p}/k_rot")  # (1, nkv, S, hd)
        v = self._heads(v, nkv, f"{p}/v")
        g.add_output(k, fmt.PRESENT["key"] % layer, F16, [1, nkv, S, hd])
        g.add_output(v, fmt.PRESENT["value"] % layer, F16, [1, nkv, S, hd])
        q = g.op("Mul", [q, g.constant("/const/f16/scale", np.array(1.0 / math.sqrt(hd), np.float16))], f"{p}/scale")
        q = self._reshape(q, [1, nkv, s.n_rep * S, hd], f"{p}/q_groups")  # query heads of one KV head stacked
        keys = g.op("Concat", [fmt.PAST["key"] % layer, k], f"{p}/keys", axis=2)  # (1, nkv, n_ctx + S, hd)
        vals = g.op("Concat", [fmt.PAST["value"] % layer, v], f"{p}/values", axis=2)
        kt = g.op("Transpose", [keys], f"{p}/keys_T", perm=[0, 1, 3, 2])  # (1, nkv, hd, T)
        scores = g.op("MatMul", [q, kt], f"{p}/scores")  # (1, nkv, n_rep S, T)
        scores = g.op("Add", [scores, self.mask], f"{p}/masked")
        probs = g.op("Softmax", [scores], f"{p}/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, vals], f"{p}/context")  # (1, nkv, n_rep S, hd)
        ctx = self._reshape(ctx, [1, nh, S, hd], f"{p}/ctx_heads")
        ctx = g.op("Transpose", [ctx], f"{p}/ctx_T", perm=[0, 2, 1, 3])  # (1, S, nh, hd)
        return self._reshape(ctx, [1, S, nh * hd], f"{p}/ctx_merge")
