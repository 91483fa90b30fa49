"""onnxruntime-qnn plumbing beneath the onnx-npu format: the qnn backend opens sessions with it, the onnx-npu
exporter compiles context binaries with it (the targets are in edgephi/formats/onnx_npu.py).

onnxruntime-qnn (2.x) is a plugin: QNNExecutionProvider exists only after
``onnxruntime.register_execution_provider_library`` and is attached to a session with
``SessionOptions.add_provider_for_devices`` (backend_path = the HTP library; the wheel ships no QNN CPU backend).

Every target in onnx_npu.TARGETS is compiled and run on the x86 HTP emulation by tests/test_qnn.py.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from .onnx_npu import Target

log = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"


@functools.lru_cache(maxsize=1)
def register_plugin() -> str:
    """Register onnxruntime-qnn's provider library once; returns the HTP backend library path."""
    import onnxruntime as ort
    import onnxruntime_qnn

    if EP_NAME not in ort.get_available_providers():
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn.get_qnn_htp_path()


def qnn_devices():
    """The OrtEpDevice entries of the QNN provider (on x86 the emulated HTP reports the host CPU)."""
    import onnxruntime as ort

    register_plugin()
    return [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]


def provider_options(target: Target) -> dict[str, str]:
    return {"backend_path": register_plugin(), "htp_arch": str(target.htp_arch), "soc_model": str(target.soc_model),
            "enable_htp_fp16_precision": "1", "htp_graph_finalization_optimization_mode": "3"}


def session_options(target: Target, *, strict: bool = True, record: bool = False, compile_to: Path | None = None,
                    embed: bool = False, threads: int | None = None):
    """SessionOptions with the QNN provider attached.

    strict: session.disable_cpu_ep_fallback=1 (a node the HTP cannot take fails session creation);
    record: keep the node placements (get_provider_graph_assignment_info);
    compile_to: write an EPContext model (context binary) there while the session is created.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if compile_to is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(compile_to))
        so.add_session_config_entry("ep.context_embed_mode", "1" if embed else "0")
    devices = qnn_devices()
    if not devices:
        raise RuntimeError("onnxruntime-qnn is registered but lists no QNN device")
    so.add_provider_for_devices(devices[:1], provider_options(target))
    return so


def make_session(model_path: Path, target: Target, **kw):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_path), session_options(target, **kw))


def placements(session) -> dict[str, int]:
    """Nodes per execution provider, from a session made with record=True."""
    out: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        ep = getattr(sub, "ep_name", None) or str(sub)
        nodes = getattr(sub, "get_nodes", None)
        n = len(nodes()) if callable(nodes) else len(getattr(sub, "nodes", []) or [])
        out[ep] = out.get(ep, 0) + n
    return out


def compile_context(model_path: Path, out_path: Path, target: Target, embed: bool = False) -> list[Path]:
    """Compile model_path for target into an EPContext model at out_path; returns the files written."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    before = set(out_path.parent.iterdir())
    make_session(model_path, target, compile_to=out_path, embed=embed)
    if not out_path.is_file():
        raise RuntimeError(f"QNN compile of {model_path.name} for {target.name}: no context model at {out_path}")
    written = sorted(set(out_path.parent.iterdir()) - before)
    log.info("qnn: compiled %s for %s -> %s", model_path.name, target.name, ", ".join(p.name for p in written))
    return written


def describe_devices() -> str:
    return json.dumps([{"type": str(d.device.type), "vendor": d.device.vendor, "metadata": dict(d.ep_metadata)}
                       for d in qnn_devices()])
