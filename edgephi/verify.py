"""Trust an accelerator only after it has proved itself here: a short fixed prompt on the backend and on a CPU
reference of the same bundle, logits and greedy tokens compared, the verdict kept in the user cache.

A backend on the CPU is a reference and needs no check.  Any other (Core ML on the Neural Engine or GPU, QNN on a
Hexagon NPU, llama.cpp on Metal or CUDA, onnxruntime on CUDA) is checked once per (bundle, backend, device,
library versions): the verdict lives in $EDGEPHI_HOME/verified.json, so a changed bundle or an upgraded library
asks again.  The reference is the same format on the CPU where this machine has one (the same file, so only the
device's arithmetic differs: SAME_FILE tolerance), else the bundle's ONNX or GGUF model on the CPU (CROSS_FORMAT:
two quantizations of one model differ more).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .paths import cache_home

log = logging.getLogger(__name__)

CACHE_FILE = "verified.json"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
PROMPT_TOKENS, STEPS = 24, 8
# (largest |logit difference| / largest |logit|, top-2 gap below which a greedy token may differ, same fraction)
SAME_FILE = {"onnx": (0.02, 0.01), "gguf": (0.05, 0.02), "coreml": (0.05, 0.02), "onnx-npu": (0.02, 0.01)}
CROSS_FORMAT = (0.25, 0.05)
LIBRARIES = ("edgephi", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "coremltools", "onnxruntime-qnn")
# the CPU backend that runs each format (the reference for that format's accelerated backends)
CPU_REFERENCE = {"onnx": "onnx", "gguf": "llamacpp", "coreml": "coreml", "onnx-npu": "qnn"}


@dataclass
class Verdict:
    ok: bool
    backend: str
    device: str
    reference: str  # "backend on cpu"
    error: float  # largest |logit difference| / largest |logit| over the steps
    tokens: str  # "8/8 greedy tokens agree" (near ties excepted)
    detail: str  # why it failed, or ""
    when: str = ""

    def line(self) -> str:
        word = "verified" if self.ok else f"failed ({self.detail})"
        return (f"{self.backend} on {self.device}: {word}; against {self.reference}: logits within "
                f"{self.error:.2%}, {self.tokens}")


def library_versions() -> dict[str, str]:
    out = {"machine": f"{platform.system()} {platform.machine()} {platform.mac_ver()[0]}".strip()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cache_key(bundle: Path, backend: str, device: str) -> str:
    h = hashlib.sha256((Path(bundle) / "manifest.json").read_bytes())  # names every file's size and hash
    h.update(json.dumps([backend, device, library_versions()], sort_keys=True).encode())
    return h.hexdigest()[:32]


def _read_cache() -> dict:
    try:
        data = json.loads((cache_home() / CACHE_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, verdict: Verdict) -> None:
    """Keep the verdict; a cache that cannot be written only means checking again next time."""
    data = _read_cache()
    data[key] = asdict(verdict)
    path = cache_home() / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not keep the verdict in %s (%s)", path, e)


def cached(bundle: Path, backend: str, device: str) -> Verdict | None:
    entry = _read_cache().get(cache_key(bundle, backend, device))
    try:
        return Verdict(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None


def is_reference(device: str) -> bool:
    return device == "cpu"


def _reference(bundle: Path, manifest, fmt: str, probe) -> tuple[str, str, tuple[float, float]]:
    """(backend, format, tolerance) of the CPU reference for a backend running `fmt`."""
    from .select import availability

    usable = {(b, d) for b, d, why in availability(probe, tuple(manifest.formats)) if why is None}
    same = CPU_REFERENCE.get(fmt)
    # onnx-npu: its static graphs run on onnxruntime's CPU provider (a core dependency) wherever they exist
    if same is not None and ((same, "cpu") in usable or fmt == "onnx-npu"):
        return same, fmt, SAME_FILE[fmt]
    for backend, other in (("onnx", "onnx"), ("llamacpp", "gguf")):
        if other in manifest.formats and (backend, "cpu") in usable:
            return backend, other, CROSS_FORMAT
    raise ValueError(f"{bundle}: no CPU backend here can run this bundle to check {fmt} against")


def _run(session, ids: list[int], forced: list[int] | None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of each step; with `forced`, those tokens are fed instead (teacher forcing),
    so that a candidate's logits are compared with the reference's at the same positions."""
    logits = [session.forward(ids)]
    out = []
    for k in range(STEPS):
        out.append(int(np.argmax(logits[-1])))
        logits.append(session.forward([forced[k] if forced is not None else out[-1]]))
    return out, np.stack(logits[:-1])


def compare(got: tuple[list[int], np.ndarray], ref: tuple[list[int], np.ndarray], tolerance: tuple[float, float]
            ) -> tuple[bool, float, str, str]:
    """Step by step, the candidate fed the reference's tokens: (ok, relative error, "k/n greedy tokens agree",
    why not)."""
    (tokens, logits), (ref_tokens, ref_logits) = got, ref
    scale = float(np.abs(ref_logits).max()) or 1.0
    err = float(np.abs(logits - ref_logits).max()) / scale
    agree, problems = 0, []
    for k, (t, r, row) in enumerate(zip(tokens, ref_tokens, ref_logits)):
        top2 = np.sort(row)[-2:]
        if t == r or (top2[1] - top2[0]) < tolerance[1] * scale:  # a near tie may go either way
            agree += 1
        else:
            problems.append(f"step {k}: greedy token {t}, reference {r}")
    if err > tolerance[0]:
        problems.insert(0, f"logits differ by {err:.2%} of the largest (allowed {tolerance[0]:.0%})")
    return not problems, err, f"{agree}/{len(ref_tokens)} greedy tokens agree", "; ".join(problems)


def check(bundle: Path, manifest, backend, device: str, probe=None, reference: str | None = None,
          **options) -> Verdict:
    """Run the check now (and keep its verdict): `backend` (a Backend class) on `device` against the CPU."""
    from .select import load_backends
    from .tokenizer import Tokenizer

    bundle = Path(bundle)
    if reference is None:
        ref_name, ref_fmt, tol = _reference(bundle, manifest, backend.format, probe)
    else:
        ref_name = reference
        ref_fmt = load_backends()[reference].format
        tol = SAME_FILE[ref_fmt] if ref_fmt == backend.format else CROSS_FORMAT
    ids = Tokenizer.from_dir(bundle).encode(PROMPT, add_special_tokens=True)[:PROMPT_TOKENS]
    n_ctx = len(ids) + STEPS + 1
    runs = {}
    for role, cls, dev, opts in (("ref", load_backends()[ref_name], "cpu", {}), ("got", backend, device, options)):
        opts = dict(opts)
        if cls.name == "qnn" and dev == "cpu":
            opts["cpu"] = True  # the same static graphs on onnxruntime's CPU provider
        session = cls.open(bundle, manifest, dev, n_ctx=n_ctx, **opts)
        try:
            runs[role] = _run(session, ids, runs["ref"][0] if role == "got" else None)
        finally:
            session.close()
    ok, err, tokens, why = compare(runs["got"], runs["ref"], tol)
    verdict = Verdict(ok, backend.name, device, f"{ref_name} on cpu ({ref_fmt})", err, tokens, why,
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_cache(cache_key(bundle, backend.name, device), verdict)
    (log.info if ok else log.warning)("device check: %s", verdict.line())
    return verdict


def trust(bundle: Path, manifest, probe=None):
    """For select(): (backend, device) -> None when trusted (a CPU reference, or checked and passed: from the
    cache, else checked now), else why not."""
    from .select import load_backends

    def decide(name: str, device: str) -> str | None:
        if is_reference(device):
            return None
        verdict = cached(bundle, name, device)
        if verdict is None:
            try:
                verdict = check(bundle, manifest, load_backends()[name], device, probe)
            except (ValueError, OSError, RuntimeError) as e:
                return f"could not be checked against the CPU ({e})"
        return None if verdict.ok else f"failed its device check ({verdict.detail}; `edgephi devices --verify`)"

    return decide


def verify_all(bundle: Path, probe=None) -> list[tuple[str, str, Verdict | str]]:
    """Check every backend this machine can run the bundle on (CPU references are listed, not checked)."""
    from .manifest import Manifest
    from .select import availability, load_backends

    manifest = Manifest.load(bundle)
    rows = []
    for name, device, why in availability(probe, tuple(manifest.formats)):
        if why is not None:
            continue
        if is_reference(device):
            rows.append((name, device, "reference (CPU)"))
            continue
        try:
            rows.append((name, device, check(Path(bundle), manifest, load_backends()[name], device, probe)))
        except (ValueError, OSError, RuntimeError) as e:
            rows.append((name, device, f"could not be checked: {e}"))
    return rows
