"""Quality of a bundle's quantized models: perplexity on held-out text and KL divergence to the 16-bit model.

The text is cut into windows that each start from an empty cache; every token but a window's first is scored.
Perplexity = exp(mean negative log-likelihood); KL(p16 || q) is averaged over the same positions, with p16 the
16-bit ONNX export of the bundle's source checkpoint (made on the fly in a temporary directory; the figures then
say how much the 4-bit rounding costs, not how good the model is).
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import edgephi

log = logging.getLogger(__name__)

HELDOUT = Path(edgephi.__file__).parent / "data" / "heldout"  # shipped with edgephi (package data)


@dataclass
class Score:
    label: str  # e.g. "onnx int4-b32-sym"
    ppl: float
    kl: float | None  # to the 16-bit reference, nats per token
    tokens: int
    bits_per_weight: float | None = None
    note: str = ""

    def line(self, ref_ppl: float | None = None) -> str:
        rel = f" ({100 * (self.ppl / ref_ppl - 1):+.1f}% vs 16-bit)" if ref_ppl else ""
        kl = f", KL {self.kl:.4f}" if self.kl is not None else ""
        bpw = f", {self.bits_per_weight:.2f} bits/weight" if self.bits_per_weight else ""
        return f"{self.label}: perplexity {self.ppl:.3f}{rel}{kl}{bpw} over {self.tokens} tokens"


def heldout_text() -> str:
    """Python source the default model never saw in training (see edgephi/data/heldout/README.md)."""
    files = sorted(HELDOUT.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"{HELDOUT}: no held-out text shipped")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids), size) if len(ids[i:i + size]) > 1]


def score_model(model, ids: Sequence[int], window: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(negative log-likelihood of each scored token, log-probabilities (T-1, V) per window as float32)."""
    nll, logps = [], []
    for w in windows(ids, window):
        lp = log_softmax(model.logits(w))[:-1]  # position t predicts token t+1
        nll.append(-lp[np.arange(len(w) - 1), w[1:]])
        logps.append(lp.astype(np.float32))
    return np.concatenate(nll), logps


def kl_divergence(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    total, n = 0.0, 0
    for p, q in zip(ref, got):
        p64 = p.astype(np.float64)
        total += float((np.exp(p64) * (p64 - q)).sum())
        n += p.shape[0]
    return total / max(n, 1)


def check_bundle(bundle: str | Path, text: str | None = None, max_tokens: int = 1024, window: int = 256,
                 threads: int | None = None, reference: bool = True) -> list[Score]:
    """Score every format of the bundle that runs here, and the 16-bit reference first when possible."""
    import edgephi
    from edgephi.manifest import Manifest
    from edgephi.select import availability

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    manifest.verify(bundle)  # every model file's sha256 as recorded at export: scores of a damaged file mean nothing
    text = heldout_text() if text is None else text
    window = min(window, manifest.context_length)
    opts = {"threads": threads} if threads else {}
    scores: list[Score] = []
    ref_logps = None
    tokenizer_ids = None
    if reference:
        ref = _reference_scores(manifest, text, max_tokens, window, opts)
        if isinstance(ref, str):
            log.warning("no 16-bit reference: %s", ref)
        else:
            score, ref_logps, tokenizer_ids = ref
            scores.append(score)
    runnable = {b for b, d, why in availability(formats=tuple(manifest.formats)) if why is None and d == "cpu"}
    for fmt, entry in manifest.formats.items():
        backend = {"onnx": "onnx", "gguf": "llamacpp", "coreml": "coreml"}.get(fmt)
        label = f"{fmt} {entry.quant}"
        if backend not in runnable:
            scores.append(Score(label, math.nan, None, 0, manifest.bits_per_weight(fmt),
                                note=f"not run: no {fmt} backend on this machine's CPU"))
            continue
        model = edgephi.load(bundle, format=fmt, device="cpu", n_ctx=window, **opts)
        try:
            ids = tokenizer_ids or model.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
            nll, logps = score_model(model, ids, window)
        finally:
            model.close()
        kl = kl_divergence(ref_logps, logps) if ref_logps is not None else None
        scores.append(Score(label, float(np.exp(nll.mean())), kl, len(nll), manifest.bits_per_weight(fmt)))
    return scores


def _reference_scores(manifest, text, max_tokens, window, opts):
    """The 16-bit ONNX export of the source checkpoint, scored; or why it cannot be made."""
    import edgephi
    from edgephi.export.bundle import export_bundle

    src = Path(manifest.source.get("path", ""))
    if not (src / "config.json").is_file():
        return f"the source checkpoint {src} is not on this machine"
    with tempfile.TemporaryDirectory(prefix="edgephi-ref-") as tmp:
        out, _ = export_bundle(str(src), Path(tmp) / "ref16", formats=("onnx",), bits=16)
        model = edgephi.load(out, format="onnx", device="cpu", n_ctx=window, **opts)
        try:
            ids = model.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
            nll, logps = score_model(model, ids, window)
        finally:
            model.close()
    return Score("reference onnx f16", float(np.exp(nll.mean())), 0.0, len(nll)), logps, ids
