"""ONNX Runtime backend: runs the bundle's onnx/model.onnx with IO binding and one preallocated KV cache.

The exported graph's GroupQueryAttention reads and writes the cache in place when the same buffer is bound as
``past_key_values.{i}.*`` and ``present.{i}.*`` (past_present_share_buffer; the kernel compares the pointers).
The buffer holds n_ctx positions; seqlens_k (from the attention mask's length) tells the kernel how many are
valid, so a decode step copies nothing and rewind() only lowers n_past.

The first load saves the optimized graph (ORT_ENABLE_EXTENDED: portable across machines of one kind) beside
the model or, if that directory is read-only, under ~/.cache/edgephi/onnx; later loads open it directly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..devices import Probe, physical_cores
from .base import Backend, Session, register_backend

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
DEFAULT_N_CTX = 4096  # the cache is preallocated: a 128k context would need ~100 GB for Phi-3-mini
# execution providers per device, best first; the first one onnxruntime has here is used (CPU always follows)
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cuda": ("CUDAExecutionProvider",),
    "cpu": ("CPUExecutionProvider",),
}
# where onnxruntime places the cache for each provider: OrtValue device name
CACHE_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEPHI_CACHE", Path.home() / ".cache" / "edgephi")) / "onnx"


def optimized_path(model_path: Path, provider: str) -> Path:
    """Where the optimized graph for `provider` lives: beside the model if writable, else in the user cache."""
    import onnxruntime as ort

    st = model_path.stat()
    key = f"{ort.__version__}-{provider}-{st.st_size}-{int(st.st_mtime)}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{model_path.stem}.opt-{tag}.onnx"
    if os.access(model_path.parent, os.W_OK):
        return model_path.parent / name
    d = _cache_dir() / hashlib.sha1(str(model_path.resolve()).encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d / name


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
            opt.unlink(missing_ok=True)
    tmp = None if opt is None else opt.with_name(f"tmp{os.getpid()}-" + opt.name)
    sess = ort.InferenceSession(str(model_path), _session_options(threads, tmp), providers=providers)
    if tmp is not None and tmp.is_file():
        _rename_optimized(tmp, opt)
    return sess


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

        cfg_path = Path(model_dir) / GENAI_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))["model"]
            dec = cfg["decoder"]
            self.n_layers, self.n_kv, self.head_dim = (int(dec["num_hidden_layers"]), int(dec["num_key_value_heads"]),
                                                       int(dec["head_size"]))
            context = int(cfg["context_length"])
            model_file = model_file or dec["filename"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{cfg_path}: missing (the onnx exporter writes it beside model.onnx)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: corrupt genai_config ({e.__class__.__name__}: {e})") from None
        model_path = Path(model_dir) / model_file
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: model file named by {cfg_path.name} is missing")
        self.n_ctx = min(context, int(n_ctx or DEFAULT_N_CTX))
        self.provider = provider
        self.sess = make_session(model_path, provider, threads, cache_optimized)
        self.vocab = int(cfg.get("vocab_size", 0))
        dev = CACHE_DEVICE.get(provider, "cpu")
        shape = (1, self.n_kv, self.n_ctx, self.head_dim)  # (B, n_kv, n_ctx, hd): past and present share it
        self.io = self.sess.io_binding()
        self.io.bind_output("logits")  # bound first: get_outputs()[0] is the logits
        self._cache = []
        for i in range(self.n_layers):
            for kind in ("key", "value"):
                if dev == "cpu":
                    buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                else:
                    buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, dev, 0)
                self._cache.append(buf)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.n_past = 0
        self.n_evaluated = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # (1, T)
        t = ids.shape[1]
        if t == 0:
            raise ValueError("forward: no token ids given")
        self.check_room(t)
        self.io.bind_cpu_input("input_ids", ids)
        # only the mask's length matters: GQA takes positions and valid lengths from it (no padding, batch 1)
        self.io.bind_cpu_input("attention_mask", np.ones((1, self.n_past + t), np.int64))
        self.io.bind_output("logits")
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
        """options: n_ctx (cache length, default min(context, 4096)), threads (default physical cores),
        provider (an onnxruntime execution provider name overriding the device's), cache_optimized (True)."""
        from ..devices import probe

        entry = "onnx/model.onnx"
        if manifest is not None and getattr(manifest, "formats", None) and "onnx" in manifest.formats:
            entry = manifest.formats["onnx"].entry
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
