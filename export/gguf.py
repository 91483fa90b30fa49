"""GGUF exporter: llama.cpp's architecture names, metadata keys and tensor names, written from the tensor stream.

Names come from gguf-py (llama.cpp's own Python package): tensor names from its name map for the architecture's
``gguf_arch`` (edgephi/arch), metadata through ``GGUFWriter.add_<key>`` (the sizes every architecture has, then
the architecture file's ``gguf_metadata``).  The 16-bit file is written tensor by tensor in blocks of at most
``BLOCK_BYTES`` of source data read from the stream: the header, the metadata and the tensor infos go through
``gguf.GGUFWriter``, then each tensor's bytes are converted and appended in place, so peak memory is one block.
4- and 8-bit files come from that file through llama.cpp's own quantizer (``llama_model_quantize``).  The file
name and the quantization table are the format's contract (edgephi/formats/gguf.py); the tokenizer part is in
gguf_vocab.py.
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgephi import arch
from edgephi.formats import gguf as fmt
from edgephi.weights import bf16_to_f32, f32_to_bf16_bits

from .registry import FormatResult, quiet_libraries, register, relpath
from .source import Source

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # source bytes converted at a time
# float file type -> (GGML type name, general.file_type = llama_ftype value)
FLOAT_TYPES = {"f16": ("F16", 1), "bf16": ("BF16", 32), "f32": ("F32", 0)}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, cols); GGUF stores it reversed
    out_type: str  # "F32", "F16", "BF16"
    sources: tuple[str, ...] = ()  # checkpoint tensors read from the stream (several: stacked, one after another)
    array: np.ndarray | None = None  # ...or a small computed tensor (rope factors)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.out_type == "F32" else 2)


def gguf_name(hf_name: str, spec) -> str:
    """GGUF tensor name of a Hugging Face tensor name (gguf-py's map for the architecture); ValueError for a
    tensor llama.cpp's architecture has no slot for."""
    import gguf

    gguf_arch = arch.get(spec.model_type).gguf_arch
    code = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    names = gguf.get_tensor_name_map(code, spec.num_hidden_layers)
    base, _, kind = hf_name.rpartition(".")
    kind_ok = kind in ("weight", "bias")
    tensor_type = names.get_type(base) if kind_ok else None
    if tensor_type is None or tensor_type not in gguf.MODEL_TENSORS[code]:
        raise ValueError(f"tensor {hf_name!r} has no GGUF name for llama.cpp's {gguf_arch!r} architecture")
    return f"{names.get_name(base)}.{kind}"


def plan_tensors(src: Source, float_type: str) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in write order (1-D tensors stay F32, as llama.cpp's converter keeps them)."""
    spec = src.spec
    out_type = FLOAT_TYPES[float_type][0]
    plan: list[PlannedTensor] = []
    rs = spec.rope_scaling
    if rs is not None:
        # LongRoPE: the per-frequency divisors, one global copy (llama.cpp duplicates them into every layer)
        for name, fac in (("rope_factors_long.weight", rs.long_factor), ("rope_factors_short.weight", rs.short_factor)):
            arr = np.asarray(fac, dtype=np.float32)
            plan.append(PlannedTensor(name, arr.shape, "F32", array=arr))
    shapes = spec.tensor_shapes()
    stacked = arch.get(spec.model_type).gguf_stacked(spec)  # e.g. each layer's experts as one 3-D tensor
    in_stack = {name for parts in stacked.values() for name in parts}
    for hf_name, shape in shapes.items():
        if hf_name not in in_stack:
            plan.append(PlannedTensor(gguf_name(hf_name, spec), tuple(shape), out_type if len(shape) >= 2 else "F32",
                                      sources=(hf_name,)))
    for merged, parts in stacked.items():
        plan.append(PlannedTensor(gguf_name(merged, spec), (len(parts),) + tuple(shapes[parts[0]]), out_type,
                                  sources=tuple(parts)))
    extra = sorted(set(src.tensors.names()) - set(spec.tensor_shapes()))
    if extra:
        log.debug("%s: tensors not used by the GGUF file: %s", src.directory, ", ".join(extra[:8]))
    return plan


def write_metadata(writer, spec, float_type: str) -> None:
    """The sizes every architecture has, then the architecture file's own keys, through gguf-py's writers."""
    writer.add_file_type(FLOAT_TYPES[float_type][1])
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_block_count(spec.num_hidden_layers)
    writer.add_head_count(spec.num_attention_heads)
    writer.add_head_count_kv(spec.num_key_value_heads)
    writer.add_rope_dimension_count(spec.rotary_dim)  # partial rotary: only these channels rotate
    writer.add_rope_freq_base(spec.rope_theta)
    for key, value in arch.get(spec.model_type).gguf_metadata(spec).items():
        getattr(writer, f"add_{key}")(value)


# ---- tensor data ---------------------------------------------------------------------------------------------
def _to_f32(raw: np.ndarray, src_dtype: str) -> np.ndarray:
    return bf16_to_f32(raw) if src_dtype == "BF16" else raw.astype(np.float32)


def _convert(raw: np.ndarray, src_dtype: str, out_type: str, where: str) -> np.ndarray:
    if out_type == "BF16":
        return raw if src_dtype == "BF16" else f32_to_bf16_bits(_to_f32(raw, src_dtype))
    if out_type == "F16":
        if src_dtype == "F16":
            return raw
        out = _to_f32(raw, src_dtype).astype(np.float16)
        if not np.isfinite(out).all():
            raise ValueError(f"{where}: values beyond float16's range (±65504); export with dtype='bf16' or 'f32'")
        return out
    return raw if src_dtype == "F32" else _to_f32(raw, src_dtype)


class _Blocks:
    """Reusable conversion buffers: converting a tensor allocates nothing per block."""

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self.u32 = np.empty(block_bytes // 2, dtype=np.uint32)
        self.f16 = np.empty(block_bytes // 2, dtype=np.float16)


def _bf16_to_f16(raw: np.ndarray, blocks: _Blocks, where: str) -> np.ndarray:
    """bfloat16 bits -> float16, exactly as float32 would round (widen by a shift, then one rounding)."""
    n = raw.size
    # |x| >= 65536 (bf16 bits 0x4780 and up, inf and NaN included) does not fit float16
    if int((raw & 0x7FFF).max(initial=0)) >= 0x4780:
        raise ValueError(f"{where}: values beyond float16's range (±65504); export with dtype='bf16' or 'f32'")
    u32, f16 = blocks.u32[:n], blocks.f16[:n]
    u32[...] = raw
    u32 <<= 16
    f16[...] = u32.view(np.float32)
    return f16


def _write_tensor(fout, t: PlannedTensor, tensors, blocks: _Blocks) -> None:
    if t.array is not None:
        fout.write(np.ascontiguousarray(t.array, dtype=np.float32).tobytes())
        return
    for source in t.sources:  # a stacked tensor: one checkpoint tensor after another, each streamed in blocks
        info = tensors.info(source)
        where = f"{info.file}: tensor {info.name!r}"
        for raw in tensors.read_blocks(source, blocks.block_bytes):
            if info.dtype == "BF16" and t.out_type == "F16":
                out = _bf16_to_f16(raw, blocks, where)
            else:
                out = _convert(raw, info.dtype, t.out_type, where)
            fout.write(out.data if out.flags.c_contiguous else out.tobytes())


def _pad(fout, alignment: int) -> None:
    pos = fout.tell()
    fout.write(b"\0" * ((-pos) % alignment))


def write_float_gguf(src: Source, path: Path, *, float_type: str = "f16", tokenizer_pre: str | None = None) -> Path:
    """Write the float GGUF file (F16, BF16 or F32 weights) from the tensor stream."""
    import gguf

    from .gguf_vocab import add_vocab

    spec = src.spec
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"dtype={float_type!r}: the GGUF float file is one of {', '.join(FLOAT_TYPES)}")
    plan = plan_tensors(src, float_type)
    writer = gguf.GGUFWriter(path, arch.get(spec.model_type).gguf_arch)
    write_metadata(writer, spec, float_type)
    with quiet_libraries("gguf"):  # gguf-py's notes on tokenizer files it does not use
        add_vocab(writer, src, tokenizer_pre=tokenizer_pre)  # general.name too: it sets llama.cpp's whitespace rule
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                               raw_dtype=getattr(gguf.GGMLQuantizationType, t.out_type))
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    alignment = writer.data_alignment
    writer.close()
    # data section: each tensor aligned, in tensor-info order (the offsets GGUFWriter wrote assume exactly this)
    with open(path, "r+b") as fout:
        fout.seek(0, os.SEEK_END)
        blocks = _Blocks()
        for t in plan:
            _pad(fout, alignment)
            _write_tensor(fout, t, src.tensors, blocks)
        _pad(fout, alignment)
    return path


# ---- quantization through llama.cpp ------------------------------------------------------------------------
def quantize(src: Path, dst: Path, quant: str, n_threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (the code behind llama-quantize) from a float GGUF file."""
    try:
        import llama_cpp
    except ImportError:
        raise ModuleNotFoundError(f"quant={quant!r} needs llama-cpp-python (pip install 'edgephi[gguf]'); "
                                  "bits=16 writes a float GGUF without it") from None
    fmt.quiet_llama_logs()
    ftype_name = fmt.QUANTS[quant][0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = n_threads or 0  # 0 = llama.cpp picks (hardware concurrency)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        from errno import ENOSPC

        from .staging import no_space

        if no_space(dst.parent):  # llama.cpp says only "iostream error" when the disk fills up
            raise OSError(ENOSPC, "No space left on device", str(dst))
        raise RuntimeError(f"{src}: llama.cpp's quantizer failed for {quant} (return code {rc})")
    return dst


def resolve_quant(bits: int, quant: str | None) -> str:
    quant = (quant or fmt.DEFAULT_QUANT.get(bits, "")).lower()
    if quant not in fmt.QUANTS:
        raise ValueError(f"quant={quant!r}: supported GGUF quantizations are {', '.join(fmt.QUANTS)}")
    if fmt.QUANTS[quant][1] != bits and not (bits == 16 and quant == "f32"):
        allowed = [q for q, (_, b) in fmt.QUANTS.items() if b == bits]
        raise ValueError(f"quant={quant!r} is not a {bits}-bit type; for bits={bits} use one of {', '.join(allowed)}")
    return quant


def _refuses(spec) -> str | None:
    """A family llama.cpp has no graph for (Architecture.gguf_arch None) cannot be a GGUF."""
    family = arch.get(spec.model_type)
    return None if family.gguf_arch is not None else family.gguf_refusal or f"llama.cpp cannot run {family.description}"


@register(fmt.FORMAT, bits=(4, 8, 16), requires=("gguf", "llama_cpp"), refuses=_refuses)
def export(src: Source, out_dir, *, bits: int = 4, quant: str | None = None, dtype: str = "f16",
           n_threads: int | None = None, tokenizer_pre: str | None = None, **options) -> FormatResult:
    """Write gguf/model-<quant>.gguf.

    Options: quant ("q4_k_m" default for bits=4, "q4_0"; "q8_0" for bits=8; "f16" / "bf16" / "f32" for bits=16),
    dtype (the float file quantization starts from: "f16" default, "bf16", "f32"), n_threads (quantizer),
    tokenizer_pre (llama.cpp pre-tokenizer name, when edgephi cannot tell it from tokenizer.json).
    """
    if options:
        raise ValueError(f"gguf export: unknown option(s) {', '.join(sorted(options))}; "
                         "known: quant, dtype, n_threads, tokenizer_pre")
    spec, out_dir = src.spec, Path(out_dir)
    refused = _refuses(spec)
    if refused:
        raise NotImplementedError(f"gguf export: {refused}")
    quant = resolve_quant(bits, quant)
    final = out_dir / fmt.file_name(quant)
    if fmt.QUANTS[quant][0] is None:
        write_float_gguf(src, final, float_type=quant, tokenizer_pre=tokenizer_pre)
    else:
        tmp = out_dir / f".model-{dtype}.tmp.gguf"
        try:
            write_float_gguf(src, tmp, float_type=dtype, tokenizer_pre=tokenizer_pre)
            log.info("quantizing %s to %s with llama.cpp", tmp.name, quant)
            quantize(tmp, final, quant, n_threads)
        finally:
            tmp.unlink(missing_ok=True)
    extra = {
        "arch": arch.get(spec.model_type).gguf_arch,
        "context_length": spec.max_position_embeddings,
        "sliding_window": spec.effective_sliding_window,
        "quant": quant,
        "original_context_length": spec.original_max_position_embeddings,
        "longrope": spec.rope_scaling is not None,
        "tied_embeddings": spec.tie_word_embeddings,
    }
    return FormatResult(format=fmt.FORMAT, files=[relpath(final, out_dir)], bits=bits, quant=quant,
                        entry=relpath(final, out_dir), extra=extra)
