"""ONNX Runtime backend: runs the bundle's onnx/model.onnx with IO binding and one preallocated KV cache.

The graph (edgephi/formats/onnx.py) has GroupQueryAttention read and write the cache in place when the same
buffer is bound as past and present (past_present_share_buffer; the kernel compares the pointers).  The buffer
holds n_ctx positions; seqlens_k (from the attention mask's length) tells the kernel how many are valid, so a
decode step copies nothing and rewind() only lowers n_past.

The first load saves the optimized graph (ORT_ENABLE_EXTENDED: portable across machines of one kind) in the user
cache ($EDGEPHI_HOME/onnx), keyed by the graph's sha256, the weights file's size and time, onnxruntime's version
and the provider; later loads open it directly.  The bundle itself is never written (it may be read-only, as an
app's is), and a cache that cannot be written only costs load time.  The cache is bounded: each use marks its
entry, and after a new entry is saved the least recently used ones go until the rest fit in
$EDGEPHI_ONNX_CACHE_GB (default 8; the entry just made always stays), so re-exported bundles do not fill the disk.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..devices import Probe, physical_cores
from ..formats import check_n_ctx
from ..formats import onnx as fmt
from ..paths import cache_home
from .base import Backend, Session, register_backend
from .onnx_ring import ring_for

log = logging.getLogger(__name__)

# execution providers per device, best first; the first one onnxruntime has here is used (CPU always follows)
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cuda": ("CUDAExecutionProvider",),
    "cpu": ("CPUExecutionProvider",),
}
KV_TYPES = (None, "f32", "int8")
LOGITS_ROWS = 32  # calls of up to this many tokens write their logits into one preallocated buffer
# where onnxruntime places the cache for each provider: OrtValue device name
CACHE_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def optimized_path(model_path: Path, provider: str) -> Path:
    """Where the optimized graph of this exact model for `provider` lives in the user cache."""
    import onnxruntime as ort

    h = hashlib.sha256(model_path.read_bytes())  # the graph alone: its weights are external
    data = model_path.with_name(model_path.name + ".data")
    if data.is_file():
        st = data.stat()
        h.update(f"{st.st_size}-{st.st_mtime_ns}".encode())
    h.update(f"{ort.__version__}-{provider}".encode())
    return cache_home() / "onnx" / h.hexdigest()[:24] / f"{model_path.stem}.opt.onnx"


def _session_options(threads: int | None, save_to: Path | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", save_to.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def make_session(model_path: Path, provider: str, threads: int | None = None, cache: bool = True):
    """An InferenceSession; with cache=True the optimized graph is saved on first load and reused after."""
    import onnxruntime as ort

    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    opt = optimized_path(model_path, provider) if cache else None
    if opt is not None and opt.is_file():
        try:
            sess = ort.InferenceSession(str(opt), _session_options(threads, None), providers=providers)
            _touch(opt.parent)
            return sess
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types; rebuild on any
            log.warning("%s: cached optimized graph unusable (%s); rebuilding it", opt, e)
            _remove(opt)
    tmp = None
    if opt is not None:
        try:
            opt.parent.mkdir(parents=True, exist_ok=True)
            tmp = opt.with_name(f"tmp{os.getpid()}-" + opt.name)
        except OSError as e:
            log.info("optimized-graph cache %s not writable (%s): loading without it", opt.parent, e)
    def load_error(e: Exception) -> Exception:
        """onnxruntime's own types for a corrupt graph (plain Exceptions) as a ValueError naming the file."""
        if type(e).__name__ not in ("InvalidProtobuf", "InvalidGraph", "Fail", "NoSuchFile", "InvalidArgument"):
            return e
        return ValueError(f"{model_path}: onnxruntime cannot load this ONNX graph (corrupt, truncated, or its "
                          f"external data is): {' '.join(str(e).split())[:300]}")

    try:
        sess = ort.InferenceSession(str(model_path), _session_options(threads, tmp), providers=providers)
    except Exception as e:  # noqa: BLE001 - a full or read-only cache makes onnxruntime fail: load without saving
        if tmp is None:
            raise load_error(e) from e
        _remove(tmp)
        try:
            return ort.InferenceSession(str(model_path), _session_options(threads, None), providers=providers)
        except Exception as e2:  # noqa: BLE001 - see load_error
            raise load_error(e2) from e2
    if tmp is not None and tmp.is_file():
        try:
            _rename_optimized(tmp, opt)
        except Exception as e:  # noqa: BLE001 - a full disk can also leave a truncated graph (onnx's DecodeError)
            log.info("could not keep the optimized graph in %s (%s)", opt.parent, e)
            for p in (tmp, opt, opt.with_suffix(".onnx.tmp")):
                _remove(p)
        else:
            prune_cache(opt.parent.parent, keep=opt.parent)
    return sess


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)
    except OSError:
        pass


def prune_cache(root: Path, keep: Path, max_bytes: int | None = None) -> list[Path]:
    """Remove the least recently used entries of the optimized-graph cache `root` beyond max_bytes (default
    $EDGEPHI_ONNX_CACHE_GB GB, 8); `keep` always stays.  Returns the removed entries."""
    import shutil

    if max_bytes is None:
        try:
            max_bytes = int(float(os.environ.get("EDGEPHI_ONNX_CACHE_GB") or 8) * 2**30)
        except ValueError:
            log.warning("EDGEPHI_ONNX_CACHE_GB=%r is not a number: using 8", os.environ["EDGEPHI_ONNX_CACHE_GB"])
            max_bytes = 8 * 2**30
    entries = []
    try:
        for d in root.iterdir():
            if d.is_dir() and not d.is_symlink():
                entries.append((d.stat().st_mtime, sum(f.stat().st_size for f in d.iterdir() if f.is_file()), d))
    except OSError:
        return []
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, d in sorted(entries, key=lambda e: e[0]):  # oldest use first
        if total <= max_bytes:
            break
        if d == keep:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d)
    if removed:
        log.info("optimized-graph cache %s: removed %d least recently used entries", root, len(removed))
    return removed


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _rename_optimized(tmp: Path, final: Path) -> None:
    """Move a freshly saved optimized graph into place: data file first, then the graph naming it."""
    import onnx

    data = tmp.with_name(tmp.name + ".data")
    if data.is_file():
        os.replace(data, final.with_name(final.name + ".data"))
    model = onnx.load(str(tmp), load_external_data=False)
    for t in _tensors(model.graph):
        for e in t.external_data:
            if e.key == "location":
                e.value = final.name + ".data"
    final.with_suffix(".onnx.tmp").write_bytes(model.SerializeToString())
    os.replace(final.with_suffix(".onnx.tmp"), final)
    tmp.unlink()


def _tensors(graph):
    """Every tensor of a graph and its subgraphs (an If's branches hold LongRoPE's tables)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


class OnnxSession(Session):
    def __init__(self, model_dir: Path, provider: str = "CPUExecutionProvider", n_ctx: int | None = None,
                 threads: int | None = None, cache_optimized: bool = True, model_file: str | None = None,
                 ring=None, kv_scales: list[np.ndarray] | None = None):
        import onnxruntime as ort

        cfg = fmt.read_genai_config(model_dir)
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layers, cfg.n_kv, cfg.head_dim
        model_path = Path(model_dir) / (model_file or cfg.model_file)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file named by {fmt.GENAI_CONFIG} is missing")
        self.n_ctx = check_n_ctx(n_ctx, cfg.context_length, "onnx backend")
        self.provider = provider
        if kv_scales is None:
            self.sess = make_session(model_path, provider, threads, cache_optimized)
        else:  # an int8 cache with calibrated scales (onnx_int8.py): its graph is made here, not cached
            from .onnx_int8 import make_int8_session

            self.sess = make_int8_session(model_path, kv_scales, provider, threads)
        self.kv_type, self.kv_scales = ("int8", kv_scales) if kv_scales is not None else ("f32", None)
        kv_dtype = np.int8 if kv_scales is not None else np.float32
        self.vocab = cfg.vocab_size
        dev = CACHE_DEVICE.get(provider, "cpu")
        self._ring = ring if ring is not None and ring.capacity < self.n_ctx else None  # kv_ring: onnx_ring.py
        if self._ring is not None and dev != "cpu":
            raise ValueError("kv_ring: the onnx backend's ring buffer needs its cache on the CPU")
        self._cache_len = self._ring.capacity if self._ring else self.n_ctx
        self.ring_capacity = self._ring.capacity if self._ring else None
        shape = (1, self.n_kv, self._cache_len, self.head_dim)  # (B, n_kv, positions, hd): past and present share it
        self._arrays = []  # the CPU buffers' numpy arrays (the ring shifts them in place)
        self.io = self.sess.io_binding()
        self.io.bind_output(fmt.LOGITS)  # bound first: get_outputs()[0] is the logits
        self._cache = []
        for i in range(self.n_layers):
            for kind in ("key", "value"):
                if dev == "cpu":
                    self._arrays.append(np.zeros(shape, kv_dtype))
                    buf = ort.OrtValue.ortvalue_from_numpy(self._arrays[-1])
                else:
                    buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, kv_dtype, dev, 0)
                self._cache.append(buf)
                self.io.bind_ortvalue_input(fmt.PAST[kind] % i, buf)
                self.io.bind_ortvalue_output(fmt.PRESENT[kind] % i, buf)
        self.n_past = 0
        self.n_evaluated = 0
        self._logits = self._logits_buffer(dev)

    def _logits_buffer(self, dev: str):
        """A CPU buffer the logits of calls up to LOGITS_ROWS tokens are written into (decode and verify steps): no
        output allocated per call, no OrtValue wrappers read back.  None (ORT allocates) where the graph's logits
        are not a static-width float tensor on the CPU."""
        out = next((o for o in self.sess.get_outputs() if o.name == fmt.LOGITS), None)
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(getattr(out, "type", None))
        width = out.shape[-1] if out is not None and out.shape else None
        if dev != "cpu" or dtype is None or not isinstance(width, int):
            return None
        return np.empty((1, LOGITS_ROWS, width), dtype), {}

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self.check_ids(ids, self.vocab).reshape(1, -1)  # (1, T)
        t = ids.shape[1]
        self.check_room(t)
        if self._ring is not None:  # in pieces that fit the ring, each after a shift if needed
            out, done = [], 0
            while done < t:
                used = self.n_past - self._ring.offset
                room = self._ring.capacity - min(used, self._ring.window - 1 + self._ring.reserve)
                piece = t - done if used + t - done <= self._ring.capacity else min(t - done, room)
                self._ring.make_room(self.n_past, piece, self._arrays, self.kv_scales)
                out.append(self._run(ids[:, done:done + piece], all_logits))
                done += piece
            return np.concatenate(out) if all_logits else out[-1]
        return self._run(ids, all_logits)

    @property
    def offset(self) -> int:
        """True position of cache index 0 (0 but in a shifted ring buffer)."""
        return self._ring.offset if self._ring is not None else 0

    @offset.setter
    def offset(self, value: int) -> None:
        if self._ring is not None:
            self._ring.offset = value
        elif value:
            raise ValueError("offset: only a ring buffer (kv_ring) has one")

    def reusable(self, n: int) -> int:
        return self._ring.reusable(n) if self._ring is not None else n

    def _run(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        t = ids.shape[1]
        self.io.bind_cpu_input(fmt.INPUT_IDS, ids)
        # only the mask's length matters: GQA takes positions and valid lengths from it (no padding, batch 1)
        self.io.bind_cpu_input(fmt.ATTENTION_MASK, np.ones((1, self.n_past - self.offset + t), np.int64))
        if self._logits is not None and t <= LOGITS_ROWS:
            import onnxruntime as ort

            buf, views = self._logits
            if t not in views:  # the first t rows of the buffer are contiguous: ORT writes the (1, t, V) result there
                views[t] = ort.OrtValue.ortvalue_from_numpy(buf[:, :t])
            self.io.bind_ortvalue_output(fmt.LOGITS, views[t])
            self.sess.run_with_iobinding(self.io)
            logits, reused = buf[:, :t], True
        else:
            self.io.bind_output(fmt.LOGITS)
            self.sess.run_with_iobinding(self.io)
            logits, reused = self.io.get_outputs()[0].numpy(), False  # (1, T, V)
        self.n_past += t
        self.n_evaluated += t
        out = logits[0] if all_logits else logits[0, -1]
        return out.copy() if reused else out  # the next call writes the buffer again

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"rewind: n={n}; allowed 0..{self.n_past} (the tokens cached)")
        if self._ring is not None:
            self._ring.after_rewind(n)
        self.n_past = n  # positions >= n are overwritten by the next forward and masked until then

    def close(self) -> None:
        self.io = None
        self.sess = None
        self._cache = []
        self._arrays = []


@register_backend
class OnnxBackend(Backend):
    name = "onnx"
    format = "onnx"
    devices = ("cuda", "cpu")

    @classmethod
    def unavailable_reason(cls, probe: Probe, device: str) -> str | None:
        if device not in PROVIDERS:
            if device == "npu":
                return "ONNX Runtime's NPU execution providers (QNN) are driven by the qnn backend, not this one"
            return f"the onnx backend drives {', '.join(cls.devices)}, not {device}"
        if not probe.ort_providers:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if not any(p in probe.ort_providers for p in PROVIDERS[device]):
            return f"onnxruntime here has no {' or '.join(PROVIDERS[device])} (it has {', '.join(probe.ort_providers)})"
        if device == "cuda" and not probe.cuda:
            return "no NVIDIA GPU or driver visible"
        return None

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Any, device: str, **options) -> OnnxSession:
        """options: n_ctx (cache length, default edgephi.formats.default_n_ctx), threads (default physical cores),
        provider (an onnxruntime execution provider name overriding the device's), cache_optimized (True),
        kv_ring (False: True, or a slack in positions, bounds a sliding-window model's cache: onnx_ring.py),
        kv_type ("f32", or "int8": onnxruntime's 8-bit cache with calibrated scales, onnx_int8.py; CPU only)."""
        from ..devices import probe

        entry = f"{fmt.FORMAT}/{fmt.MODEL_FILE}"
        if manifest is not None and getattr(manifest, "formats", None) and fmt.FORMAT in manifest.formats:
            entry = manifest.formats[fmt.FORMAT].entry
        model_path = Path(bundle_dir) / entry
        provider = options.pop("provider", None)
        if provider is None:
            have = probe().ort_providers
            provider = next((p for p in PROVIDERS.get(device, ()) if p in have), None)
            if provider is None:
                raise ValueError(f"onnx backend: device {device!r} has no execution provider here "
                                 f"(onnxruntime has {', '.join(have)}); devices: {', '.join(cls.devices)}")
        known = {"n_ctx", "threads", "cache_optimized"}
        kv_type, kv_ring = options.pop("kv_type", None), options.pop("kv_ring", False)
        if kv_type not in KV_TYPES:
            raise ValueError(f"onnx backend: kv_type={kv_type!r}; allowed: {', '.join(map(repr, KV_TYPES[1:]))} "
                             "(the gguf format has llama.cpp's 'q8_0')")
        if kv_type == "int8" and provider != "CPUExecutionProvider":
            raise ValueError(f"onnx backend: kv_type='int8' runs on the CPU (onnxruntime's 8-bit cache in "
                             f"GroupQueryAttention); not on {provider}")
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"onnx backend: unknown option(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(known | {'provider', 'kv_type', 'kv_ring'}))}")
        spec = getattr(manifest, "spec", None)
        ring = ring_for(spec, kv_ring)  # kv_ring: onnx_ring.py
        scales = None
        if kv_type == "int8":
            from .onnx_int8 import calibrated_scales

            scales = calibrated_scales(Path(bundle_dir), model_path, provider, spec, options.get("threads"),
                                       options.get("cache_optimized", True))
        return OnnxSession(model_path.parent, provider, model_file=model_path.name, ring=ring, kv_scales=scales,
                           **options)

