"""Does onnxruntime's CPU GroupQueryAttention with an int8 KV cache hold tolerance?  One GQA node (4 query heads,
2 KV heads, head size 64, 16 tokens of unit-variance inputs) with k_quant_type/v_quant_type and static scales,
against attention computed in numpy over the same quantized K and V, for a prompt call and a decode call.

    python -m edgephi.benchmarks.gqa_int8_check

It prints differences at float32 rounding (~1e-7) next to the effect of the quantization itself (~0.02): the check
behind the ONNX backend's kv_type="int8" (edgephi/backends/onnx_int8.py; README *Speculative decoding*).
"""
from __future__ import annotations

import numpy as np

N, KV, D, S = 4, 2, 64, 16


def graph(scales: tuple[np.ndarray, np.ndarray]) -> bytes:
    """One GroupQueryAttention node with an int8 cache and per-channel scales (no rotary, positions, bias, sink)."""
    from onnx import TensorProto as TP, helper as h

    cache = TP.INT8
    inputs = [h.make_tensor_value_info(n, TP.FLOAT, [1, "s", w]) for n, w in (("q", N * D), ("k", KV * D),
                                                                            ("v", KV * D))]
    inputs += [h.make_tensor_value_info(n, cache, [1, KV, "p", D]) for n in ("pk", "pv")]
    inputs += [h.make_tensor_value_info("seqlens_k", TP.INT32, [1]), h.make_tensor_value_info("total", TP.INT32, [])]
    outputs = [h.make_tensor_value_info("o", TP.FLOAT, [1, "s", N * D])]
    outputs += [h.make_tensor_value_info(n, cache, [1, KV, "t", D]) for n in ("ok", "ov")]
    ins = ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "", "", "", "", "", "k_scale", "v_scale"]
    attrs = {"num_heads": N, "kv_num_heads": KV, "k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL",
             "kv_cache_bit_width": 8}
    inits = [h.make_tensor(n, TP.FLOAT, [a.size], a) for n, a in zip(("k_scale", "v_scale"), scales)]
    node = h.make_node("GroupQueryAttention", ins, ["o", "ok", "ov"], domain="com.microsoft", **attrs)
    model = h.make_model(h.make_graph([node], "gqa", inputs, outputs, initializer=inits),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def attention(q, k, v) -> np.ndarray:
    """Causal attention of the last q.shape[1] positions over all of k, v (1, S, heads * D)."""
    t, s = q.shape[1], k.shape[1]
    Q = q.reshape(t, N, D).transpose(1, 0, 2)
    K, V = (x.reshape(s, KV, D).transpose(1, 0, 2) for x in (k, v))
    out = np.zeros((N, t, D))
    mask = np.triu(np.full((t, s), -np.inf), s - t + 1)
    for head in range(N):
        kv = head // (N // KV)
        w = Q[head] @ K[kv].T / np.sqrt(D) + mask
        w = np.exp(w - w.max(1, keepdims=True))
        out[head] = (w / w.sum(1, keepdims=True)) @ V[kv]
    return out.transpose(1, 0, 2).reshape(1, t, N * D)


def main() -> int:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, S, w)).astype(np.float32) for w in (N * D, KV * D, KV * D))
    for label, per_channel in (("one scale for all channels", False), ("per-channel scales", True)):
        scales = tuple((np.abs(x[0]).max(0) if per_channel else np.full(KV * D, np.abs(x).max())).astype(np.float32)
                       / 127 for x in (k, v))
        quantized = [np.clip(np.round(x[0] / sc), -127, 127) * sc for x, sc in zip((k, v), scales)]
        want = attention(q, quantized[0][None], quantized[1][None])
        sess = ort.InferenceSession(graph(scales))
        cache = lambda x, sc, n: np.clip(np.round(x[0, :n] / sc), -127, 127).reshape(n, KV, D).transpose(1, 0, 2)[
            None].astype(np.int8)
        prompt = sess.run(None, {"q": q, "k": k, "v": v, "pk": np.zeros((1, KV, 0, D), np.int8),
                                 "pv": np.zeros((1, KV, 0, D), np.int8), "seqlens_k": np.array([S - 1], np.int32),
                                 "total": np.array(S, np.int32)})[0]
        decode = sess.run(None, {"q": q[:, -1:], "k": k[:, -1:], "v": v[:, -1:], "pk": cache(k, scales[0], S - 1),
                                 "pv": cache(v, scales[1], S - 1), "seqlens_k": np.array([S - 1], np.int32),
                                 "total": np.array(S, np.int32)})[0]
        print(f"{label}: max |difference| prompt {np.abs(prompt - want).max():.3f}, decode "
              f"{np.abs(decode[0, -1] - want[0, -1]).max():.3f} (outputs up to {np.abs(want).max():.2f}; float32 "
              f"cache quantization alone moves them by {np.abs(want - attention(q, k, v)).max():.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
