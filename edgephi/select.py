"""Pick the backend at load time: the best device this machine has, then the fastest backend for it.

Every backend answers unavailable_reason(probe, device): None, or why not.  With device="auto" the devices are
tried in DEVICE_ORDER and, for each, the backends in BACKEND_ORDER; the first that can run a format the bundle
holds wins.  Every reason is kept so that --verbose and `edgephi devices` can show why others were passed over.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from .backends.base import BACKENDS, DEVICES, Backend
from .devices import Probe, probe as probe_this_machine

DEVICE_ORDER = ("npu", "metal", "cuda", "cpu")
# Within a device, fastest first.  CPU: benchmarks/results/bench_phi-3-mini_t2.md (2-core AMD EPYC, Phi-3-mini
# shape, medians of 3): the ONNX backend decodes 10.25 tok/s, the llama.cpp backend 7.0 (prefill within 12%),
# see README "Which backend wins".  Accelerators: llama.cpp's Metal and CUDA kernels before ONNX Runtime's.
BACKEND_ORDER = {
    "npu": ("coreml", "qnn"),  # qnn: ONNX Runtime with Qualcomm's HTP (edgephi/backends/qnn.py)
    "metal": ("llamacpp", "coreml"),
    "cuda": ("llamacpp", "onnx"),
    "cpu": ("onnx", "llamacpp", "coreml"),
}
BACKEND_MODULES = ("onnx", "llamacpp", "coreml", "qnn")


class DeviceUnavailableError(RuntimeError):
    """The requested device or format cannot run here; the message lists what can."""


def load_backends() -> dict[str, type[Backend]]:
    for mod in BACKEND_MODULES:
        try:
            importlib.import_module(f"edgephi.backends.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"edgephi.backends.{mod}":
                raise
    return BACKENDS


@dataclass
class Choice:
    backend: type[Backend] | None
    device: str | None
    considered: list[tuple[str, str, str | None]] = field(default_factory=list)  # (backend, device, reason)

    def explain(self) -> str:
        lines = []
        for b, d, why in self.considered:
            mark = "chosen" if self.backend is not None and (b, d) == (self.backend.name, self.device) else (
                "available" if why is None else f"no: {why}")
            lines.append(f"  {b:<9} {d:<6} {mark}")
        return "\n".join(lines)


# devices whose memory is the machine's RAM (a discrete GPU's own memory is not probed)
SHARED_MEMORY_DEVICES = ("cpu", "metal", "npu")


def availability(probe: Probe | None = None, formats: tuple[str, ...] | None = None,
                 needs: dict[str, int] | None = None) -> list[tuple[str, str, str | None]]:
    """(backend, device, reason or None) for every backend and device it drives; needs: bytes each format takes
    to run (Manifest.memory_bytes), refused on a device that cannot hold them."""
    probe = probe or probe_this_machine()
    out = []
    for dev in DEVICE_ORDER:
        for name in BACKEND_ORDER[dev]:
            cls = load_backends().get(name)
            if cls is None or dev not in cls.devices:
                continue
            if formats is not None and cls.format not in formats:
                out.append((name, dev, f"the bundle has no {cls.format} model"))
                continue
            why = cls.unavailable_reason(probe, dev)
            need = (needs or {}).get(cls.format)
            if why is None and need and probe.memory_bytes and dev in SHARED_MEMORY_DEVICES and need > probe.memory_bytes:
                why = (f"the model needs {need / 1e9:.1f} GB (weights and KV cache); this machine has "
                       f"{probe.memory_bytes / 1e9:.1f} GB")
            out.append((name, dev, why))
    return out


def select(formats: tuple[str, ...], device: str = "auto", format: str | None = None,
           probe: Probe | None = None, trust: Callable[[str, str], str | None] | None = None,
           needs: dict[str, int] | None = None) -> Choice:
    """Choose (backend, device) for a bundle holding `formats`.

    trust(backend, device) -> None or why not: with device="auto", a backend that can run but is not trusted
    (edgephi/verify.py: it has not passed its device check here) is passed over with that reason."""
    if device != "auto" and device not in DEVICES:
        raise DeviceUnavailableError(f"unknown device {device!r}; choose from auto, {', '.join(DEVICES)}")
    if format is not None and format not in formats:
        raise DeviceUnavailableError(f"the bundle has no {format} model; it has {', '.join(formats)}")
    rows = availability(probe, formats, needs)
    if format is not None:
        rows = [(b, d, why if load_backends()[b].format == format else f"--format {format} was asked for")
                for b, d, why in rows]
    choice = Choice(None, None, rows)
    for k, (name, dev, why) in enumerate(rows):
        if why is None and (device == "auto" or dev == device):
            distrust = trust(name, dev) if trust is not None and device == "auto" else None
            if distrust is not None:
                rows[k] = (name, dev, distrust)
                continue
            choice.backend, choice.device = load_backends()[name], dev
            return choice
    usable = sorted({f"{d} ({b})" for b, d, why in rows if why is None})
    wanted = "any device" if device == "auto" else f"device {device!r}"
    reasons = "; ".join(f"{b} on {d}: {why}" for b, d, why in rows if (device in ("auto", d)) and why)
    raise DeviceUnavailableError(f"no backend can run this bundle on {wanted} ({reasons or 'no backend drives it'}). "
                                 f"Available here: {', '.join(usable) or 'none'}")
