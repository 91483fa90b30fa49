"""Web exporter (--format web): the ONNX graph in the form browsers run (edgephi/formats/onnx_web.py).

The lowering is the onnx format's (export/lower_onnx.py) with a float32 embedding table and accuracy_level 0;
the graph builder writes the external data in numbered pieces, starting a new piece before a tensor that would
push the current one past ``piece_mb``.  Before anything is written the model's weights are sized from its spec;
a model whose weights, KV cache and activations cannot fit WebAssembly's 4 GiB is refused with the figures.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgephi.formats import onnx as onnx_fmt
from edgephi.formats import onnx_web as fmt

from .lower_onnx import OnnxLowering, _prefix
from .onnx import quant_name
from .onnx_graph import ALIGN, WEIGHT_MODES, GraphBuilder
from .registry import FormatResult, lowering_refuses, register, relpath
from .source import Source
from .tokenizer_files import write_tokenizer_files

log = logging.getLogger(__name__)
OPTIONS = ("block_size", "symmetric", "piece_mb", "n_ctx")
BITS = (4, 32)  # float16 weights would need shader-f16 or a float32 copy of each at load: use 32 or 4


class PieceBuilder(GraphBuilder):
    """GraphBuilder whose external data goes to model.onnx.data.0, .1, ... of at most piece_bytes each."""

    def __init__(self, folder: Path, piece_bytes: int):
        self.folder, self.piece_bytes, self.pieces = Path(folder), piece_bytes, []
        super().__init__(self.folder / (fmt.PIECE % 0))
        self.pieces.append(self.data_path.name)

    def _next_piece(self) -> None:
        self._data.close()
        self.data_path = self.folder / (fmt.PIECE % len(self.pieces))
        self._data, self._offset = open(self.data_path, "wb"), 0
        self.pieces.append(self.data_path.name)

    def stacked_constant(self, name: str, parts, shape: tuple[int, ...]) -> str:
        parts = iter(parts)
        first = np.ascontiguousarray(next(parts))
        nbytes = int(np.prod(shape, dtype=np.int64)) * first.dtype.itemsize
        if nbytes > fmt.MAX_PIECE_BYTES:
            raise ValueError(f"web export: tensor {name} holds {fmt.gb(nbytes)}, more than one browser fetch can hold "
                             f"({fmt.gb(fmt.MAX_PIECE_BYTES)}); this model cannot run in a browser")
        if self._offset and self._offset + (-self._offset) % ALIGN + nbytes > self.piece_bytes:
            self._next_piece()

        def chained():
            yield first
            yield from parts

        return super().stacked_constant(name, chained(), shape)

    def piece_sizes(self) -> list[dict]:
        return [{"path": p, "bytes": (self.folder / p).stat().st_size} for p in self.pieces]


class WebLowering(OnnxLowering):
    """The onnx lowering with the embedding table kept float32 at every bit width (no shader-f16 needed)."""

    def embed(self, table: str) -> str:
        name = self.g.constant(table, self.tensors.read(table).astype(np.float32))
        return self.g.op("Gather", [name, onnx_fmt.INPUT_IDS], _prefix(table) + "/Gather", axis=0)  # (B, S, H)


def weight_bytes(spec, bits: int, block: int, symmetric: bool) -> int:
    """The external data this export writes, from the spec's tensor shapes (alignment padding left out)."""
    total = 0
    for name, shape in spec.tensor_shapes().items():
        n = int(np.prod(shape))
        if bits == 4 and len(shape) == 2 and "embed" not in name:
            rows, k = shape
            blocks = -(-k // block)
            total += rows * blocks * (block // 2 + 4 + (0 if symmetric else 0.5))
        else:
            total += 4 * n
    if spec.tie_word_embeddings:  # the output projection is written as its own (quantized) weight
        v, h = spec.vocab_size, spec.hidden_size
        total += v * -(-h // block) * (block // 2 + 4) if bits == 4 else 4 * v * h
    return int(total)


def check_fits(spec, bits: int, block: int, symmetric: bool, n_ctx: int | None) -> tuple[int, fmt.Budget]:
    """The n_ctx to record (asked for, or the largest that fits); ValueError with the figures when none fits."""
    b = fmt.budget(spec, weight_bytes(spec, bits, block, symmetric))
    what = f"{spec.name or spec.model_type} at {bits} bits"
    if n_ctx is None:
        n_ctx = b.largest_n_ctx(spec.context_length)
        if n_ctx == 0:
            raise ValueError(
                f"web export: {what} does not fit a browser tab: {fmt.gb(b.weights)} of weights + "
                f"{fmt.gb(fmt.KV_COPIES * b.kv_per_token * min(fmt.N_CTX_STEP, spec.context_length))} of KV cache "
                f"for {fmt.N_CTX_STEP} tokens + {fmt.gb(fmt.RESERVE_BYTES)} for the runtime > {fmt.gb(b.limit)} of "
                "WebAssembly memory; run the onnx format (onnxruntime-genai, the Android app) instead")
        return n_ctx, b
    if not 0 < n_ctx <= spec.context_length:
        raise ValueError(f"web export: n_ctx={n_ctx}; allowed 1..{spec.context_length} (the model's context)")
    if b.need(n_ctx) > b.limit:
        raise ValueError(f"web export: {what} with n_ctx={n_ctx} needs {fmt.gb(b.need(n_ctx))} > {fmt.gb(b.limit)} "
                         f"of WebAssembly memory; the largest n_ctx that fits is {b.largest_n_ctx(spec.context_length)}")
    return n_ctx, b


@register(fmt.FORMAT, bits=BITS, requires=("onnx",), refuses=lowering_refuses(fmt.FORMAT, WebLowering))
def export(src: Source, out_dir, *, bits: int, **options) -> FormatResult:
    """Write model.onnx + model.onnx.data.N + web_config.json + genai_config.json + tokenizer files into out_dir.

    options: block_size (32), symmetric (True), piece_mb (1024: the largest external data piece, in MiB),
    n_ctx (the cache the runtime allocates by default; default: the largest that fits the memory budget)."""
    if bits not in BITS:
        raise ValueError(f"web export: bits={bits}; allowed: {', '.join(map(str, BITS))} (16-bit weights would need "
                         "shader-f16 or a float32 copy in memory)")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"web export: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTIONS)}")
    spec, out_dir = src.spec, Path(out_dir)
    block, symmetric = int(options.get("block_size", 32)), bool(options.get("symmetric", True))
    piece = int(options.get("piece_mb", fmt.DEFAULT_PIECE_BYTES >> 20)) << 20
    if not 0 < piece <= fmt.MAX_PIECE_BYTES:
        raise ValueError(f"web export: piece_mb={piece >> 20}; allowed 1..{fmt.MAX_PIECE_BYTES >> 20}")
    n_ctx, b = check_fits(spec, bits, block, symmetric, options.get("n_ctx"))
    out_dir.mkdir(parents=True, exist_ok=True)
    g = PieceBuilder(out_dir, piece)
    quant = quant_name(bits, block, symmetric)
    model_path = out_dir / fmt.MODEL_FILE
    try:
        WebLowering(g, src.tensors, spec, WEIGHT_MODES[bits], block=block, symmetric=symmetric,
                    accuracy_level=fmt.ACCURACY_LEVEL, quantize_lm_head=True).build()
        g.save(model_path, f"edgephi-{spec.name or spec.model_type}-web",
               {"edgephi.spec": json.dumps(spec.to_dict()), "edgephi.quant": quant})
    finally:
        g.close()
    pieces = g.piece_sizes()
    written = sum(p["bytes"] for p in pieces)
    cfg = fmt.WebConfig(model=fmt.MODEL_FILE, external_data=pieces, n_ctx=n_ctx, context_length=spec.context_length,
                        num_hidden_layers=spec.num_hidden_layers, num_key_value_heads=spec.num_key_value_heads,
                        head_dim=spec.head_dim, vocab_size=spec.vocab_size, bits=bits, quant=quant,
                        prefill_chunk=fmt.PREFILL_CHUNK,
                        memory={"weights_bytes": written, "kv_bytes_per_token": b.kv_per_token,
                                "need_bytes": fmt.budget(spec, written).need(n_ctx), "limit_bytes": b.limit})
    web_cfg = cfg.save(out_dir)
    genai = out_dir / onnx_fmt.GENAI_CONFIG  # the Python ONNX backend and onnxruntime-genai run this folder too
    genai.write_text(json.dumps(onnx_fmt.genai_config(spec, src.bos_id, src.eos_ids, src.pad_id, fmt.MODEL_FILE),
                                indent=4) + "\n", encoding="utf-8")
    log.info("web: wrote %s (%s in %d piece(s), n_ctx %d)", model_path, fmt.gb(written), len(pieces), n_ctx)
    files = ([model_path] + [out_dir / p["path"] for p in pieces] + [web_cfg, genai]
             + write_tokenizer_files(src, out_dir, extra=("config.json",)))
    return FormatResult(format=fmt.FORMAT, files=[relpath(f, out_dir) for f in files], bits=bits, quant=quant,
                        entry=relpath(model_path, out_dir),
                        extra={"block_size": block, "symmetric": symmetric, "accuracy_level": fmt.ACCURACY_LEVEL,
                               "web_config": relpath(web_cfg, out_dir), "n_ctx": n_ctx,
                               "pieces": [p["path"] for p in pieces]})
