"""ONNX export for Qualcomm's Hexagon NPU (QNN HTP): static prefill and decode graphs, compiled offline per SoC.

Writes into the format's directory (bundle/onnx-npu/):
  prefill.onnx   S = chunk (default 32) tokens at a time      \\ both read weights.data (each weight stored once)
  decode.onnx    S = 1                                          /
  npu_config.json  shapes, io names, rope layout, the compiled targets and their files
  qnn/<target>/{prefill,decode}.onnx + *.bin   EPContext models (QNN context binaries) when onnxruntime-qnn is here

Graph layout: export/onnx_npu_graph.py.  Weights: bits=4 → MatMulNBits int4 (block 32, symmetric, float16 scales:
the form the HTP takes), bits=16 → float16 MatMul.  Activations and the KV cache are float16 (the HTP does not
finalize float32 graphs).

htp_arch 69 (Snapdragon 8 Gen 1 / v69): not a target.  See NOTES_V69 below.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgephi.spec import PhiSpec
from edgephi.weights import Checkpoint

from .onnx_genai import special_ids
from .onnx_npu_graph import NpuGraph, SharedBuilder
from .registry import REQUIRES, FormatResult, register, relpath

log = logging.getLogger(__name__)

FORMAT = "onnx-npu"
CONFIG = "npu_config.json"
DATA = "weights.data"
GRAPHS = ("prefill", "decode")
DEFAULT_CHUNK = 32
DEFAULT_N_CTX = 4096
REQUIRES.setdefault(FORMAT, ("onnx",))  # compiling also needs onnxruntime_qnn; without it the graphs alone are written

# htp_arch 69 (Snapdragon 8 Gen 1 / 8+ Gen 1, soc_model 36 / 42) on onnxruntime-qnn 2.7.0's x86 HTP emulation.
# Reported: wrong outputs for a tiny decoder with htp_arch 69 while 68, 73, 75, 79, 81 agreed.  Not reproduced
# here (2026-11, scripts run by hand): these graphs (Phi-3 and Phi-2 layouts, float16 and int4, prefill and decode,
# whole greedy runs), a lone GroupQueryAttention (op_affinity htp, with and without rotary) and opset-23
# RMSNormalization / RotaryEmbedding all match the CPU at htp_arch 69 with soc_model 36, 42, 43, 57 or 69, with
# htp_arch alone, and from context binaries compiled for v69.  What was found instead:
#   * with soc_model set, the emulator ignores htp_arch: 68:43, 69:43, 73:43 give bit-identical outputs, as do
#     68:30, 69:36, 69:42; so "htp_arch 69" beside a v73+ soc_model is not a v69 run at all;
#   * the v68/v69 SoCs form their own numeric class (float16 graphs come out ~2x closer to float32 than on v73+),
#     so a v69 run differs from the v73+ runs by ~1e-3 of max|logit| -- enough to flip a greedy near-tie in a tiny
#     random model (gaps down to 1e-4 here), which is the likely cause of the "wrong outputs" report;
#   * v68 (soc 30) does not take MatMulNBits int4: strict placement fails.
# Still excluded from TARGETS: without hardware the v69 class cannot be told apart from an emulator artefact, and
# whether a real v69 HTP runs these float16 graphs at speed (rather than widening them) the emulation cannot show.
NOTES_V69 = "see the comment above"


def _options(options: dict) -> dict:
    known = {"chunk", "n_ctx", "targets", "compile", "embed_context", "quantize_lm_head"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{FORMAT} export: unknown option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(known))}")
    return options


@register(FORMAT, bits=(4, 16))
def export(ckpt_dir, spec: PhiSpec, out_dir, *, bits: int, progress=None, **options) -> FormatResult:
    """options: chunk (prefill length, 32), n_ctx (static cache length, min(context, 4096)),
    targets (QNN targets to compile, edgephi.backends.qnn_ep.DEFAULT_TARGETS; () = none),
    compile (True when onnxruntime_qnn is importable), embed_context (False: .bin beside the context model),
    quantize_lm_head (True; False keeps the output projection float16 with bits=4)."""
    if bits not in (4, 16):
        raise ValueError(f"{FORMAT} export: bits={bits}; allowed: 4, 16")
    options = _options(dict(options))
    chunk = int(options.get("chunk", DEFAULT_CHUNK))
    n_ctx = int(options.get("n_ctx", min(spec.context_length, DEFAULT_N_CTX)))
    if chunk < 2 or n_ctx < chunk or n_ctx > spec.context_length:
        raise ValueError(f"{FORMAT} export: chunk={chunk}, n_ctx={n_ctx}; need 2 <= chunk <= n_ctx <= "
                         f"{spec.context_length} (the model's context)")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(ckpt_dir)
    ckpt.check(spec)
    total, done = len(spec.tensor_shapes()), set()

    def read(name: str):
        if progress is not None and name not in done:
            done.add(name)
            progress(len(done), total)
        return ckpt.read(name)

    g = SharedBuilder(out_dir / DATA)
    meta = {"edgephi.spec": json.dumps(spec.to_dict()), "edgephi.quant": _quant(bits)}
    try:
        lm_q = bool(options.get("quantize_lm_head", True))
        builder = NpuGraph(g, spec, read, bits, n_ctx, lm_q)
        for graph, S in zip(GRAPHS, (chunk, 1)):
            builder.build(S)
            g.save_graph(out_dir / f"{graph}.onnx", f"edgephi-{spec.name or spec.model_type}-{graph}", meta)
    finally:
        g.close()
    bos, eos, pad = special_ids(spec, ckpt_dir)
    cfg = {
        "graphs": {name: {"file": f"{name}.onnx", "seq_len": S} for name, S in zip(GRAPHS, (chunk, 1))},
        "n_ctx": n_ctx, "chunk": chunk, "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
        "sliding_window": spec.effective_sliding_window, "mask_value": -30000.0,
        # LongRoPE: rows n_ctx.. of the rotary table are the long ones, used once a forward's last position + 1
        # exceeds original_max_position_embeddings (transformers' dynamic_rope_update)
        "rope_long_offset": n_ctx if spec.rope_scaling is not None else None,
        "rope_long_after": spec.rope_scaling.original_max_position_embeddings if spec.rope_scaling else None,
        "io": {"inputs": ["input_ids", "position_ids", "attention_bias", "past_key.%d", "past_value.%d"],
               "outputs": ["logits", "present_key.%d", "present_value.%d"], "dtype": "float16"},
        "bits": bits, "quant": _quant(bits), "quantize_lm_head": lm_q and bits == 4,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "targets": {},
    }
    files = [out_dir / f"{n}.onnx" for n in GRAPHS] + [out_dir / DATA]
    targets = _targets(options)
    if targets:
        cfg["targets"], compiled = compile_targets(out_dir, targets, bool(options.get("embed_context", False)))
        files += compiled
    cfg_path = out_dir / CONFIG
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    files.append(cfg_path)
    return FormatResult(format=FORMAT, files=[relpath(f, out_dir) for f in files], bits=bits, quant=_quant(bits),
                        entry=relpath(out_dir / "prefill.onnx", out_dir),
                        extra={"chunk": chunk, "n_ctx": n_ctx, "quantize_lm_head": lm_q and bits == 4,
                               "config": relpath(cfg_path, out_dir),
                               "qnn_targets": {t: {g: relpath(out_dir / p, out_dir) for g, p in v["graphs"].items()}
                                               for t, v in cfg["targets"].items()}})


def _quant(bits: int) -> str:
    return "int4-b32-sym-a16" if bits == 4 else "f16"


def _targets(options: dict) -> tuple[str, ...]:
    import importlib.util

    from edgephi.backends.qnn_ep import DEFAULT_TARGETS, get_target

    have = importlib.util.find_spec("onnxruntime_qnn") is not None
    want = options.get("compile", have)
    if not want:
        return ()
    if not have:
        raise ValueError(f"{FORMAT} export: compile=True needs onnxruntime-qnn (pip install 'edgephi[qnn]')")
    targets = options.get("targets", DEFAULT_TARGETS)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    for t in targets:
        get_target(t)
    return targets


def compile_targets(out_dir: Path, targets, embed: bool = False) -> tuple[dict, list[Path]]:
    """Compile prefill and decode into QNN context binaries per target: ({target: entry}, files written)."""
    from edgephi.backends.qnn_ep import compile_context, get_target

    entries, files = {}, []
    for name in targets:
        t = get_target(name)
        d = out_dir / "qnn" / name
        if d.exists():
            shutil.rmtree(d)
        graphs = {}
        for graph in GRAPHS:
            ctx = d / f"{graph}.onnx"
            files += compile_context(out_dir / f"{graph}.onnx", ctx, t, embed)
            graphs[graph] = str(ctx.relative_to(out_dir))
        entries[name] = {"htp_arch": t.htp_arch, "soc_model": t.soc_model, "chip": t.chip, "graphs": graphs}
    return entries, files
