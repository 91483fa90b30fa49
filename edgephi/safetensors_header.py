"""The safetensors header: parsed, type-checked and checked against the file before any tensor is read.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data; offsets are
relative to the end of the header.  Everything in the header is untrusted: every field is type-checked, every
size is checked against the file's size (nothing is allocated from a header number), two tensors may not share
bytes, and the file must be a regular file (a FIFO or a device would block the reader or never end).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy dtype used to read the bytes, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # read as raw bits, widened to float32 by bf16_to_f32
    "F64": (np.dtype("<f8"), 8),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
_BF16_EXPONENT = 0x7F80  # all exponent bits set: Inf or NaN


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config.json."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype: F32, F16, BF16, F64
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen exactly by shifting the 16 bits up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def count_nonfinite(stored: np.ndarray, dtype: str) -> int:
    """How many values of a tensor's stored form (BF16 as raw uint16 bits) are NaN or Inf."""
    if dtype == "BF16":
        return int(np.count_nonzero((stored & _BF16_EXPONENT) == _BF16_EXPONENT))
    finite = np.isfinite(stored)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def check_finite(stored: np.ndarray, info: TensorInfo) -> None:
    """Refuse a tensor holding NaN or Inf: an export of it would run and print garbage without a word."""
    bad = count_nonfinite(stored, info.dtype)
    if bad:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} holds {bad} non-finite value(s) (NaN or Inf); "
                              "the checkpoint is corrupt or was saved from a diverged run")


def regular_file_size(path: Path, what: str) -> int:
    """The size of `path`, which must be a regular file (FileNotFoundError when absent)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: {what} is not a regular file (a directory, FIFO or device); "
                              "only regular files are read")
    return st.st_size


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise CheckpointError(f"key {key!r:.80} appears twice in the header")
        seen.add(key)
    return dict(pairs)


def _load_json(path: Path, f, n: int) -> dict:
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              "not an object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ is a JSON {type(meta).__name__}; it must be an object "
                              "of strings")
    return header


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, meta) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field type-checked."""
    def bad(field: str, allowed: str) -> CheckpointError:
        value = meta.get(field) if isinstance(meta, dict) else meta
        return CheckpointError(f"{path}: tensor {name!r}: {field}={value!r:.80} in the header; {allowed}")

    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} in the header ({meta!r:.80}); "
                              "expected {dtype, shape, data_offsets}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad("dtype", f"supported: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad("shape", "it must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad("data_offsets", "it must be [begin, end], integers with 0 <= begin <= end")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header against the file's size."""
    path = Path(path)
    size = regular_file_size(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {n} bytes, file has {size})")
            header = _load_json(path, f, n)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: safetensors file not found") from None
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, meta)
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] do not match "
                                  f"shape {str(list(shape))[:80]} of {dtype} ({nbytes} bytes)")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"the file has {size}")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    _no_overlaps(path, out, data_start)
    return out


def _no_overlaps(path: Path, infos: dict[str, TensorInfo], data_start: int) -> None:
    """Two tensors may not share bytes (a layer would silently be another's weights); gaps are allowed."""
    spans = sorted((t.offset - data_start, t.offset - data_start + t.nbytes, t.name)
                   for t in infos.values() if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} (data_offsets [{b0}, {e0}]) and {n1!r} "
                                  f"([{b1}, {e1}]) overlap; each tensor must have its own bytes")
