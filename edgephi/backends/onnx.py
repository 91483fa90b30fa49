"""ONNX Runtime backend: runs the bundle's onnx/model.onnx with IO binding and one preallocated KV cache.

The graph (edgephi/formats/onnx.py) has GroupQueryAttention read and write the cache in place when the same
buffer is bound as past and present (past_present_share_buffer; the kernel compares the pointers).  The buffer
holds n_ctx positions; seqlens_k (from the attention mask's length) tells the kernel how many are valid, so a
decode step copies nothing and rewind() only lowers n_past.

The first load saves the optimized graph (ORT_ENABLE_EXTENDED: portable across machines of one kind) in the user
cache ($EDGEPHI_HOME/onnx), keyed by the graph's sha256, the weights file's size and time, onnxruntime's version
and the provider; later loads open it directly.  The bundle itself is never written (it may be read-only, as an
app's is), and a cache that cannot be written only costs load time.
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

log = logging.getLogger(__name__)

# execution providers per device, best first; the first one onnxruntime has here is used (CPU always follows)
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cuda": ("CUDAExecutionProvider",),
    "cpu": ("CPUExecutionProvider",),
}
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
            return ort.InferenceSession(str(opt), _session_options(threads, None), providers=providers)
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
    try:
        sess = ort.InferenceSession(str(model_path), _session_options(threads, tmp), providers=providers)
    except Exception:  # noqa: BLE001 - a full or read-only cache makes onnxruntime fail: load without saving
        if tmp is None:
            raise
        _remove(tmp)
        return ort.InferenceSession(str(model_path), _session_options(threads, None), providers=providers)
    if tmp is not None and tmp.is_file():
        try:
            _rename_optimized(tmp, opt)
        except OSError as e:
            log.info("could not keep the optimized graph in %s (%s)", opt.parent, e)
            _remove(tmp)
    return sess


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
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = final.name + ".data"
    final.with_suffix(".onnx.tmp").write_bytes(model.SerializeToString())
    os.replace(final.with_suffix(".onnx.tmp"), final)
    tmp.unlink()


class OnnxSession(Session):
    def __init__(self, model_dir: Path, provider: str = "CPUExecutionProvider", n_ctx: int | None = None,
                 threads: int | None = None, cache_optimized: bool = True, model_file: str | None = None):
        import onnxruntime as ort

        cfg = fmt.read_genai_config(model_dir)
        self.n_layers, self.n_kv, self.head_dim = cfg.n_layers, cfg.n_kv, cfg.head_dim
        model_path = Path(model_dir) / (model_file or cfg.model_file)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file named by {fmt.GENAI_CONFIG} is missing")
        self.n_ctx = check_n_ctx(n_ctx, cfg.context_length, "onnx backend")
        self.provider = provider
        self.sess = make_session(model_path, provider, threads, cache_optimized)
        self.vocab = cfg.vocab_size
        dev = CACHE_DEVICE.get(provider, "cpu")
        shape = (1, self.n_kv, self.n_ctx, self.head_dim)  # (B, n_kv, n_ctx, hd): past and present share it
        self.io = self.sess.io_binding()
        self.io.bind_output(fmt.LOGITS)  # bound first: get_outputs()[0] is the logits
        self._cache = []
        for i in range(self.n_layers):
            for kind in ("key", "value"):
                if dev == "cpu":
                    buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                else:
                    buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, dev, 0)
                self._cache.append(buf)
                self.io.bind_ortvalue_input(fmt.PAST[kind] % i, buf)
                self.io.bind_ortvalue_output(fmt.PRESENT[kind] % i, buf)
        self.n_past = 0
        self.n_evaluated = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # (1, T)
        t = ids.shape[1]
        if t == 0:
            raise ValueError("forward: no token ids given")
        self.check_room(t)
        self.io.bind_cpu_input(fmt.INPUT_IDS, ids)
        # only the mask's length matters: GQA takes positions and valid lengths from it (no padding, batch 1)
        self.io.bind_cpu_input(fmt.ATTENTION_MASK, np.ones((1, self.n_past + t), np.int64))
        self.io.bind_output(fmt.LOGITS)
        self.sess.run_with_iobinding(self.io)
        logits = self.io.get_outputs()[0].numpy()  # (1, T, V)
        self.n_past += t
        self.n_evaluated += t
        return logits[0] if all_logits else logits[0, -1]

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"rewind: n={n}; allowed 0..{self.n_past} (the tokens cached)")
        self.n_past = n  # positions >= n are overwritten by the next forward and masked until then

    def close(self) -> None:
        self.io = None
        self.sess = None
        self._cache = []


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
        provider (an onnxruntime execution provider name overriding the device's), cache_optimized (True)."""
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
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"onnx backend: unknown option(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(known | {'provider'}))}")
        return OnnxSession(model_path.parent, provider, model_file=model_path.name, **options)
