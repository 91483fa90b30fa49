"""llama.cpp backend (llama-cpp-python's low-level API): GGUF bundles on CPU, Metal and CUDA.

The session drives llama.cpp's context directly (llama_decode, llama_get_logits_ith, llama_memory_seq_*), so the KV
cache persists between forward() calls (a chat's next turn evaluates only its new tokens), rewind() drops cache
entries, and logits come back for the last or for every position.

Two places where llama.cpp (0.3.x) and transformers differ, and what edgephi does about them:

* Sliding window (Phi-3-mini/medium, 2047 tokens): llama.cpp disables Phi-3's SWA ("Phi SWA is currently disabled",
  src/models/phi3.cpp), so past the window its output departs from transformers.  The session applies the window
  itself (llamacpp_window.py): keys older than the window are moved out of the query sequence before each decode,
  and prompt tokens past the window are evaluated one at a time.  Option sliding_window="exact" (default),
  "cap" (limit the context to the window instead) or "off" (llama.cpp's behaviour: full attention).
* LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): llama.cpp picks the long or short factors once, from the
  context size (n_ctx > original_context_length -> long) for every position; transformers picks per call from the
  current sequence length.  They agree once the sequence is past original_max_position_embeddings, or when the
  session is opened with n_ctx <= original_max_position_embeddings (then both use the short factors).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..devices import physical_cores
from ..formats import check_n_ctx
from ..formats import gguf as fmt
from .base import Backend, Session, register_backend
from .llamacpp_window import WindowedCache

log = logging.getLogger(__name__)

DEFAULT_BATCH = 512
SLIDING_WINDOW_MODES = ("exact", "cap", "off")
KV_TYPES = {"f16": 1, "q8_0": 8}  # kv_type option -> ggml type of the K and V cache (GGML_TYPE_F16, GGML_TYPE_Q8_0)
RING_SLACK = 64  # kv_ring: cells beyond the sliding window, for rewinds (speculation rewinds at most 17)
FLASH_ATTN_MODES = ("auto", "on", "off")
MMAP_MODES = ("auto", "on", "off")  # auto: off on CPU, on with a GPU (LlamaCppBackend.open)
_GPU_DEVICES = ("metal", "cuda")


def _needs_offload(probe, what: str) -> str | None:
    if not probe.llama_gpu_offload:
        return f"llama-cpp-python was built without {what} (reinstall it with the {what} backend enabled)"
    return None


# device -> checks (each returns a reason or None), run in order
_DEVICE_CHECKS = {
    "cpu": (),
    "metal": (lambda p: None if p.apple_silicon else "Metal needs macOS on Apple silicon (arm64)",
              lambda p: _needs_offload(p, "Metal")),
    "cuda": (lambda p: None if p.cuda else "no NVIDIA GPU or driver visible",
             lambda p: _needs_offload(p, "CUDA (CMAKE_ARGS=-DGGML_CUDA=on)")),
}


class LlamaCppSession(Session):
    """One llama.cpp context on one GGUF model; sequence 0 holds the visible KV cache."""

    def __init__(self, model_path: Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int,
                 sliding_window: int | None, n_batch: int = DEFAULT_BATCH, flash_attn: str = "auto",
                 kv_type: str = "f16", ring: bool = False, mmap: bool = True):
        import llama_cpp

        fmt.quiet_llama_logs()
        self._ll = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        if hasattr(mparams, "load_mode"):  # llama-cpp-python >= 0.3.30; before it a use_mmap flag
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        else:
            mparams.use_mmap = mmap
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise ValueError(f"{model_path}: llama.cpp could not load this GGUF file (corrupt, or an architecture "
                             f"this llama-cpp-python {llama_cpp.__version__} does not know)")
        cparams = llama_cpp.llama_context_default_params()
        ring = bool(ring and sliding_window)  # a ring buffer holds the window and a slack, not the whole context
        cparams.n_ctx = min(n_ctx, sliding_window + RING_SLACK) if ring else n_ctx
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        self.kv_type = kv_type
        cparams.n_batch = cparams.n_ubatch = min(n_ctx, n_batch)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        # one KV stream shared by sequence 0 (visible) and 1 (keys outside the sliding window, kept for rewind)
        cparams.n_seq_max = 2 if sliding_window else 1
        cparams.kv_unified = True
        cparams.no_perf = True
        cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                   "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise RuntimeError(f"{model_path}: llama.cpp could not create a context of {n_ctx} tokens")
        cells = llama_cpp.llama_n_ctx(self._ctx)
        self.n_ctx = n_ctx if ring else min(n_ctx, cells)  # llama.cpp may round its size up
        self.ring_cells = cells if ring and cells < n_ctx else None
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.n_batch = min(n_ctx, n_batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._window = WindowedCache(llama_cpp, self._mem, sliding_window, self.ring_cells) if sliding_window else None
        self.n_past = 0
        self.n_evaluated = 0

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int], pos0: int, all_logits: bool) -> np.ndarray:
        """One llama_decode of len(ids) <= n_batch tokens at positions pos0..; logits (T or 1, V)."""
        b, n = self._batch, len(ids)
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i] = int(tok)
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        rc = self._ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at positions {pos0}..{pos0 + n - 1} "
                               f"(n_ctx={self.n_ctx})")
        rows = range(n) if all_logits else (n - 1,)
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(rows):
            out[r] = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
        return out

    def _pieces(self, n_new: int) -> list[tuple[int, int]]:
        """(start, length) of each decode call: n_batch-sized, and single tokens where a window would be crossed."""
        out, start = [], 0
        while start < n_new:
            pos = self.n_past + start
            limit = self._window.batch_limit(pos) if self._window else self.n_batch
            length = max(1, min(self.n_batch, limit, n_new - start))
            out.append((start, length))
            start += length
        return out

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self.check_ids(ids, self.n_vocab).tolist()
        self.check_room(len(ids))
        chunks = []
        for start, length in self._pieces(len(ids)):
            pos = self.n_past
            if self._window is not None:
                self._window.before_decode(pos)
            chunks.append(self._decode(ids[start:start + length], pos, all_logits))
            self.n_past += length
            self.n_evaluated += length
        logits = np.concatenate(chunks) if all_logits else chunks[-1]
        return logits if all_logits else logits[-1]

    def reusable(self, n: int) -> int:
        return self._window.reusable(n) if self._window is not None else n

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"rewind({n}): the cache holds {self.n_past} tokens")
        if self.reusable(n) != n:
            raise ValueError(f"rewind({n}): the ring buffer no longer holds the keys position {n} sees; rewind to "
                             "0 and evaluate again")
        if n == 0:
            self._ll.llama_memory_clear(self._mem, True)
        else:
            for seq in ((0, 1) if self._window else (0,)):
                self._ll.llama_memory_seq_rm(self._mem, seq, n, -1)
        if self._window is not None:
            self._window.after_rewind(n)
        self.n_past = n

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may already be gone
            pass


def _window_and_ctx(spec, n_ctx: int, mode: str) -> tuple[int | None, int]:
    sw = spec.effective_sliding_window if spec is not None else None
    if sw is None or n_ctx <= sw:
        return None, n_ctx
    if mode == "cap":
        log.warning("llama.cpp does not apply Phi-3's sliding window (%d tokens); context capped from %d to %d so "
                    "that results match the model (sliding_window='exact' applies the window instead)", sw, n_ctx, sw)
        return None, sw
    if mode == "off":
        log.warning("sliding_window='off': past %d tokens llama.cpp attends to the whole context, unlike the model "
                    "as trained", sw)
        return None, n_ctx
    return sw, n_ctx


@register_backend
class LlamaCppBackend(Backend):
    name = "llamacpp"
    format = fmt.FORMAT
    devices = ("metal", "cuda", "cpu")

    @classmethod
    def unavailable_reason(cls, probe: Any, device: str) -> str | None:
        if device not in _DEVICE_CHECKS:
            return f"llamacpp drives {', '.join(cls.devices)}, not {device!r}"
        if not probe.has("llama_cpp"):
            return "llama-cpp-python is not installed (pip install 'edgephi[gguf]')"
        for check in _DEVICE_CHECKS[device]:
            reason = check(probe)
            if reason:
                return reason
        return None

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Any, device: str, *, n_ctx: int | None = None,
             threads: int | None = None, n_batch: int = DEFAULT_BATCH, sliding_window: str = "exact",
             flash_attn: str | None = None, kv_type: str = "f16", kv_ring: bool = False,
             mmap: str = "auto", **options) -> LlamaCppSession:
        """Options: n_ctx (default: edgephi.formats.default_n_ctx of the model's context), threads (default: physical cores),
        n_batch, sliding_window ("exact" | "cap" | "off"), flash_attn ("auto": llama.cpp decides, "on", "off";
        default "off" on CPU, "auto" on Metal/CUDA).

        Why off on CPU: on Phi-3-mini's shape (2 AVX2 cores, benchmarks/results) llama.cpp's CPU flash-attention
        kernel decodes 8-24% slower after a 512-token prompt (6.2 and 6.8 vs 8.2 and 7.5 tok/s) for a 3% faster prefill,
        so a 512-token prompt with a 128-token answer takes longer with it; llama-cpp-python also leaves it off.

        kv_type ("f16" | "q8_0": llama.cpp's 8-bit K and V cache, half the memory; a quantized V cache needs flash
        attention, so q8_0 turns it on), kv_ring (False: True keeps only the sliding window + RING_SLACK cells
        for models with a window, so memory stops growing past it; see llamacpp_window.py).

        mmap ("auto" | "on" | "off"; auto: off on CPU, on with a GPU): on a CPU llama.cpp repacks most quantized
        weights into its own buffers for its faster kernels, so a mapped file keeps a second, file-backed copy of
        them resident (Phi-3-mini Q4_K_M: 3.88 GB RSS mapped, 2.42 GB read, same kernels); reading the file once
        avoids it."""
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type={kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        if flash_attn is None:
            flash_attn = "on" if kv_type != "f16" else "auto" if device in _GPU_DEVICES else "off"
        if kv_type != "f16" and flash_attn == "off":
            raise ValueError(f"kv_type={kv_type!r} needs flash attention (llama.cpp quantizes the V cache only "
                             "with it); leave flash_attn unset or 'on'")
        if options:
            raise ValueError(f"llamacpp backend: unknown option(s) {', '.join(sorted(options))}; "
                             "known: n_ctx, threads, n_batch, sliding_window, flash_attn, kv_type, kv_ring, mmap")
        if mmap not in MMAP_MODES:
            raise ValueError(f"mmap={mmap!r}; choose one of {', '.join(MMAP_MODES)}")
        if flash_attn not in FLASH_ATTN_MODES:
            raise ValueError(f"flash_attn={flash_attn!r}; choose one of {', '.join(FLASH_ATTN_MODES)}")
        if sliding_window not in SLIDING_WINDOW_MODES:
            raise ValueError(f"sliding_window={sliding_window!r}; choose one of {', '.join(SLIDING_WINDOW_MODES)}")
        if device not in cls.devices:
            raise ValueError(f"llamacpp backend: device {device!r}; choose one of {', '.join(cls.devices)}")
        entry = manifest.formats.get(fmt.FORMAT) if manifest is not None else None
        if entry is None:
            raise ValueError(f"{bundle_dir}: the bundle has no gguf format (export it with --format gguf)")
        path = Path(bundle_dir) / entry.entry
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file named by manifest.json is missing")
        spec = manifest.spec
        if spec is not None:  # our own header reader first: a GGUF of another model never reaches llama.cpp
            from .. import arch

            name = arch.get(spec.model_type).gguf_arch
            fmt.check_metadata(path, {"general.architecture": name, f"{name}.block_count": spec.num_hidden_layers,
                                      f"{name}.embedding_length": spec.hidden_size,
                                      f"{name}.context_length": spec.max_position_embeddings})
        n_ctx = check_n_ctx(n_ctx, int(manifest.context_length), "llamacpp backend")
        window, n_ctx = _window_and_ctx(spec, n_ctx, sliding_window)
        rs = getattr(spec, "rope_scaling", None)
        if rs is not None:
            orig = rs.original_max_position_embeddings
            log.info("LongRoPE: llama.cpp uses the %s factors for every position (n_ctx=%d %s original %d); "
                     "transformers switches to the long ones once a sequence exceeds %d tokens",
                     "long" if n_ctx > orig else "short", n_ctx, ">" if n_ctx > orig else "<=", orig, orig)
        return LlamaCppSession(path, n_ctx=n_ctx, n_threads=threads or physical_cores(),
                               n_gpu_layers=-1 if device in _GPU_DEVICES else 0, sliding_window=window,
                               n_batch=n_batch, flash_attn=flash_attn, kv_type=kv_type, ring=kv_ring,
                               mmap=mmap == "on" or (mmap == "auto" and device in _GPU_DEVICES))


def open_gguf(path: str | Path, spec=None, *, device: str = "cpu", **options) -> LlamaCppSession:
    """A session on a bare GGUF file (no bundle): tests and benchmarks.  spec gives the sliding window."""
    from types import SimpleNamespace

    path = Path(path)
    ctx = spec.max_position_embeddings if spec is not None else options.pop("context_length")
    manifest = SimpleNamespace(formats={fmt.FORMAT: SimpleNamespace(entry=path.name)}, context_length=ctx, spec=spec)
    return LlamaCppBackend.open(path.parent, manifest, device, **options)
