"""The GGUF format (bundle/gguf/model-<quant>.gguf): llama.cpp's own file, read by llama.cpp untouched.

Architecture names, metadata keys and tensor names are llama.cpp's (gguf-py's constants); the exporter takes
them from gguf-py and the per-architecture name in edgephi/arch.  Sliding window: the file records it
(<arch>.attention.sliding_window) but llama.cpp 0.3.x disables Phi-3's window, so the llamacpp backend applies it
(edgephi/backends/llamacpp_window.py).  LongRoPE: both factor lists are stored once as rope_factors_long/short.
read_header parses a GGUF header with no gguf-py (the runtime does not carry it), bounded by the file's size; the
backend checks the architecture and sizes it names against the manifest before llama.cpp opens the file.
"""
from __future__ import annotations

import ctypes
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gguf"
# quant name -> (llama_cpp ftype constant, or None for a float file written directly; bits)
QUANTS: dict[str, tuple[str | None, int]] = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8),
    "f16": (None, 16),
    "bf16": (None, 16),
    "f32": (None, 32),
}
DEFAULT_QUANT = {4: "q4_k_m", 8: "q8_0", 16: "f16"}
# Tokens llama.cpp ends a generation on by their text alone, whatever the file says (llama-vocab.cpp, the
# special_eog_ids loop, llama-cpp-python 0.3.36).  Beyond these it stops on tokenizer.ggml.eos/eot/eom_token_id,
# so a bundle's stop set is these (where its vocabulary has them) plus at most three more ids.
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>")
# llama.cpp sets "strip the whitespace after it" (rstrip) on every special token of a model whose general.name
# contains one of these, but on RSTRIP_EXCEPT, and on </s> (Phi-3's tokenizer flags); on no token otherwise.
RSTRIP_NAMES = ("phi-3", "phi3")
RSTRIP_EXCEPT = ("<unk>", "<s>", "<|endoftext|>")


def file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


# ---- llama.cpp's log ------------------------------------------------------------------------------------------
# ggml_log_level (ggml.h) -> logging level.  llama.cpp's warnings go to DEBUG: the ones Phi triggers (e.g. "Phi SWA
# is currently disabled") are handled by edgephi, and llama-cpp-python's own mapping predates the numbering.
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_GGML_LOG_CONT = 5  # continues the previous message at its level
_llama_log = logging.getLogger("edgephi.llama.cpp")
_log_state = {"callback": None, "level": logging.DEBUG}


def quiet_llama_logs() -> None:
    """Send llama.cpp's log (stderr by default) to the logger "edgephi.llama.cpp" (errors at ERROR, rest DEBUG).

    Both sides call it before touching llama.cpp: the exporter's quantizer and the llamacpp backend."""
    if _log_state["callback"] is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, _user_data) -> None:
        if level != _GGML_LOG_CONT:
            _log_state["level"] = _GGML_LEVELS.get(level, logging.DEBUG)
        if _llama_log.isEnabledFor(_log_state["level"]):
            _llama_log.log(_log_state["level"], "%s", text.decode("utf-8", "replace").rstrip("\n"))

    _log_state["callback"] = _callback  # keep a reference: llama.cpp holds a raw pointer to it
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


# ---- the header, read without gguf-py (the runtime does not depend on it) ------------------------------------
# https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, all little-endian: magic "GGUF", uint32 version,
# uint64 tensor_count, uint64 metadata_kv_count, then each pair: key (string: uint64 length + UTF-8 bytes), uint32
# value type, value; an array value is uint32 element type, uint64 count, the elements.  Then the tensor infos
# (not read here: name, uint32 n_dims, uint64 dims, uint32 type, uint64 offset) and the aligned tensor data.
MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in uint32 and is read by no llama.cpp edgephi supports
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}  # bytes per value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # an empty name, no dims, type, offset
_MAX_KEY_BYTES = 65535  # the spec's limit on a key's length
_MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; the bound keeps a crafted file from recursing deep


class _Reader:
    """Reads of an untrusted file: each length is checked against the bytes left before anything is allocated.
    The file is read forward in chunks of at most 1 MiB beyond the largest value (a vocabulary's strings are
    parsed from memory, not one read() each)."""

    def __init__(self, path: Path, f, size: int):
        self.path, self.f, self.size, self.pos = path, f, size, 0
        self.buf, self.off = b"", 0  # read but not yet parsed: buf[off:], which starts at byte pos

    def error(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: corrupt GGUF header at byte {self.pos}: {what}")

    def _ensure(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"{what} needs {n} bytes, the file has {self.size - self.pos} left")
        have = len(self.buf) - self.off
        if have < n:
            more = min(max(n - have, 1 << 20), self.size - self.pos - have)
            self.buf, self.off = self.buf[self.off:] + self.f.read(more), 0
            if len(self.buf) < n:
                raise self.error(f"{what}: the file ended early (it shrank while being read)")

    def take(self, n: int, what: str) -> bytes:
        self._ensure(n, what)
        raw = self.buf[self.off:self.off + n]
        self.off += n
        self.pos += n
        return raw

    def scalar(self, vtype: int, what: str):
        n = _MIN_SIZE[vtype]
        self._ensure(n, what)
        (v,) = struct.unpack_from(_SCALARS[vtype], self.buf, self.off)
        self.off += n
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar(10, f"{what} length")
        if limit is not None and n > limit:
            raise self.error(f"{what} is {n} bytes long; at most {limit} allowed")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(vtype, f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype != _ARRAY:
            raise self.error(f"key {key!r} has value type {vtype}; GGUF types are 0..12")
        if depth >= _MAX_NESTING:
            raise self.error(f"key {key!r}: arrays nested deeper than {_MAX_NESTING}")
        etype, n = self.scalar(4, f"array type of {key!r}"), self.scalar(10, f"array length of {key!r}")
        if etype not in _MIN_SIZE:
            raise self.error(f"key {key!r}: array of value type {etype}; GGUF types are 0..12")
        if n * _MIN_SIZE[etype] > self.size - self.pos:
            raise self.error(f"key {key!r}: an array of {n} elements of type {etype} does not fit in the "
                             f"{self.size - self.pos} bytes left")
        if etype in _SCALARS:
            values = np.frombuffer(self.take(n * _MIN_SIZE[etype], f"array {key!r}"), _SCALARS[etype]).tolist()
            return [bool(v) for v in values] if etype == 7 else values
        if etype == _STRING:
            return self.strings(n, key)
        return [self.value(etype, key, depth + 1) for _ in range(n)]

    def strings(self, n: int, key: str) -> list[str]:
        """n strings of an array (a vocabulary: the hot loop, so the reads are inlined)."""
        out, unpack = [], struct.Struct("<Q").unpack_from
        for i in range(n):
            if len(self.buf) - self.off < 8:  # messages are built only on this slow path
                self._ensure(8, f"length of {key!r}[{i}]")
            (length,) = unpack(self.buf, self.off)
            if len(self.buf) - self.off < 8 + length:
                self._ensure(8 + length, f"{key!r}[{i}]")
            start = self.off + 8
            out.append(self.buf[start:start + length])
            self.off, self.pos = start + length, self.pos + 8 + length
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError as e:
            bad = next(i for i, b in enumerate(out) if not _is_utf8(b))
            raise self.error(f"{key!r}[{bad}] is not UTF-8 ({e.reason})") from None


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """{"version", "tensor_count", "kv_count", "metadata": {key: value}} of a GGUF file, tensor data unread.

    Every count and length is checked against the file's size before it is used (ValueError naming the file, the
    byte offset and the key); strings must be UTF-8; keys must be unique."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: GGUF file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a directory, FIFO or device); a GGUF file is needed")
    with open(path, "rb") as f:
        r = _Reader(path, f, st.st_size)
        magic = r.take(4, "magic") if st.st_size >= 4 else b""
        if magic != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, GGUF files start with {MAGIC!r})")
        version = r.scalar(4, "version")
        if version not in VERSIONS:
            raise ValueError(f"{path}: GGUF version {version}; this reader knows versions "
                             f"{', '.join(map(str, VERSIONS))}")
        tensor_count, kv_count = r.scalar(10, "tensor count"), r.scalar(10, "metadata count")
        if kv_count * (8 + 4 + 1) > st.st_size - r.pos:  # the smallest pair: empty key, type, one byte
            raise r.error(f"{kv_count} metadata pairs do not fit in the {st.st_size - r.pos} bytes left")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = r.string("key", _MAX_KEY_BYTES)
            if key in metadata:
                raise r.error(f"key {key!r} appears twice")
            metadata[key] = r.value(r.scalar(4, f"value type of {key!r}"), key)
        if tensor_count * _MIN_TENSOR_INFO > st.st_size - r.pos:
            raise r.error(f"{tensor_count} tensors do not fit in the {st.st_size - r.pos} bytes left")
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise ValueError(f"{path}: general.alignment={align!r:.40}; it must be a power of two")
    return {"version": version, "tensor_count": tensor_count, "kv_count": kv_count, "metadata": metadata}


def check_metadata(path: str | os.PathLike, expected: dict[str, Any]) -> dict[str, Any]:
    """read_header, and each key of `expected` present with that value (ValueError naming the key, the file's
    value and the expected one: a GGUF from another model is refused before llama.cpp loads it)."""
    header = read_header(path)
    md = header["metadata"]
    for key, want in expected.items():
        if key not in md:
            raise ValueError(f"{path}: GGUF key {key!r} is missing; the manifest's model needs {want!r}")
        if md[key] != want:
            raise ValueError(f"{path}: GGUF key {key!r} is {md[key]!r:.80} but the bundle's manifest says "
                             f"{want!r}: this GGUF is from another model")
    return header
