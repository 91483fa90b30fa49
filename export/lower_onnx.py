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
  the total length (transformers' dynamic_rope_update).  Phi-3-small's block-sparse layers pass the pattern as
  GroupQueryAttention's attention_bias (1, heads or 1, S, total): 0 or MASK_VALUE, computed once per call from
  the positions (Range, Div, Mod, Less, Equal, Or, Where); the CPU kernel adds it with the cache shared as past
  and present, and the causal mask stays the kernel's own.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from edgephi import arch
from edgephi.formats import MASK_VALUE
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
    def embed(self, table: str, scale: float | None = None) -> str:
        name, cast = self.g.float_table(table, self.tensors.read(table), "f32" if self.mode == "f32" else "f16")
        x = self.g.op("Gather", [name, fmt.INPUT_IDS], _prefix(table) + "/Gather", axis=0)  # (B, S, H)
        x = self.g.op("Cast", [x], _prefix(table) + "/Cast", to=FLOAT) if cast else x
        if scale is None:
            return x
        return self.g.op("Mul", [x, self.g.scalar(f"/const/f32/{scale}", scale, np.float32)], _prefix(table) + "/Mul")

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

    def act(self, x, kind: str, limit: float | None = None) -> str:
        g, x = self.g, self._v(x)
        if kind == "gegelu":  # x = [a | b]: a * sigmoid(1.702 a) * (b + 1), a <= limit, |b| <= limit
            a, b = g.node("Split", [x], self._name("gegelu_split"), 2, num_outputs=2, axis=-1)
            lim, neg = (g.scalar(f"/const/f32/{v}", v, np.float32) for v in (limit, -limit))
            a = g.op("Min", [a, lim], self._name("gegelu_clip"))
            gelu = g.op("Mul", [a, g.op("Sigmoid", [g.op("Mul", [a, g.scalar("/const/f32/1.702", 1.702, np.float32)],
                                                         self._name("Mul"))], self._name("Sigmoid"))], self._name("Mul"))
            b = g.op("Add", [g.op("Clip", [b, neg, lim], self._name("gegelu_clip")),
                             g.scalar("/const/f32/1.0", 1.0, np.float32)], self._name("Add"))
            return g.op("Mul", [gelu, b], self._name("gegelu"))
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], self._name("Sigmoid"))], self._name("silu"))
        if kind == "gelu_tanh":  # com.microsoft FastGelu computes exactly gelu_new's tanh approximation
            return g.op("FastGelu", [x], self._name("FastGelu"), MS_DOMAIN)
        raise NotImplementedError(f"ONNX lowering: activation {kind!r}")

    def mul(self, a, b) -> str:
        return self.g.op("Mul", [self._v(a), self._v(b)], self._name("Mul"))

    def add(self, a, b) -> _Sum:
        return _Sum(a, b)

    def logits(self, x, weight: str, bias: str | None = None, scale: float | None = None, masked=None) -> str:
        g, s = self.g, self.spec
        mode = self.mode if (self.mode != "int4" or self.quantize_lm_head) else "f16"
        b = None if bias is None else self.tensors.read(bias)
        w = self.tensors.read(weight)
        if scale is not None:  # folded into the weights (Phi-3-small's 1/8 is exact)
            w, b = w * np.float32(scale), None if b is None else b * np.float32(scale)
        out = self._linear("/lm_head", self._v(x), w, b, mode)
        if masked is not None:
            ids = np.zeros(s.vocab_size, bool)
            ids[list(masked)] = True
            out = g.op("Where", [g.constant("/lm_head/masked_ids", ids),
                                 g.scalar("/const/f32/masked", arch.MASKED_LOGIT, np.float32), out], "/lm_head/mask")
        self.g.add_output(out, fmt.LOGITS, FLOAT, ["batch_size", "sequence_length", s.vocab_size])
        return out

    def attention(self, layer: int, x, qkv, bias, scale: float | None = None, block_sparse=None) -> str:
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
        ins = [packed, "", "", fmt.PAST["key"] % layer, fmt.PAST["value"] % layer, self.seqlens_k, self.total_len,
               self.cos, self.sin]
        if block_sparse is not None:
            ins += ["", self._block_sparse_bias(block_sparse)]  # position_ids (none), attention_bias
        out, pk, pv = g.node("GroupQueryAttention", ins,
                             f"{name.rsplit('/', 1)[0]}/GroupQueryAttention", 3, MS_DOMAIN,
                             num_heads=s.num_attention_heads, kv_num_heads=s.num_key_value_heads,
                             scale=1.0 / math.sqrt(s.head_dim) if scale is None else scale, do_rotary=1,
                             rotary_interleaved=0,
                             local_window_size=fmt.local_window_size(s))
        for kind, src in (("key", pk), ("value", pv)):
            g.add_output(src, fmt.PRESENT[kind] % layer, FLOAT,
                         ["batch_size", s.num_key_value_heads, "total_sequence_length", s.head_dim])
        return out

    def _block_sparse_bias(self, bs) -> str:
        """(1, heads or 1, S, total) float32: 0 where arch.BlockSparse lets the query at total - S + i see the key
        at j, MASK_VALUE elsewhere (causality is the kernel's).  Built once and shared by the sparse layers."""
        if getattr(self, "_sparse_bias", None) is not None:
            return self._sparse_bias
        g, p = self.g, "/block_sparse"
        i64 = lambda v: g.scalar(f"/const/i64/{v}", v)  # noqa: E731
        n_new = g.op("Gather", [g.op("Shape", [fmt.INPUT_IDS], f"{p}/Shape"), i64(1)], f"{p}/n_new", axis=0)
        kpos = g.op("Range", [i64(0), self.total64, i64(1)], f"{p}/kpos")  # (total,)
        qpos = g.op("Range", [g.op("Sub", [self.total64, n_new], f"{p}/first"), self.total64, i64(1)], f"{p}/qpos")
        bk = g.op("Div", [kpos, i64(bs.block_size)], f"{p}/kblock")
        bq = g.op("Unsqueeze", [g.op("Div", [qpos, i64(bs.block_size)], f"{p}/qblock"), g.scalar("/const/i64/[1]", [1])], f"{p}/qcol")
        local = g.op("Less", [g.op("Sub", [bq, bk], f"{p}/distance"), i64(bs.local_blocks)], f"{p}/local")  # (S, T)
        heads = bs.heads(self.spec.num_attention_heads)
        offset = g.constant(f"{p}/head_offset", (np.arange(heads) * bs.head_step + 1).reshape(heads, 1, 1))
        vertical = g.op("Equal", [g.op("Mod", [g.op("Add", [bk, offset], f"{p}/shifted"), i64(bs.vert_stride)],
                                       f"{p}/Mod"), i64(0)], f"{p}/vertical")  # (heads, 1, T)
        allowed = g.op("Or", [local, vertical], f"{p}/allowed")  # (heads, S, T)
        bias = g.op("Where", [allowed, g.scalar("/const/f32/0", 0.0, np.float32),
                              g.scalar(f"/const/f32/{MASK_VALUE}", MASK_VALUE, np.float32)], f"{p}/Where")
        self._sparse_bias = g.op("Unsqueeze", [bias, g.scalar("/const/i64/[0]", [0])], f"{p}/bias")
        return self._sparse_bias

    # ---- mixture of experts (Phi-3.5-MoE) -----------------------------------------------------------------------
    def sparse_moe(self, x, router: str, experts: list[tuple[str, str, str]]) -> str:
        """onnxruntime's MoE / QMoE kernel (CPU and CUDA) with Phi-3.5-MoE's routing computed here.

        The CPU kernel routes by softmax-top-k only (it ignores use_sparse_mixer), so the routing is done in the
        graph (_sparsemixer): the kernel gets logits log(w_j) at the two chosen experts and -1e9 elsewhere with
        normalize_routing_weights=1, i.e. weights w_j / (w_1 + w_2), and its output is scaled by w_1 + w_2.
        Experts are stored as the kernel wants them: fc1 (E, 2I, H) with gate and up rows interleaved (the only
        SwiGLU layout the CPU kernel takes), fc2 (E, H, I), written one expert at a time."""
        g, s = self.g, self.spec
        x = self._v(x)
        p = _prefix(router).rsplit("/", 1)[0]
        scores = self._linear(f"{p}/router", x, self.tensors.read(router), None, "f32")  # (B, S, E)
        logits, total = self._sparsemixer(scores, p)
        flat = g.op("Reshape", [logits, g.scalar(f"/const/i64/[-1,{len(experts)}]", [-1, len(experts)])],
                    f"{p}/router_2d")
        E, I, H = len(experts), s.intermediate_size, s.hidden_size

        def fc1(expert):  # rows gate_0, up_0, gate_1, up_1, ...
            gate, up = self.tensors.read(expert[0]), self.tensors.read(expert[1])
            out = np.empty((2 * I, H), np.float32)
            out[0::2], out[1::2] = gate, up
            return out

        attrs = dict(k=2, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                     normalize_routing_weights=1)
        if self.mode == "int4":
            w1, s1 = self._stacked_int4(f"{p}/fc1", (fc1(e) for e in experts), (E, 2 * I, H))
            w2, s2 = self._stacked_int4(f"{p}/fc2", (self.tensors.read(e[2]) for e in experts), (E, H, I))
            out = g.op("QMoE", [x, flat, w1, s1, "", w2, s2], f"{p}/QMoE", MS_DOMAIN, expert_weight_bits=4,
                       block_size=self.block, **attrs)
        else:
            dtype = np.float32 if self.mode == "f32" else np.float16
            w1 = g.stacked_constant(f"{p}/fc1.weight", (fc1(e).astype(dtype) for e in experts), (E, 2 * I, H))
            w2 = g.stacked_constant(f"{p}/fc2.weight", (self.tensors.read(e[2]).astype(dtype) for e in experts),
                                    (E, H, I))
            if dtype != np.float32:
                w1, w2 = (g.op("Cast", [w], f"{w}/Cast", to=FLOAT) for w in (w1, w2))
            out = g.op("MoE", [x, flat, w1, "", w2], f"{p}/MoE", MS_DOMAIN, **attrs)
        return g.op("Mul", [out, total], f"{p}/scale")

    def _stacked_int4(self, name: str, weights, shape: tuple[int, int, int]) -> tuple[str, str]:
        """Block-wise symmetric int4 experts in QMoE's layout: data (E, N, K/2), scales (E, N, K/block)."""
        from .onnx_quant import quantize_int4

        E, N, K = shape
        scales = []

        def packed():
            for w in weights:
                q = quantize_int4(w, self.block, True)
                scales.append(q.scales)
                yield q.packed.reshape(N, -1)

        data = self.g.stacked_constant(f"{name}.weight_Q4", packed(), (E, N, K // 2))
        return data, self.g.stacked_constant(f"{name}.weight_scales", scales, (E, N, -(-K // self.block)))

    def _sparsemixer(self, scores: str, p: str) -> tuple[str, str]:
        """transformers' sparsemixer (eval) over router scores (B, S, E): for each of two rounds, the best remaining
        expert j and its weight w_j = the softmax, over the experts within 2 x jitter_eps (relative) of the round's
        best score, at j.  Returns (logits log(w) at the chosen experts and -1e9 elsewhere, w_1 + w_2)."""
        g, eps = self.g, 2.0 * self.spec.router_jitter_noise
        E = self.spec.num_local_experts
        experts = g.constant(f"{p}/expert_ids", np.arange(E, dtype=np.int64))
        neg_inf = g.scalar("/const/f32/-inf", -np.inf, np.float32)
        low = g.scalar("/const/f32/-1e9", -1e9, np.float32)
        size = g.op("Abs", [scores], f"{p}/abs")
        masked, weights, chosen = scores, [], []
        for r in (1, 2):
            best = g.op("ReduceMax", [masked, g.scalar("/const/i64/[-1]", [-1])], f"{p}/r{r}/max", keepdims=1)
            pick = g.op("ArgMax", [masked], f"{p}/r{r}/argmax", axis=-1, keepdims=1)  # (B, S, 1)
            gap = g.op("Div", [g.op("Sub", [best, scores], f"{p}/r{r}/sub"),
                               g.op("Max", [size, best], f"{p}/r{r}/factor")], f"{p}/r{r}/gap")
            far = g.op("Greater", [gap, g.scalar(f"/const/f32/{eps}", eps, np.float32)], f"{p}/r{r}/far")
            gates = g.op("Softmax", [g.op("Where", [far, neg_inf, masked], f"{p}/r{r}/gates")], f"{p}/r{r}/softmax",
                         axis=-1)
            weights.append(g.op("GatherElements", [gates, pick], f"{p}/r{r}/weight", axis=-1))  # (B, S, 1)
            chosen.append(g.op("Equal", [experts, pick], f"{p}/r{r}/chosen"))  # (B, S, E)
            masked = g.op("Where", [chosen[-1], neg_inf, masked], f"{p}/r{r}/masked")
        w = g.op("Where", [chosen[0], weights[0], weights[1]], f"{p}/w")
        logits = g.op("Where", [g.op("Or", chosen, f"{p}/either"), g.op("Log", [w], f"{p}/log"), low], f"{p}/logits")
        return logits, g.op("Add", weights, f"{p}/total")
