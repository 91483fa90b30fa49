"""One tiny bundle exported at 16 bits: the same greedy tokens through every format and backend available here.

Core ML cannot predict on Linux; its saved program is run by the numpy evaluator in tests/coreml_eval.py instead.
"""
from __future__ import annotations

import numpy as np
import pytest

import tiny
from edgephi.devices import probe
from edgephi.export.bundle import exportable_formats, export_bundle
from edgephi.select import availability

STEPS = 12


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out, manifest = export_bundle(str(tiny_checkpoint("phi-3-medium")), tmp_path_factory.mktemp("b") / "bundle",
                                  formats=exportable_formats(), bits=16)
    return out, manifest


def _greedy_via_edgephi(path, fmt, prompt):
    import edgephi

    model = edgephi.load(path, format=fmt)
    try:
        return [r.token for r in model.stream(prompt, max_tokens=STEPS, ignore_eos=True) if r.token is not None]
    finally:
        model.close()


def _greedy_via_coreml_program(path, prompt):
    from coreml_eval import Evaluator

    ev = Evaluator(path / "coreml" / "model.mlpackage")
    logits = ev.predict({"input_ids": np.array([prompt], np.int32), "position": np.array([0], np.int32)})["logits"]
    out, pos = [], len(prompt)
    for _ in range(STEPS):
        out.append(int(np.argmax(logits[0, -1])))
        logits = ev.predict({"input_ids": np.array([[out[-1]]], np.int32),
                             "position": np.array([pos], np.int32)})["logits"]
        pos += 1
    return out


def test_every_format_and_backend_gives_the_same_greedy_tokens(bundle, tiny_checkpoint, reference_model):
    path, manifest = bundle
    prompt = tiny.random_prompt(40, 32064, seed=5)
    expected, _ = tiny.reference_greedy(reference_model(tiny_checkpoint("phi-3-medium")), prompt, STEPS)
    results = {}
    usable = {(b, d) for b, d, why in availability(probe(), tuple(manifest.formats)) if why is None}
    for fmt in manifest.formats:
        if fmt == "coreml":
            results["coreml (MIL evaluator)"] = _greedy_via_coreml_program(path, prompt)
        elif any(b for b, d in usable if d == "cpu" and b in ("onnx", "llamacpp") and
                 {"onnx": "onnx", "llamacpp": "gguf"}[b] == fmt):
            results[fmt] = _greedy_via_edgephi(path, fmt, prompt)
    assert {"onnx", "gguf"} <= set(results), f"expected ONNX and GGUF backends here, got {sorted(results)}"
    for name, toks in results.items():
        assert toks == expected, f"{name}: {toks} != transformers {expected}"
