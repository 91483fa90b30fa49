"""An 8-bit KV cache for the onnx backend (kv_type="int8"): onnxruntime's CPU GroupQueryAttention stores K and V
as int8 with static per-channel scales (k_quant_type / v_quant_type "PER_CHANNEL", kv_cache_bit_width 8) and
dequantizes them inside attention (benchmarks/gqa_int8_check.py: its output equals attention over the same quantized
K and V to float rounding).  A quarter of the float32 cache's bytes.

The scales are static, so they are calibrated when the model loads: a float32 session evaluates CALIBRATION (a
few hundred tokens of English and Python through the bundle's tokenizer), and each channel's scale is its largest
magnitude there × MARGIN / 127.  Keys carry rotary position embedding: a rotation mixes channel i with channel
i + rotary_dim / 2, so both get the pair's largest norm, which no position changes (and the ring buffer's
rotations back stay in range).  A value past the calibrated range saturates at ±127.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MARGIN = 1.5
CALIBRATION = (
    "The committee met on Tuesday to review the budget for the coming year. Several members asked why the costs of "
    "maintenance had doubled since the last report, and the treasurer explained that two of the older buildings "
    "needed new roofs.\n\n"
    "def moving_average(values, window):\n"
    "    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n"
    "        raise ValueError(f\"window must be positive, got {window}\")\n"
    "    total, out = sum(values[:window]), []\n"
    "    for i in range(window, len(values) + 1):\n"
    "        out.append(total / window)\n"
    "        if i < len(values):\n"
    "            total += values[i] - values[i - window]\n"
    "    return out\n\n"
    "Q: What is the capital of France?\nA: Paris. It has been the capital since the tenth century, with short "
    "interruptions, and today about two million people live in the city itself.\n"
    "<|user|>\nWrite a haiku about autumn rain.<|end|>\n<|assistant|>\nCold drops on the glass,\nleaves sink in the "
    "gutter's stream;\nthe lamp hums till dawn.<|end|>\n"
)
_LAYER = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def calibrate(arrays: list[np.ndarray], n: int, rotary_dim: int) -> list[np.ndarray]:
    """Per-channel scales (n_kv * head_dim,) for each layer's key then value, from the first n positions of a
    float32 cache's arrays (1, n_kv, positions, head_dim)."""
    scales = []
    for i, arr in enumerate(arrays):
        x = np.abs(arr[0, :, :n].astype(np.float64))  # (n_kv, n, hd)
        if i % 2 == 0 and rotary_dim:
            h = rotary_dim // 2
            pair = np.sqrt(x[..., :h] ** 2 + x[..., h:2 * h] ** 2)
            x[..., :h] = x[..., h:2 * h] = pair
        top = x.max(axis=1)  # (n_kv, hd)
        top = np.maximum(top, max(float(top.max()) * 1e-3, 1e-6))  # a channel that stayed ~0: still a usable scale
        scales.append((top * MARGIN / 127).astype(np.float32).reshape(-1))
    return scales


def int8_model(model_path: Path, scales: list[np.ndarray]) -> bytes:
    """The graph with an int8 cache: every GroupQueryAttention quantizes into its present K and V with `scales`
    (layer i: scales[2i] for keys, scales[2i + 1] for values); the cache inputs and outputs become int8.  External
    data stays where it is (load with session.model_external_initializers_file_folder_path)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    n_gqa = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        m = _LAYER.match(node.input[3]) if len(node.input) > 3 else None
        if m is None:
            raise ValueError(f"{model_path}: a GroupQueryAttention node reads its cache from {node.input[3:4]}, not "
                             "past_key_values.N.key: kv_type='int8' needs edgephi's graph layout")
        layer = int(m.group(1))
        names = [f"edgephi_kv_scale.{layer}.key", f"edgephi_kv_scale.{layer}.value"]
        for name, sc in zip(names, scales[2 * layer:2 * layer + 2]):
            g.initializer.append(numpy_helper.from_array(sc, name))
        inputs = list(node.input) + [""] * max(0, 12 - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:12] + names)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        n_gqa += 1
    if 2 * n_gqa != len(scales):
        raise ValueError(f"{model_path}: {n_gqa} attention nodes for {len(scales) // 2} calibrated layers")
    for v in list(g.input) + list(g.output):
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.elem_type = TensorProto.INT8
    return model.SerializeToString()


def make_int8_session(model_path: Path, scales: list[np.ndarray], provider: str, threads: int | None):
    import onnxruntime as ort

    from .onnx import _session_options

    so = _session_options(threads, None)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    try:
        return ort.InferenceSession(int8_model(model_path, scales), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        if type(e).__name__ not in ("Fail", "InvalidGraph", "InvalidArgument", "NotImplemented"):
            raise
        raise ValueError(f"{model_path}: kv_type='int8' needs onnxruntime's 8-bit GroupQueryAttention cache; "
                         f"onnxruntime {ort.__version__} refused the graph ({' '.join(str(e).split())[:200]})") from e


def calibrated_scales(bundle_dir: Path, model_path: Path, provider: str, spec, threads, cache_optimized):
    """The int8 cache's scales: a float32 session (a cache just long enough) evaluates the calibration text through
    the bundle's tokenizer, then closes."""
    from ..tokenizer import Tokenizer
    from .onnx import OnnxSession

    ids = Tokenizer.from_dir(bundle_dir).encode(CALIBRATION, add_special_tokens=True)
    ids = ids[: getattr(spec, "context_length", None) or len(ids)]
    s = OnnxSession(model_path.parent, provider, n_ctx=len(ids), threads=threads, cache_optimized=cache_optimized,
                    model_file=model_path.name)
    try:
        s.forward(ids)
        return calibrate(s._arrays, len(ids), getattr(spec, "rotary_dim", None) or s.head_dim)
    finally:
        s.close()
