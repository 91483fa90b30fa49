"""Prompt caches that outlive the process: the KV state after a prefix (a system prompt, a long document), saved to a
file outside the bundle and loaded into a later session instead of recomputing it.

File: MAGIC, a little-endian u32 header length, a JSON header, then the payload (the backend's KV bytes).  The
header keys the state to

* the bundle: sha256 of its manifest.json bytes (which records every model file's size and sha256), so a cache
  from another bundle, or from this one re-exported, is refused;
* the format and backend that wrote it, and the backend's cache layout (layers, KV heads, head size, element
  type, KV options such as llama.cpp's q8_0 cache or a ring buffer's capacity): another layout is refused;
* the token ids it holds (the session then reuses the longest common prefix with the next prompt, as a chat turn
  does), and the payload's size and sha256: a truncated or altered file is refused, never used.

Per backend (STATES): ONNX (the first n_past positions of each layer's key and value buffers, float32, and the ring
offset), llama.cpp (llama_state_seq_get_data / set_data of its sequences: the visible window and, with the
sliding-window emulation, the archived keys), QNN (the float16 numpy cache).  Core ML keeps its cache in an
MLState: copying it needs MLState.read_state / write_state (coremltools 9, macOS 15+; not implemented, no Mac to
test it), so it is refused with that reason (and Core ML does not run on Linux at all).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"EDGEPHI-PROMPT-CACHE\n"
VERSION = 1


class PromptCacheError(ValueError):
    """A prompt cache that cannot be used with this model: what is wrong, naming the file."""


def bundle_hash(bundle_dir) -> str:
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


# ---- per-backend state -----------------------------------------------------------------------------------------
def _cpu_view(value, shape, dtype=np.float32) -> np.ndarray:
    """A numpy view of a CPU OrtValue's memory (the session's preallocated cache buffer)."""
    if value.device_name().lower() != "cpu":
        raise PromptCacheError("prompt caches of the onnx backend need its cache on the CPU (this one is on "
                               f"{value.device_name()})")
    n = int(np.prod(shape))
    buf = (ctypes.c_byte * (n * np.dtype(dtype).itemsize)).from_address(value.data_ptr())
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class OnnxState:
    @staticmethod
    def layout(s) -> dict:
        if getattr(s, "kv_type", "f32") != "f32":
            raise PromptCacheError("prompt caches of the onnx backend hold a float32 cache; this session's is "
                                   f"kv_type={s.kv_type!r} (its scales are calibrated at load)")
        return {"layers": s.n_layers, "kv_heads": s.n_kv, "head_dim": s.head_dim, "dtype": "float32",
                "ring": getattr(s, "ring_capacity", None)}

    @staticmethod
    def _views(s):
        shape = (1, s.n_kv, s._cache_len, s.head_dim) if hasattr(s, "_cache_len") else (1, s.n_kv, s.n_ctx,
                                                                                            s.head_dim)
        return [_cpu_view(v, shape) for v in s._cache]

    @classmethod
    def dump(cls, s) -> tuple[dict, list]:
        used = s.n_past - getattr(s, "offset", 0)
        return {"offset": getattr(s, "offset", 0)}, [np.ascontiguousarray(v[:, :, :used]) for v in cls._views(s)]

    @classmethod
    def restore(cls, s, extra: dict, n: int, payload: memoryview) -> None:
        offset = int(extra.get("offset", 0))
        used = n - offset
        views = cls._views(s)
        size = s.n_kv * used * s.head_dim * 4
        for i, v in enumerate(views):
            v[:, :, :used] = np.frombuffer(payload[i * size:(i + 1) * size], np.float32).reshape(1, s.n_kv, used,
                                                                                                 s.head_dim)
        if hasattr(s, "offset"):
            s.offset = offset
        s.n_past = n

    @staticmethod
    def nbytes(s, extra: dict, n: int) -> int:
        return 2 * s.n_layers * s.n_kv * (n - int(extra.get("offset", 0))) * s.head_dim * 4


class QnnState:
    @staticmethod
    def layout(s) -> dict:
        return {"layers": s.n_layers, "kv_heads": s.n_kv, "head_dim": s.head_dim, "dtype": "float16",
                "graph_ctx": s.graph_ctx}

    @staticmethod
    def dump(s) -> tuple[dict, list]:
        arrays = [a for i in range(s.n_layers) for a in (s.keys[i], s.values[i])]
        return {}, [np.ascontiguousarray(a[:, :, :s.n_past]) for a in arrays]

    @staticmethod
    def restore(s, extra: dict, n: int, payload: memoryview) -> None:
        size = s.n_kv * n * s.head_dim * 2
        for i in range(2 * s.n_layers):
            arr = (s.keys if i % 2 == 0 else s.values)[i // 2]
            arr[:, :, :n] = np.frombuffer(payload[i * size:(i + 1) * size], np.float16).reshape(1, s.n_kv, n,
                                                                                                s.head_dim)
        s.n_past = n

    @staticmethod
    def nbytes(s, extra: dict, n: int) -> int:
        return 2 * s.n_layers * s.n_kv * n * s.head_dim * 2


class LlamaCppState:
    """llama.cpp's own serialization of a sequence's cells (positions, K and V of every layer, in the cache's
    element type)."""

    @staticmethod
    def layout(s) -> dict:
        return {"kv_type": getattr(s, "kv_type", "f16"), "window": s._window.window if s._window else None,
                "ring": getattr(s, "ring_cells", None)}

    @staticmethod
    def dump(s) -> tuple[dict, list]:
        ll, seqs = s._ll, (0, 1) if s._window else (0,)
        if s._window:  # the archive needs only what sequence 0 hides: a cell in both would be written twice
            ll.llama_memory_seq_rm(s._mem, 1, s._window.visible_from, -1)
        blobs = []
        for seq in seqs:
            size = ll.llama_state_seq_get_size(s._ctx, seq)
            buf = (ctypes.c_uint8 * size)()
            got = ll.llama_state_seq_get_data(s._ctx, buf, size, seq)
            blobs.append(bytes(buf[:got]))
        extra = {"sizes": [len(b) for b in blobs],
                 "visible_from": s._window.visible_from if s._window else 0,
                 "archive_from": getattr(s._window, "archive_from", 0) if s._window else 0}
        return extra, blobs

    @staticmethod
    def restore(s, extra: dict, n: int, payload: memoryview) -> None:
        ll = s._ll
        ll.llama_memory_clear(s._mem, True)
        s.n_past = 0
        pos = 0
        for seq, size in enumerate(extra["sizes"]):
            chunk = bytes(payload[pos:pos + size])
            buf = (ctypes.c_uint8 * size).from_buffer_copy(chunk)
            if ll.llama_state_seq_set_data(s._ctx, buf, size, seq) != size:
                ll.llama_memory_clear(s._mem, True)
                raise PromptCacheError("llama.cpp refused the saved state (its layout differs from this context's)")
            pos += size
        if s._window:
            s._window.visible_from = int(extra["visible_from"])
            if hasattr(s._window, "archive_from"):
                s._window.archive_from = int(extra.get("archive_from", 0))
        s.n_past = n

    @staticmethod
    def nbytes(s, extra: dict, n: int) -> int:
        return sum(int(x) for x in extra["sizes"])


STATES: dict[str, Any] = {"onnx": OnnxState, "qnn": QnnState, "llamacpp": LlamaCppState}
UNSUPPORTED = {"coreml": "Core ML keeps the KV cache in an MLState, opaque before macOS 15; coremltools 9's "
                         "MLState.read_state / write_state (Core ML's MLState.withMultiArray(forStateNamed:), "
                         "macOS 15+) could copy its key and value states, but that is not implemented: no Mac here "
                         "to test it"}


def _state(model):
    if model.backend in UNSUPPORTED:
        raise PromptCacheError(f"prompt caches are not available on the {model.backend} backend: "
                               f"{UNSUPPORTED[model.backend]}")
    if model.backend not in STATES:
        raise PromptCacheError(f"prompt caches are not available on the {model.backend} backend (supported: "
                               f"{', '.join(STATES)})")
    return STATES[model.backend]


# ---- the file --------------------------------------------------------------------------------------------------
def save(model, path, tokens: list[int]) -> int:
    """Write the session's KV state of `tokens` (what its cache holds, in order) to `path`; returns the count."""
    st = _state(model)
    s = model.session
    if not tokens or s.n_past != len(tokens):
        raise ValueError(f"nothing to save: the cache holds {s.n_past} tokens (evaluate a prompt first)")
    extra, blobs = st.dump(s)
    h = hashlib.sha256()
    for b in blobs:  # bytes or C-contiguous arrays: both are buffers
        h.update(b)
    size = sum(len(memoryview(b).cast("B")) for b in blobs)
    header = {"version": VERSION, "bundle_sha256": bundle_hash(model.path), "format": model.format,
              "backend": model.backend, "layout": st.layout(s), "extra": extra, "tokens": [int(t) for t in tokens],
              "payload_bytes": size, "payload_sha256": h.hexdigest()}
    raw = json.dumps(header).encode()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(tokens)


def read_header(path) -> tuple[dict, int]:
    """(header, payload offset) of a prompt cache file, or PromptCacheError naming what is wrong."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
            raise PromptCacheError(f"{path}: not an edgephi prompt cache (no {MAGIC.strip().decode()} header)")
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        raw = f.read(n)
    if len(raw) < n:
        raise PromptCacheError(f"{path}: truncated (the header says {n} bytes of JSON, the file ends before)")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise PromptCacheError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise PromptCacheError(f"{path}: prompt cache version {header.get('version') if isinstance(header, dict) else '?'}"
                               f"; this edgephi reads version {VERSION}")
    return header, len(MAGIC) + 4 + n


def load(model, path) -> list[int]:
    """Load `path` into the model's session; returns the tokens it holds.  Refused (PromptCacheError) unless it was
    saved from this bundle, format, backend and cache layout, and is complete and unaltered."""
    st = _state(model)
    s = model.session
    path = Path(path)
    header, offset = read_header(path)
    want = {"bundle_sha256": bundle_hash(model.path), "format": model.format, "backend": model.backend,
            "layout": st.layout(s)}
    for key, value in want.items():
        if header.get(key) != value:
            if key == "bundle_sha256":
                what = (f"was saved from another bundle (manifest sha256 {str(header.get(key))[:12]}…, "
                        f"{model.path} has {value[:12]}…)")
            else:
                what = f"was saved with {key} {header.get(key)!r}; this model runs {value!r}"
            raise PromptCacheError(f"{path}: {what}; not used")
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        raise PromptCacheError(f"{path}: corrupt header (no token list)")
    if len(tokens) > s.n_ctx:
        raise PromptCacheError(f"{path}: holds {len(tokens)} tokens; this session's context is {s.n_ctx}")
    size = int(header.get("payload_bytes", -1))
    have = path.stat().st_size - offset
    if have != size or size != st.nbytes(s, header.get("extra", {}), len(tokens)):
        raise PromptCacheError(f"{path}: truncated or padded: {have} bytes of KV data, the header says {size}; "
                               "not used")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        payload = memoryview(mm)[offset:]
        try:
            if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
                raise PromptCacheError(f"{path}: the KV data's sha256 differs from the header's (the file was "
                                       "altered or damaged); not used")
            st.restore(s, header.get("extra", {}), len(tokens), payload)
        finally:
            payload.release()
    return list(tokens)


def save_model(model, path, prompt=None) -> int:
    """Model.save_prompt_cache: with `prompt` (text or ids), evaluate it (reusing the cached prefix) and save
    exactly its tokens; without, save what the cache holds now."""
    from .generate import common_prefix

    s = model.session
    if prompt is not None:
        ids = model.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("save_prompt_cache: the prompt is empty")
        keep = min(common_prefix(model._cached, ids), s.n_past, len(ids))
        keep = s.reusable(keep) if hasattr(s, "reusable") else keep
        s.rewind(keep)
        model._cached = model._cached[:keep]
        if keep < len(ids):
            s.check_room(len(ids) - keep)
            s.forward(ids[keep:])
        model._cached = ids
    elif s.n_past > len(model._cached):  # speculation may leave accepted tokens past what was yielded
        s.rewind(len(model._cached))
    return save(model, path, list(model._cached))


def load_model(model, path) -> int:
    """Model.load_prompt_cache: the cache then holds the file's tokens; the next prompt reuses their common
    prefix.  On a refusal the model's cache is left empty, never half-loaded."""
    try:
        tokens = load(model, path)
    except Exception:
        model.session.rewind(0)
        model._cached = []
        raise
    model._cached = tokens
    return len(tokens)
