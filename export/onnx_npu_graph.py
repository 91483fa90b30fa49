"""Static-shape Phi graphs for Qualcomm's HTP (Hexagon NPU) through onnxruntime's QNN execution provider.

One graph per sequence length S (prefill chunk, decode = 1), every shape fixed at export:

inputs   input_ids       (1, S) int32
         position_ids    (1, S) int32      row of the rotary table (LongRoPE: + n_ctx for the long table)
         attention_bias  (1, 1, S, n_ctx + S) float16   0 = attend, MASK_VALUE = masked; columns are the n_ctx
                                           cache slots followed by the S new tokens
         past_key.{i}, past_value.{i}  (1, n_kv, n_ctx, head_dim) float16  the whole static cache
outputs  logits          (1, S, V) float16
         present_key.{i}, present_value.{i}  (1, n_kv, S, head_dim) float16  the new tokens' K (rotated) and V

The caller keeps the cache and writes the new K/V into it (the graph never scatters), and builds the mask: causal,
cache validity, sliding window and chunk padding all live in attention_bias, so one graph serves every variant.
Only ops the HTP runs in float16: Gather, MatMulNBits (3-D activations) or MatMul, SimplifiedLayerNormalization /
LayerNormalization, Split, Reshape, Transpose, Concat, Mul, Add, Sub, Sigmoid, Gelu, Softmax.  Rotary is written
out with those (x1 cos - x2 sin, x2 cos + x1 sin; transformers' rotate_half convention), not a fused op.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from edgephi.spec import PhiSpec

from .onnx_graph import MS_DOMAIN, GraphBuilder, write_model
from .onnx_quant import quantize_int4

F16 = TensorProto.FLOAT16
I32 = TensorProto.INT32
MASK_VALUE = -30000.0  # additive mask: exp(-30000 + score) is 0 in float16, and the sum stays finite
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


def rope_table(spec: PhiSpec, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (rows, rotary_dim / 2) float16; LongRoPE: short rows 0..n_ctx-1, then long rows n_ctx..2 n_ctx-1.

    Same numbers as export/onnx.py's rotary_caches (transformers' Phi3RotaryEmbedding, attention factor included).
    """
    from .onnx import rotary_caches

    parts = [rotary_caches(spec, n_ctx, long=False)]
    if spec.rope_scaling is not None:
        parts.append(rotary_caches(spec, n_ctx, long=True))
    cos = np.concatenate([c for c, _ in parts]).astype(np.float16)
    sin = np.concatenate([s for _, s in parts]).astype(np.float16)
    return cos, sin


class NpuGraph:
    """Builds one static graph (sequence length S) from the checkpoint into a SharedBuilder."""

    def __init__(self, g: SharedBuilder, spec: PhiSpec, read: Callable[[str], np.ndarray], bits: int, n_ctx: int,
                 quantize_lm_head: bool = True):
        self.g, self.spec, self.read, self.bits, self.n_ctx = g, spec, read, bits, n_ctx
        self.quantize_lm_head = quantize_lm_head
        self._nk: dict[str, tuple[int, int]] = {}  # (N, K) of each quantized linear, for the second graph

    # ---- pieces -------------------------------------------------------------------------------------------
    def const16(self, name: str) -> str:
        if self.g.has(name):
            return self.g.constant(name)
        return self.g.constant(name, self.read(name).astype(np.float16))

    def shape(self, dims: list[int]) -> str:
        return self.g.scalar("/const/shape/" + "x".join(map(str, dims)), dims)

    def reshape(self, x: str, dims: list[int], name: str) -> str:
        return self.g.op("Reshape", [x, self.shape(dims)], name)

    def linear(self, name: str, x: str, weight: Callable[[], np.ndarray], bias: Callable[[], np.ndarray] | None,
               bits: int | None = None):
        """y = x @ W.T (+ b); x (1, S, K) float16.  bits 4: MatMulNBits (block 32, symmetric, float16 scales)."""
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
            bn = f"{name}.bias"
            if not g.has(bn):
                g.constant(bn, bias().astype(np.float16))
            y = g.op("Add", [y, g.constant(bn)], f"{name}/BiasAdd")
        return y

    def rotary(self, x: str, heads: int, name: str) -> str:
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

    def heads(self, x: str, n: int, name: str) -> str:
        """(1, S, n * hd) -> (1, n, S, hd)."""
        r = self.reshape(x, [1, self.S, n, self.spec.head_dim], f"{name}/Reshape")
        return self.g.op("Transpose", [r], f"{name}/Transpose", perm=[0, 2, 1, 3])

    def attention(self, i: int, x: str, qkv_w, qkv_b) -> str:
        g, s, S = self.g, self.spec, self.S
        p = f"/model/layers.{i}/attn"
        nh, nkv, hd = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        qkv = self.linear(f"{p}/qkv_proj", x, qkv_w, qkv_b)  # (1, S, (nh + 2 nkv) hd)
        sizes = [nh * hd, nkv * hd, nkv * hd]
        q, k, v = g.node("Split", [qkv, g.scalar("/const/split/qkv", sizes)], f"{p}/SplitQKV", 3, axis=-1)
        q = self.rotary(self.heads(q, nh, f"{p}/q"), nh, f"{p}/q_rot")  # (1, nh, S, hd)
        k = self.rotary(self.heads(k, nkv, f"{p}/k"), nkv, f"{p}/k_rot")  # (1, nkv, S, hd)
        v = self.heads(v, nkv, f"{p}/v")
        g.add_output(k, f"present_key.{i}", F16, [1, nkv, S, hd])
        g.add_output(v, f"present_value.{i}", F16, [1, nkv, S, hd])
        q = g.op("Mul", [q, g.constant("/const/f16/scale", np.array(1.0 / math.sqrt(hd), np.float16))], f"{p}/scale")
        q = self.reshape(q, [1, nkv, s.n_rep * S, hd], f"{p}/q_groups")  # query heads of one KV head stacked
        keys = g.op("Concat", [f"past_key.{i}", k], f"{p}/keys", axis=2)  # (1, nkv, n_ctx + S, hd)
        vals = g.op("Concat", [f"past_value.{i}", v], f"{p}/values", axis=2)
        kt = g.op("Transpose", [keys], f"{p}/keys_T", perm=[0, 1, 3, 2])  # (1, nkv, hd, T)
        scores = g.op("MatMul", [q, kt], f"{p}/scores")  # (1, nkv, n_rep S, T)
        scores = g.op("Add", [scores, self.mask], f"{p}/masked")
        probs = g.op("Softmax", [scores], f"{p}/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, vals], f"{p}/context")  # (1, nkv, n_rep S, hd)
        ctx = self.reshape(ctx, [1, nh, S, hd], f"{p}/ctx_heads")
        ctx = g.op("Transpose", [ctx], f"{p}/ctx_T", perm=[0, 2, 1, 3])  # (1, S, nh, hd)
        return self.reshape(ctx, [1, S, nh * hd], f"{p}/ctx_merge")

    # ---- whole graph --------------------------------------------------------------------------------------
    def build(self, S: int) -> None:
        g, s = self.g, self.spec
        self.S = S
        g.start_graph()
        T = self.n_ctx + S
        g.add_input("input_ids", I32, [1, S])
        g.add_input("position_ids", I32, [1, S])
        g.add_input("attention_bias", F16, [1, 1, S, T])
        for i in range(s.num_hidden_layers):
            for kind in ("key", "value"):
                g.add_input(f"past_{kind}.{i}", F16, [1, s.num_key_value_heads, self.n_ctx, s.head_dim])
        cos, sin = rope_table(s, self.n_ctx)
        half = s.rotary_dim // 2
        rows = []
        for tag, table in (("cos", cos), ("sin", sin)):
            gathered = g.op("Gather", [g.constant(f"rope.{tag}", table), "position_ids"], f"/rope/{tag}/Gather",
                            axis=0)  # (1, S, half)
            rows.append(self.reshape(gathered, [1, 1, S, half], f"/rope/{tag}/Reshape"))
        self.cos, self.sin = rows
        self.mask = "attention_bias"
        if s.n_rep > 1:  # rows follow the stacked query layout (r, S)
            self.mask = g.op("Concat", ["attention_bias"] * s.n_rep, "/mask/repeat", axis=2)
        x = g.op("Gather", [self.const16("model.embed_tokens.weight"), "input_ids"], "/model/embed_tokens/Gather",
                 axis=0)  # (1, S, H) float16
        h = self.phi3(x) if s.is_phi3 else self.phi(x)
        head = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        bias = (lambda: self.read("lm_head.bias")) if not s.is_phi3 else None
        logits = self.linear("/lm_head", h, lambda: self.read(head), bias, None if self.quantize_lm_head else 16)
        g.add_output(logits, "logits", F16, [1, S, s.vocab_size])

    def _w(self, name: str):
        return lambda: self.read(name)

    def phi3(self, x: str) -> str:
        g, s = self.g, self.spec
        for i in range(s.num_hidden_layers):
            p, n = f"model.layers.{i}.", f"/model/layers.{i}"
            h = self.rmsnorm(x, p + "input_layernorm.weight", f"{n}/input_layernorm")
            a = self.attention(i, h, self._w(p + "self_attn.qkv_proj.weight"), None)
            o = self.linear(f"{n}/attn/o_proj", a, self._w(p + "self_attn.o_proj.weight"), None)
            x = g.op("Add", [x, o], f"{n}/attn_residual")
            h = self.rmsnorm(x, p + "post_attention_layernorm.weight", f"{n}/post_attention_layernorm")
            gu = self.linear(f"{n}/mlp/gate_up_proj", h, self._w(p + "mlp.gate_up_proj.weight"), None)
            gate, up = g.node("Split", [gu, g.scalar("/const/split/mlp", [s.intermediate_size] * 2)],
                              f"{n}/mlp/Split", 2, axis=-1)
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{n}/mlp/Sigmoid")], f"{n}/mlp/silu")
            d = self.linear(f"{n}/mlp/down_proj", g.op("Mul", [silu, up], f"{n}/mlp/gate_mul"),
                            self._w(p + "mlp.down_proj.weight"), None)
            x = g.op("Add", [x, d], f"{n}/mlp_residual")
        return self.rmsnorm(x, "model.norm.weight", "/model/norm")

    def rmsnorm(self, x: str, weight: str, name: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.const16(weight)], name, axis=-1,
                         epsilon=self.spec.norm_eps, stash_type=1)

    def phi(self, x: str) -> str:
        g, s = self.g, self.spec
        for i in range(s.num_hidden_layers):
            p, n = f"model.layers.{i}.", f"/model/layers.{i}"
            h = self.layernorm(x, p + "input_layernorm", f"{n}/input_layernorm")
            qkv_w = lambda: np.concatenate([self.read(p + f"self_attn.{c}_proj.weight") for c in "qkv"])  # noqa: E731
            qkv_b = lambda: np.concatenate([self.read(p + f"self_attn.{c}_proj.bias") for c in "qkv"])  # noqa: E731
            a = self.attention(i, h, qkv_w, qkv_b)
            dense = self.linear(f"{n}/attn/dense", a, self._w(p + "self_attn.dense.weight"),
                                self._w(p + "self_attn.dense.bias"))
            fc1 = self.linear(f"{n}/mlp/fc1", h, self._w(p + "mlp.fc1.weight"), self._w(p + "mlp.fc1.bias"))
            act = g.op("Gelu", [fc1], f"{n}/mlp/Gelu", approximate="tanh")  # gelu_new
            fc2 = self.linear(f"{n}/mlp/fc2", act, self._w(p + "mlp.fc2.weight"), self._w(p + "mlp.fc2.bias"))
            x = g.op("Add", [x, g.op("Add", [dense, fc2], f"{n}/branches")], f"{n}/residual")
        return self.layernorm(x, "model.final_layernorm", "/model/final_layernorm")

    def layernorm(self, x: str, prefix: str, name: str) -> str:
        return self.g.op("LayerNormalization", [x, self.const16(prefix + ".weight"), self.const16(prefix + ".bias")],
                         name, axis=-1, epsilon=self.spec.norm_eps)

