"""Core ML backend: runs the stateful ML program of a bundle's coreml/ entry (macOS 15+, coremltools).

The program (edgephi/formats/coreml.py) takes input_ids (1, T) and position (1,), keeps the KV cache in two
states and returns logits (1, T, V).  The session's cache is an MLState from make_state(); rewind() only lowers
n_past: the slots past it keep stale keys, which the program's mask ignores (a query at p sees slots <= p only).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..formats import coreml as fmt
from .base import Backend, Session, register_backend

log = logging.getLogger(__name__)

# edgephi device -> coremltools ComputeUnit name (the CPU is always allowed as a fallback for unsupported ops)
COMPUTE_UNITS = {"npu": "CPU_AND_NE", "metal": "CPU_AND_GPU", "cpu": "CPU_ONLY"}


def _entry(manifest: Any) -> str:
    """The package the manifest's coreml format entry names (manifest object or dict), else the default."""
    formats = getattr(manifest, "formats", None)
    if formats is None and isinstance(manifest, dict):
        formats = manifest.get("formats")
    entry = formats.get(fmt.FORMAT) if isinstance(formats, dict) else None
    path = getattr(entry, "entry", None) or (entry.get("entry") if isinstance(entry, dict) else None)
    return path or fmt.DEFAULT_ENTRY


class CoreMLSession(Session):
    def __init__(self, model, n_ctx: int, vocab_size: int | None = None):
        self.model, self.n_ctx, self.vocab = model, n_ctx, vocab_size
        self.state = model.make_state()
        self.n_past = 0
        self.n_evaluated = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self.check_ids(ids, self.vocab)
        self.check_room(len(ids))
        out = self.model.predict({fmt.INPUT_IDS: ids.astype(np.int32)[None],
                                  fmt.POSITION: np.array([self.n_past], dtype=np.int32)}, state=self.state)
        logits = np.asarray(out[fmt.LOGITS], dtype=np.float32)[0]  # (T, V)
        self.n_past += len(ids)
        self.n_evaluated += len(ids)
        return logits if all_logits else logits[-1]

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"rewind({n}): must be between 0 and n_past={self.n_past}")
        self.n_past = n  # stale cache slots >= n are masked by the program, then overwritten

    def reset(self) -> None:
        self.rewind(0)


@register_backend
class CoreMLBackend(Backend):
    name = "coreml"
    format = fmt.FORMAT
    devices = ("npu", "metal", "cpu")

    @classmethod
    def unavailable_reason(cls, probe: Any, device: str) -> str | None:
        if device not in cls.devices:
            return f"the coreml backend drives {', '.join(cls.devices)}, not {device!r}"
        if probe.system != "Darwin":
            return f"Core ML runs only on macOS 15+; this is {probe.system}"
        version = probe.macos_version
        if version is None or tuple(version) < fmt.MIN_MACOS:
            shown = ".".join(map(str, version)) if version else "unknown"
            return f"Core ML stateful models (KV cache states) need macOS 15+; this is macOS {shown}"
        if not probe.has("coremltools"):
            return "coremltools is not installed (pip install 'edgephi[coreml]')"
        if device == "npu" and not probe.apple_silicon:
            return f"the Neural Engine needs Apple silicon; this Mac is {probe.machine}"
        return None

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Any, device: str, n_ctx: int | None = None, **options) -> Session:
        """options: n_ctx (at most the cache the program was exported with; default that)."""
        import coremltools as ct

        if device not in COMPUTE_UNITS:
            raise ValueError(f"coreml backend: device {device!r}; choose from {', '.join(COMPUTE_UNITS)}")
        if options:
            raise ValueError(f"coreml backend: unknown options {', '.join(sorted(options))}; known: n_ctx")
        path = Path(bundle_dir) / _entry(manifest)
        if not path.exists():
            raise FileNotFoundError(f"{path}: Core ML package not found (the manifest's coreml entry)")
        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[device]))
        meta = model.user_defined_metadata
        if fmt.N_CTX_KEY not in meta:
            raise ValueError(f"{path}: metadata key {fmt.N_CTX_KEY!r} missing; not an edgephi export")
        log.info("coreml: opened %s on %s (%s)", path, device, COMPUTE_UNITS[device])
        vocab = meta.get(fmt.META_PREFIX + "vocab_size")
        exported = int(meta[fmt.N_CTX_KEY])
        if n_ctx is not None and not 0 < int(n_ctx) <= exported:
            raise ValueError(f"coreml backend: n_ctx={n_ctx}; the program's cache holds 1..{exported} positions "
                             "(export with a larger n_ctx)")
        return CoreMLSession(model, int(n_ctx or exported), int(vocab) if vocab else None)
