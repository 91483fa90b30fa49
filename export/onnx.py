"""ONNX exporter: the architecture's graph lowered node by node from the tensor stream (export/lower_onnx.py),
written as the format contract says (edgephi/formats/onnx.py), so onnxruntime and onnxruntime-genai run it.

Weights: bits=4 → MatMulNBits (block 32, symmetric by default) with a float16 embedding table; bits=16 → float16
weights cast to float32 at load; bits=32 → float32.  Activations and the KV cache are float32 in every variant.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from edgephi.formats import onnx as fmt

from .lower_onnx import OnnxLowering
from .onnx_graph import WEIGHT_MODES, GraphBuilder
from .registry import FormatResult, lowering_refuses, register, relpath
from .source import Source
from .tokenizer_files import write_tokenizer_files

log = logging.getLogger(__name__)
OPTIONS = ("block_size", "symmetric", "accuracy_level", "quantize_lm_head")


def quant_name(bits: int, block: int, symmetric: bool) -> str:
    return f"int4-b{block}-{'sym' if symmetric else 'asym'}" if bits == 4 else f"f{bits}"


@register(fmt.FORMAT, bits=tuple(WEIGHT_MODES), requires=("onnx",),
          refuses=lowering_refuses(fmt.FORMAT, OnnxLowering))
def export(src: Source, out_dir, *, bits: int, **options) -> FormatResult:
    """Write model.onnx + model.onnx.data + genai_config.json + tokenizer files into out_dir.

    options: block_size (32), symmetric (True), accuracy_level (4: int8 activations on CPU; 0 = exact float),
    quantize_lm_head (True; False keeps it float16).
    """
    if bits not in WEIGHT_MODES:
        raise ValueError(f"onnx export: bits={bits}; allowed: {', '.join(map(str, WEIGHT_MODES))}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"onnx export: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTIONS)}")
    spec, out_dir = src.spec, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    block, symmetric = int(options.get("block_size", 32)), bool(options.get("symmetric", True))
    accuracy_level, lm_q = int(options.get("accuracy_level", 4)), bool(options.get("quantize_lm_head", True))
    model_path = out_dir / fmt.MODEL_FILE
    g = GraphBuilder(out_dir / fmt.DATA_FILE)
    quant = quant_name(bits, block, symmetric)
    try:
        OnnxLowering(g, src.tensors, spec, WEIGHT_MODES[bits], block=block, symmetric=symmetric,
                     accuracy_level=accuracy_level, quantize_lm_head=lm_q).build()
        g.save(model_path, f"edgephi-{spec.name or spec.model_type}",
               {"edgephi.spec": json.dumps(spec.to_dict()), "edgephi.quant": quant})
    finally:
        g.close()
    log.info("onnx: wrote %s (%.1f MB of weights)", model_path, g.bytes_written / 1e6)
    genai = out_dir / fmt.GENAI_CONFIG
    cfg = fmt.genai_config(spec, src.bos_id, src.eos_ids, src.pad_id, fmt.MODEL_FILE)
    genai.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    # beside the graph: the tokenizer (onnxruntime-genai), config.json and generation_config.json (Optimum,
    # transformers.js)
    files = [model_path, out_dir / fmt.DATA_FILE, genai] + write_tokenizer_files(src, out_dir, extra=("config.json",))
    return FormatResult(format=fmt.FORMAT, files=[relpath(f, out_dir) for f in files], bits=bits, quant=quant,
                        entry=relpath(model_path, out_dir),
                        extra={"block_size": block, "symmetric": symmetric, "accuracy_level": accuracy_level,
                               "quantize_lm_head": lm_q, "genai_config": relpath(genai, out_dir)})
