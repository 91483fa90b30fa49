"""The web format (edgephi/formats/onnx_web.py, export/onnx_web.py): pieces, web_config.json, the memory budget.
The browser side is tested in Chromium by android_demo/web (npm test, run by `make -C android_demo test`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgephi.export.bundle import export_bundle
from edgephi.export.onnx_web import check_fits
from edgephi.formats import onnx_web as fmt
from edgephi.manifest import Manifest
from edgephi.spec import PhiSpec

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.fixture(scope="module")
def web_bundle(tmp_path_factory):
    from edgephi.default_model import DATA

    out = tmp_path_factory.mktemp("web") / "bundle"
    export_bundle(str(DATA), out, formats=("web",), bits=4, options={"web": {"piece_mb": 1}})
    return out


def test_pieces_are_listed_and_bounded(web_bundle):
    m = Manifest.load(web_bundle)
    cfg = fmt.WebConfig.load(web_bundle / "web")
    assert len(cfg.external_data) > 1
    for i, p in enumerate(cfg.external_data):
        assert p["path"] == fmt.PIECE % i and f"web/{p['path']}" in m.formats["web"].files
        assert p["bytes"] == (web_bundle / "web" / p["path"]).stat().st_size
    model = onnx.load(str(web_bundle / "web" / fmt.MODEL_FILE), load_external_data=False)
    spans: dict[str, int] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            end = int(ext["offset"]) + int(ext["length"])
            spans[ext["location"]] = max(spans.get(ext["location"], 0), end)
            # a piece passes 1 MiB only when a single tensor larger than that sits in it alone
            assert end <= 1 << 20 or int(ext["offset"]) == 0, t.name
    assert set(spans) == {p["path"] for p in cfg.external_data}


def test_embedding_is_float32_and_activations_exact(web_bundle):
    model = onnx.load(str(web_bundle / "web" / fmt.MODEL_FILE), load_external_data=False)
    table = next(t for t in model.graph.initializer if "embed_tokens" in t.name)
    assert table.data_type == onnx.TensorProto.FLOAT
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {0}
    assert json.loads((web_bundle / "web" / "web_config.json").read_text())["n_ctx"] == 2048


def test_python_backend_runs_the_folder(web_bundle):
    from edgephi.backends.onnx import OnnxSession

    sess = OnnxSession(web_bundle / "web", threads=1, cache_optimized=False)
    logits = sess.forward([1, 423, 1726])
    assert logits.shape == (4096,) and np.isfinite(logits).all()


@pytest.mark.parametrize("name, n_ctx", [("Phi-3-mini-4k-instruct", 768), ("phi-2", 1280), ("phi-1", 2048)])
def test_budget_picks_the_cache_that_fits(name, n_ctx):
    spec = PhiSpec.from_hf_config(json.loads((CONFIGS / f"{name}.json").read_text()))
    got, budget = check_fits(spec, 4, 32, True, None)
    assert got == n_ctx and budget.need(got) <= fmt.WASM_MEMORY_BYTES
    if got < min(spec.context_length, 4096):  # not the whole default cache: one step more would not fit
        assert budget.need(got + fmt.N_CTX_STEP) > fmt.WASM_MEMORY_BYTES


@pytest.mark.parametrize("name", ["Phi-4-mini-instruct", "Phi-3-medium-4k-instruct", "phi-4"])
def test_a_model_that_cannot_fit_is_refused_with_the_figures(name):
    spec = PhiSpec.from_hf_config(json.loads((CONFIGS / f"{name}.json").read_text()))
    with pytest.raises(ValueError, match=r"does not fit a browser tab: \d+\.\d\d GB of weights .* > 4\.29 GB"):
        check_fits(spec, 4, 32, True, None)


def test_bits_16_and_unknown_options_are_refused(tmp_path):
    from edgephi.default_model import DATA

    with pytest.raises(ValueError, match="--bits 16 is not available for web"):
        export_bundle(str(DATA), tmp_path / "b16", formats=("web",), bits=16)
    with pytest.raises(ValueError, match="unknown option"):
        export_bundle(str(DATA), tmp_path / "bx", formats=("web",), bits=4, options={"web": {"fp16": True}})
