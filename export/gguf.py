"""GGUF exporter: llama.cpp's architecture names, metadata keys and tensor names, written from the tensor stream.

The 16-bit file is written tensor by tensor in blocks of at most ``BLOCK_BYTES`` of source data: the header, the
metadata and the tensor infos go through ``gguf.GGUFWriter`` (llama.cpp's own writer), then each tensor's bytes are
read, converted and appended in place, so peak memory is one block, not one tensor and never the model.
4- and 8-bit files come from that file through llama.cpp's own quantizer (``llama_model_quantize``).

Reference for every name and key: llama.cpp's convert_hf_to_gguf.py (conversion/phi.py: Phi2Model,
Phi3MiniModel), gguf-py/gguf/constants.py (MODEL_ARCH.PHI2 / PHI3 tensor lists) and src/models/phi2.cpp, phi3.cpp
(what the loader requires).  The code here is edgephi's own; the tokenizer part is in gguf_vocab.py.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgephi.export.registry import FormatResult, register, relpath
from edgephi.spec import PhiSpec
from edgephi.weights import Checkpoint, CheckpointError, TensorInfo, bf16_to_f32

log = logging.getLogger(__name__)

ARCH = {"phi": "phi2", "phi3": "phi3"}  # PhiSpec.model_type -> llama.cpp architecture name
BLOCK_BYTES = 8 << 20  # source bytes converted at a time

# Hugging Face names -> GGUF names.  Per-layer entries are relative to "model.layers.{i}." -> "blk.{i}.".
GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",  # Phi-3 RMSNorm
    "model.final_layernorm": "output_norm",  # Phi-1/1.5/2 LayerNorm (weight and bias)
    "lm_head": "output",  # absent when tie_word_embeddings: llama.cpp then reuses token_embd
}
LAYER_NAMES = {
    "phi": {
        "input_layernorm": "attn_norm",  # one LayerNorm feeds attention and MLP (parallel block)
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.dense": "attn_output",
        "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
    },
    "phi3": {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.qkv_proj": "attn_qkv",  # fused, rows q | k | v as llama.cpp's build_qkv splits them
        "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up",  # fused, rows gate | up: llama.cpp's LLM_FFN_SWIGLU = silu(first) * second
        "mlp.down_proj": "ffn_down",
    },
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# quant name -> (llama_cpp ftype constant, or None for the directly written float file; bits)
QUANTS: dict[str, tuple[str | None, int]] = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8),
    "f16": (None, 16),
    "bf16": (None, 16),
    "f32": (None, 32),
}
DEFAULT_QUANT = {4: "q4_k_m", 8: "q8_0", 16: "f16"}
# float file type -> (GGML type name, general.file_type = llama_ftype value)
FLOAT_TYPES = {"f16": ("F16", 1), "bf16": ("BF16", 32), "f32": ("F32", 0)}
_SRC_NP = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, cols); GGUF stores it reversed
    out_type: str  # "F32", "F16", "BF16"
    source: TensorInfo | None = None  # read from the checkpoint...
    array: np.ndarray | None = None  # ...or a small computed tensor (rope factors)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.out_type == "F32" else 2)


def gguf_name(hf_name: str, model_type: str) -> str:
    """GGUF tensor name of a Hugging Face tensor name; ValueError for a name llama.cpp has no slot for."""
    m = _LAYER_RE.match(hf_name)
    if m:
        i, module, kind = m.groups()
        table = LAYER_NAMES[model_type]
        if module in table:
            return f"blk.{i}.{table[module]}.{kind}"
    else:
        module, _, kind = hf_name.rpartition(".")
        if module in GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{GLOBAL_NAMES[module]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF name for model_type {model_type!r}")


def plan_tensors(ckpt: Checkpoint, spec: PhiSpec, float_type: str) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in write order (1-D tensors stay F32, as llama.cpp's converter keeps them)."""
    out_type = FLOAT_TYPES[float_type][0]
    plan: list[PlannedTensor] = []
    rs = spec.rope_scaling
    if rs is not None:
        # LongRoPE: the per-frequency divisors, one global copy (llama.cpp duplicates them into every layer)
        for name, fac in (("rope_factors_long.weight", rs.long_factor), ("rope_factors_short.weight", rs.short_factor)):
            arr = np.asarray(fac, dtype=np.float32)
            plan.append(PlannedTensor(name, arr.shape, "F32", array=arr))
    for hf_name, shape in spec.tensor_shapes().items():
        plan.append(PlannedTensor(gguf_name(hf_name, spec.model_type), tuple(shape),
                                  out_type if len(shape) >= 2 else "F32", source=ckpt.info(hf_name)))
    extra = sorted(set(ckpt.names()) - set(spec.tensor_shapes()))
    if extra:
        log.debug("%s: tensors not used by the GGUF file: %s", ckpt.directory, ", ".join(extra[:8]))
    return plan


def metadata(spec: PhiSpec, float_type: str) -> dict[str, tuple[str, object]]:
    """Architecture metadata: GGUF key -> (value kind, value); the kinds name GGUFWriter.add_<kind>."""
    arch = ARCH[spec.model_type]
    a = arch + "."
    md: dict[str, tuple[str, object]] = {
        "general.name": ("string", spec.name or arch),
        "general.file_type": ("uint32", FLOAT_TYPES[float_type][1]),
        a + "context_length": ("uint32", spec.max_position_embeddings),
        a + "embedding_length": ("uint32", spec.hidden_size),
        a + "feed_forward_length": ("uint32", spec.intermediate_size),
        a + "block_count": ("uint32", spec.num_hidden_layers),
        a + "attention.head_count": ("uint32", spec.num_attention_heads),
        a + "attention.head_count_kv": ("uint32", spec.num_key_value_heads),
        a + "rope.dimension_count": ("uint32", spec.rotary_dim),  # partial rotary: only these channels rotate
        a + "rope.freq_base": ("float32", spec.rope_theta),
    }
    if spec.is_phi3:
        md[a + "attention.layer_norm_rms_epsilon"] = ("float32", spec.norm_eps)
        # llama.cpp chooses LongRoPE's long factors when the context it runs with exceeds this length
        md[a + "rope.scaling.original_context_length"] = (
            "uint32", spec.original_max_position_embeddings or spec.max_position_embeddings)
        # 0 = none (Phi-4-mini); llama.cpp 0.3.x reads it but disables Phi-3 SWA (edgephi's backend applies it)
        md[a + "attention.sliding_window"] = ("uint32", spec.sliding_window or 0)
        if spec.rope_scaling is not None:
            # multiplies cos and sin (transformers' attention_factor, sqrt(1 + ln(s)/ln(L_orig)))
            md[a + "rope.scaling.attn_factor"] = ("float32", spec.rope_scaling.attention_factor)
    else:
        md[a + "attention.layer_norm_epsilon"] = ("float32", spec.norm_eps)
    return md


# ---- tensor data ---------------------------------------------------------------------------------------------
def _to_f32(raw: np.ndarray, src_dtype: str) -> np.ndarray:
    return bf16_to_f32(raw) if src_dtype == "BF16" else raw.astype(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (as torch and llama.cpp's ggml_fp32_to_bf16 do; NaN inputs are not special-cased)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _convert(raw: np.ndarray, src_dtype: str, out_type: str, where: str) -> np.ndarray:
    if out_type == "BF16":
        return raw if src_dtype == "BF16" else _f32_to_bf16_bits(_to_f32(raw, src_dtype))
    if out_type == "F16":
        if src_dtype == "F16":
            return raw
        out = _to_f32(raw, src_dtype).astype(np.float16)
        if not np.isfinite(out).all():
            raise ValueError(f"{where}: values beyond float16's range (±65504); export with dtype='bf16' or 'f32'")
        return out
    return raw if src_dtype == "F32" else _to_f32(raw, src_dtype)


class _Blocks:
    """Reusable block buffers: reading and converting a tensor allocates nothing per block."""

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.raw = bytearray(block_bytes)
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


def _write_tensor(fout, t: PlannedTensor, blocks: _Blocks) -> None:
    if t.array is not None:
        fout.write(np.ascontiguousarray(t.array, dtype=np.float32).tobytes())
        return
    info = t.source
    np_dtype = _SRC_NP[info.dtype]
    per_block = len(blocks.raw) // np_dtype.itemsize
    where = f"{info.file}: tensor {info.name!r}"
    view = memoryview(blocks.raw)
    with open(info.file, "rb", buffering=0) as fin:
        fin.seek(info.offset)
        left = info.numel
        while left:
            n = min(left, per_block)
            nbytes = n * np_dtype.itemsize
            if fin.readinto(view[:nbytes]) != nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
            raw = np.frombuffer(blocks.raw, dtype=np_dtype, count=n)
            if info.dtype == "BF16" and t.out_type == "F16":
                out = _bf16_to_f16(raw, blocks, where)
            else:
                out = _convert(raw, info.dtype, t.out_type, where)
            fout.write(out.data if out.flags.c_contiguous else out.tobytes())
            left -= n


def _pad(fout, alignment: int) -> None:
    pos = fout.tell()
    fout.write(b"\0" * ((-pos) % alignment))


def write_float_gguf(ckpt_dir: Path, spec: PhiSpec, path: Path, *, float_type: str = "f16",
                     progress: Callable[[int, int], None] | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write the float GGUF file (F16, BF16 or F32 weights) from the checkpoint, streaming."""
    import gguf

    from edgephi.export.gguf_vocab import add_vocab

    if spec.model_type not in ARCH:
        raise NotImplementedError(f"{ckpt_dir}: model_type {spec.model_type!r} has no GGUF architecture; "
                                  f"supported: {', '.join(ARCH)}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"dtype={float_type!r}: the GGUF float file is one of {', '.join(FLOAT_TYPES)}")
    ckpt = Checkpoint(ckpt_dir)
    ckpt.check(spec)
    plan = plan_tensors(ckpt, spec, float_type)

    writer = gguf.GGUFWriter(path, ARCH[spec.model_type])
    for key, (kind, value) in metadata(spec, float_type).items():
        getattr(writer, f"add_{kind}")(key, value)
    add_vocab(writer, Path(ckpt_dir), spec, tokenizer_pre=tokenizer_pre)
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
        for done, t in enumerate(plan, 1):
            _pad(fout, alignment)
            _write_tensor(fout, t, blocks)
            if progress is not None:
                progress(done, len(plan))
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
    from edgephi.backends.llamacpp import quiet_llama_logs

    quiet_llama_logs()
    ftype_name = QUANTS[quant][0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = n_threads or 0  # 0 = llama.cpp picks (hardware concurrency)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"{src}: llama.cpp's quantizer failed for {quant} (return code {rc})")
    return dst


def resolve_quant(bits: int, quant: str | None) -> str:
    quant = (quant or DEFAULT_QUANT.get(bits, "")).lower()
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: supported GGUF quantizations are {', '.join(QUANTS)}")
    if QUANTS[quant][1] != bits and not (bits == 16 and quant == "f32"):
        allowed = [q for q, (_, b) in QUANTS.items() if b == bits]
        raise ValueError(f"quant={quant!r} is not a {bits}-bit type; for bits={bits} use one of {', '.join(allowed)}")
    return quant


@register("gguf", bits=(4, 8, 16))
def export(ckpt_dir, spec: PhiSpec, out_dir, *, bits: int = 4, progress=None, quant: str | None = None,
           dtype: str = "f16", n_threads: int | None = None, tokenizer_pre: str | None = None,
           **options) -> FormatResult:
    """Write gguf/model-<quant>.gguf.

    Options: quant ("q4_k_m" default for bits=4, "q4_0"; "q8_0" for bits=8; "f16" / "bf16" / "f32" for bits=16),
    dtype (the float file quantization starts from: "f16" default, "bf16", "f32"), n_threads (quantizer),
    tokenizer_pre (llama.cpp pre-tokenizer name, when edgephi cannot tell it from tokenizer.json).
    """
    if options:
        raise ValueError(f"gguf export: unknown option(s) {', '.join(sorted(options))}; "
                         "known: quant, dtype, n_threads, tokenizer_pre")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    quant = resolve_quant(bits, quant)
    final = out_dir / f"model-{quant}.gguf"
    if QUANTS[quant][0] is None:
        write_float_gguf(ckpt_dir, spec, final, float_type=quant, progress=progress, tokenizer_pre=tokenizer_pre)
    else:
        tmp = out_dir / f".model-{dtype}.tmp.gguf"
        try:
            write_float_gguf(ckpt_dir, spec, tmp, float_type=dtype, progress=progress, tokenizer_pre=tokenizer_pre)
            log.info("quantizing %s to %s with llama.cpp", tmp.name, quant)
            quantize(tmp, final, quant, n_threads)
        finally:
            tmp.unlink(missing_ok=True)
    sw = spec.effective_sliding_window
    extra = {
        "arch": ARCH[spec.model_type],
        "n_ctx": spec.max_position_embeddings,
        "sliding_window": sw,
        "quant": quant,
        "original_context_length": spec.original_max_position_embeddings,
        "longrope": spec.rope_scaling is not None,
        "tied_embeddings": spec.tie_word_embeddings,
    }
    return FormatResult(format="gguf", files=[relpath(final, out_dir)], bits=bits, quant=quant,
                        entry=relpath(final, out_dir), extra=extra)
