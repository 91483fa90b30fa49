"""Core ML export: the saved .mlpackage is read back and evaluated with numpy (tests/coreml_eval.py) on Linux,
against transformers; MLModel.predict itself runs only on macOS 15+ (those tests skip elsewhere, with the reason).
"""
from __future__ import annotations

import json
import platform
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

import tiny  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coreml_eval import Evaluator  # noqa: E402
from edgephi.backends.coreml import CoreMLBackend  # noqa: E402
from edgephi.devices import Probe  # noqa: E402
from edgephi.export import coreml as cm  # noqa: E402
from edgephi.export.coreml_quant import fake_quantize  # noqa: E402
from edgephi.export.lower_numpy import NumpyModel  # noqa: E402
from edgephi.export.source import Source  # noqa: E402
from edgephi.spec import PhiSpec  # noqa: E402
from edgephi.weights import CheckpointError  # noqa: E402

STEPS = 8
TOL = 0.02  # logits within 2% of the largest |logit|
TIE = 0.005  # greedy tokens must agree wherever the reference's top-2 gap exceeds 0.5% of the largest |logit|
# prompt lengths: past the sliding window (48) for phi-3-mini-4k; LongRoPE variants cross
# original_max_position_embeddings (64) during the decode steps, so short- and long-factor keys mix in the cache
PROMPT = {"phi-2": 30, "phi-3-mini-4k": 60, "phi-3-mini-128k": 60, "phi-3-medium": 30, "phi-4-mini": 60}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    cache: dict = {}

    def get(variant: str, bits: int, drop_cache_write_layer: int | None = None) -> Path:
        key = (variant, bits, drop_cache_write_layer)
        if key not in cache:
            ckpt = tiny_checkpoint(variant)
            out = tmp_path_factory.mktemp(f"coreml-{variant}-{bits}") / "coreml"
            out.mkdir()
            src = Source.open(ckpt)
            if drop_cache_write_layer is None:
                res = cm.export(src, out, bits=bits, n_ctx=src.spec.max_position_embeddings)
                assert res.entry == "coreml/model.mlpackage"
            else:
                model, weights = cm.build(src, bits=bits, n_ctx=src.spec.max_position_embeddings,
                                          drop_cache_write_layer=drop_cache_write_layer)
                cm.save_package(model, weights, out / cm.fmt.PACKAGE)
            cache[key] = out / cm.fmt.PACKAGE
        return cache[key]

    return get


def run(ev: Evaluator, prompt: list[int], feed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt in one call, then one call per fed token: (prompt logits (T, V), step logits (1 + len(feed), V))."""
    ev.reset_states()
    out = ev.predict({"input_ids": np.array([prompt], np.int32), "position": np.array([0], np.int32)})["logits"][0]
    steps, pos = [out[-1]], len(prompt)
    for tok in feed:
        o = ev.predict({"input_ids": np.array([[tok]], np.int32), "position": np.array([pos], np.int32)})["logits"]
        steps.append(o[0, -1])
        pos += 1
    return out, np.stack(steps)


def compare(ev: Evaluator, model, prompt: list[int]) -> tuple[float, list[int]]:
    """Teacher-forced against transformers' greedy decode: (largest relative error, steps whose argmax differs
    although the reference's top-2 gap is not a near tie)."""
    greedy = tiny.session_greedy if isinstance(model, NumpyModel) else tiny.reference_greedy
    tokens, ref = greedy(model, prompt, STEPS)  # ref (STEPS, V)
    _, got = run(ev, prompt, tokens[:-1])
    err = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref))
    wrong = []
    for i, (g, r) in enumerate(zip(got, ref)):
        top2 = np.sort(r)[-2:]
        if int(np.argmax(g)) != tokens[i] and (top2[1] - top2[0]) > TIE * np.abs(r).max():
            wrong.append(i)
    return err, wrong


def cache_error(ev: Evaluator, model, ids: list[int]) -> float:
    """Largest relative difference between the program's key/value states and transformers' cache for ids
    (full recompute: only for models without LongRoPE, whose incremental and full caches differ)."""
    import torch

    with torch.no_grad():
        past = model(torch.tensor([ids]), use_cache=True).past_key_values
    n, err = len(ids), 0.0
    for i, layer in enumerate(past.layers):
        for state, ref in (("key_cache", layer.keys), ("value_cache", layer.values)):
            ref = ref[0].float().numpy()  # (Hk, m, d): a sliding-window cache keeps only the last m <= n
            got = ev.states[state][i, :, n - ref.shape[1]:n, :].astype(np.float32)
            err = max(err, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return err


def dequantized_reference(ckpt: Path) -> NumpyModel:
    """The numpy lowering with every matrix the int4 program quantizes (embedding and head included) replaced by
    its dequantized value."""
    src = Source.open(ckpt)
    return NumpyModel(src.tensors, src.spec, lambda role, name, w: fake_quantize(w) if w.ndim == 2 else w)


# ---- the package's interface --------------------------------------------------------------------------------
def test_package_interface(exported, tiny_checkpoint):
    spec = PhiSpec.from_hf_config(tiny_checkpoint("phi-3-mini-4k"))
    path = exported("phi-3-mini-4k", 4)
    mspec = ct.utils.load_spec(str(path))
    assert mspec.specificationVersion == 9  # iOS 18 / macOS 15
    desc = mspec.description
    inputs = {i.name: i.type.multiArrayType for i in desc.input}
    assert set(inputs) == {"input_ids", "position"}
    ids = inputs["input_ids"]
    assert ids.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    ranges = [(r.lowerBound, r.upperBound) for r in ids.shapeRange.sizeRanges]
    assert ranges == [(1, 1), (1, spec.max_position_embeddings)]
    assert list(inputs["position"].shape) == [1]
    states = {s.name: s.type.stateType.arrayType for s in desc.state}
    shape = [spec.num_hidden_layers, spec.num_key_value_heads, spec.max_position_embeddings, spec.head_dim]
    for name in ("key_cache", "value_cache"):
        assert list(states[name].shape) == shape
        assert states[name].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert [o.name for o in desc.output] == ["logits"]
    meta = desc.metadata
    assert meta.author == "edgephi"
    assert meta.userDefined["edgephi.quant"] == "int4-b32-sym"
    assert int(meta.userDefined["edgephi.n_ctx"]) == spec.max_position_embeddings
    assert PhiSpec.from_dict(json.loads(meta.userDefined["edgephi.spec"])) == spec

    ev = Evaluator(path)
    quant = ev.ops("constexpr_blockwise_shift_scale")
    assert len(quant) == 1 + 4 * spec.num_hidden_layers + 1  # embedding, 4 per layer, lm_head
    for o in quant:
        data, scale = o.inputs["data"], o.inputs["scale"]
        assert types.builtin_to_string(data.dtype) == "int4" and data.shape[1] == 32 * scale.shape[1]
        assert types.builtin_to_string(scale.dtype) == "fp16"
    # the cache is read once per state and written once per layer (see lower_coreml.py)
    assert len(ev.ops("read_state")) == 2
    assert len(ev.ops("coreml_update_state")) == 2 * spec.num_hidden_layers


# ---- numerics against transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(PROMPT))
def test_fp16_program_matches_transformers(variant, exported, tiny_checkpoint, reference_model):
    ckpt = tiny_checkpoint(variant)
    model = reference_model(ckpt)
    prompt = tiny.random_prompt(PROMPT[variant], model.config.vocab_size, seed=1)
    ev = Evaluator(exported(variant, 16))
    err, wrong = compare(ev, model, prompt)
    assert err < TOL, f"{variant}: logits differ by {err:.4f} of the largest |logit|"
    assert not wrong, f"{variant}: greedy token differs at steps {wrong}"
    # every prompt position, not just the last
    full, _ = run(ev, prompt, [])
    ref = tiny.reference_logits(model, prompt)
    assert np.abs(full - ref).max() / np.abs(ref).max() < TOL


@pytest.mark.parametrize("variant", ["phi-2", "phi-4-mini"])
def test_int4_program_matches_dequantized_reference(variant, exported, tiny_checkpoint):
    ckpt = tiny_checkpoint(variant)
    model = dequantized_reference(ckpt)
    prompt = tiny.random_prompt(PROMPT[variant], model.spec.vocab_size, seed=2)
    err, wrong = compare(Evaluator(exported(variant, 4)), model, prompt)
    assert err < TOL and not wrong, f"{variant} int4: error {err:.4f}, token mismatches at {wrong}"


def test_lost_cache_write_is_caught(exported, tiny_checkpoint, reference_model):
    """The comparison above must fail when a layer's cache update is lost (coremltools 9.0's
    remove_redundant_ops bug did exactly that to programs that read the state in every layer)."""
    variant = "phi-3-mini-4k"
    model = reference_model(tiny_checkpoint(variant))
    prompt = tiny.random_prompt(PROMPT[variant], model.config.vocab_size, seed=1)
    # 1. a program built without layer 0's cache write
    err, wrong = compare(Evaluator(exported(variant, 16, drop_cache_write_layer=0)), model, prompt)
    assert err > TOL or wrong, f"dropping layer 0's cache write went unnoticed (error {err:.4f})"
    # 2. the good program with the last layer's writes removed while evaluating (the earlier layers' writes
    # carry only their own updates, threaded through: the last one holds every layer's)
    last = {("key_cache", -1), ("value_cache", -1)}
    err, wrong = compare(Evaluator(exported(variant, 16), drop_state_writes=last), model, prompt)
    assert err > TOL or wrong, f"removing the last layer's cache writes went unnoticed (error {err:.4f})"
    # 3. keys alone barely move a tiny random model's logits (its attention is nearly uniform), so the cache
    # itself is compared with transformers' too: a lost key write shows there
    tokens, _ = tiny.reference_greedy(model, prompt, STEPS)
    good = Evaluator(exported(variant, 16))
    run(good, prompt, tokens[:-1])
    assert cache_error(good, model, prompt + tokens[:-1]) < TOL
    bad = Evaluator(exported(variant, 16), drop_state_writes={("key_cache", -1)})
    run(bad, prompt, tokens[:-1])
    assert cache_error(bad, model, prompt + tokens[:-1]) > 0.5


def test_rewind_masks_stale_cache_entries(exported, tiny_checkpoint, reference_model):
    """After a rewind the cache holds stale keys past n_past; the mask (start position + length) hides them."""
    variant = "phi-3-medium"
    model = reference_model(tiny_checkpoint(variant))
    ev = Evaluator(exported(variant, 16))
    prompt = tiny.random_prompt(24, model.config.vocab_size, seed=3)
    run(ev, prompt + [500, 600, 700, 800], [])  # fills 28 slots
    new = [900, 1000]  # rewind to 24 and continue with other tokens: slots 26, 27 stay stale
    got = ev.predict({"input_ids": np.array([new], np.int32), "position": np.array([24], np.int32)})["logits"][0]
    ref = tiny.reference_logits(model, prompt + new)[-2:]
    assert np.abs(got - ref).max() / np.abs(ref).max() < TOL


# ---- streamed weights ------------------------------------------------------------------------------------------
def _files(package: Path) -> dict[str, object]:
    """Every file's bytes, except what differs between two saves of one program: Manifest.json's random
    identifiers, and the numbers coremltools' state lowering takes from a process-wide counter."""
    files = {str(f.relative_to(package)): f.read_bytes() for f in sorted(package.rglob("*")) if f.is_file()}
    manifest = json.loads(files.pop("Manifest.json"))
    files["Manifest.json"] = sorted(json.dumps(e, sort_keys=True) for e in manifest["itemInfoEntries"].values())
    from coremltools.proto import Model_pb2
    from google.protobuf import text_format

    path = "Data/com.apple.CoreML/model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(files[path])
    numbers: dict[str, str] = {}
    files[path] = re.sub(r"coreml_update_state_(\d+)",
                         lambda m: "coreml_update_state_#" + numbers.setdefault(m[1], str(len(numbers))),
                         text_format.MessageToString(spec))
    return files


@pytest.mark.parametrize("variant,bits", [("phi-3-mini-4k", 4), ("phi-2", 4), ("phi-4-mini", 4), ("phi-2", 16)])
def test_streamed_weights_give_the_package_coremltools_writes(variant, bits, tiny_checkpoint, tmp_path):
    """The exporter saves placeholders and fills the blob afterwards (coreml_blob.py); the result must be, byte
    for byte, the package coremltools saves from a program holding the real weights."""
    src = Source.open(tiny_checkpoint(variant))
    packages = {}
    for deferred in (True, False):
        model, weights = cm.build(src, bits=bits, n_ctx=src.spec.max_position_embeddings, deferred=deferred)
        assert bool(weights.pending) == deferred
        packages[deferred] = tmp_path / f"deferred-{deferred}.mlpackage"
        cm.save_package(model, weights, packages[deferred])
    streamed, oracle = _files(packages[True]), _files(packages[False])
    assert streamed.keys() == oracle.keys()
    different = [name for name in oracle if streamed[name] != oracle[name]]
    assert not different, f"{variant} bits={bits}: {different} differ"


def test_blob_fill_refuses_a_package_it_did_not_lay_out(tiny_checkpoint, tmp_path):
    """A record that is not the placeholder the program asked for (wrong type or size) is refused, naming it."""
    from edgephi.export import coreml_blob

    src = Source.open(tiny_checkpoint("phi-3-mini-4k"))
    model, weights = cm.build(src, bits=4, n_ctx=src.spec.max_position_embeddings)
    package = tmp_path / "model.mlpackage"
    model.save(str(package))
    name = "model_layers_0_self_attn_qkv_proj_weight/data"
    fname, offset = coreml_blob.blob_offsets(package)[name]
    blob = package / "Data" / "com.apple.CoreML" / "weights" / Path(fname).name
    with open(blob, "r+b") as f:  # call the int4 data fp16
        f.seek(offset + 4)
        f.write((1).to_bytes(4, "little"))
    with pytest.raises(coreml_blob.BlobError, match=name):
        coreml_blob.fill(package, weights)


# ---- errors -------------------------------------------------------------------------------------------------
def test_bad_inputs(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("phi-3-medium")
    source = Source.open(ckpt)
    out = tmp_path / "coreml"
    out.mkdir()
    with pytest.raises(ValueError, match="bits=8"):
        cm.export(source, out, bits=8)
    with pytest.raises(ValueError, match="n_ctx=100000"):
        cm.export(source, out, bits=4, n_ctx=100000)
    with pytest.raises(ValueError, match="unknown options"):
        cm.export(source, out, bits=4, colour="blue")
    # a checkpoint missing a tensor: the error names it
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    from edgephi.weights import Checkpoint, save_safetensors

    src = Checkpoint(ckpt)
    keep = {n: src.info(n).shape for n in src.names() if n != "model.layers.1.mlp.down_proj.weight"}
    for f in broken.glob("*.safetensors"):
        f.unlink()
    save_safetensors(broken / "model.safetensors", keep, lambda n: src.read(n))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        Source.open(broken)
    # an architecture edgephi does not know
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'llama'"):
        PhiSpec.from_hf_config(broken)


# ---- the backend --------------------------------------------------------------------------------------------
def test_backend_says_why_it_cannot_run():
    linux = Probe(system="Linux", modules=frozenset({"coremltools"}))
    assert CoreMLBackend.unavailable_reason(linux, "npu") == "Core ML runs only on macOS 15+; this is Linux"
    old = Probe(system="Darwin", machine="arm64", macos_version=(14, 6), modules=frozenset({"coremltools"}))
    assert "macOS 15+" in CoreMLBackend.unavailable_reason(old, "metal")
    bare = Probe(system="Darwin", machine="arm64", macos_version=(15, 1))
    assert "coremltools" in CoreMLBackend.unavailable_reason(bare, "cpu")
    mac = Probe(system="Darwin", machine="arm64", macos_version=(15, 1), modules=frozenset({"coremltools"}))
    assert all(CoreMLBackend.unavailable_reason(mac, d) is None for d in ("npu", "metal", "cpu"))
    assert "cuda" in CoreMLBackend.unavailable_reason(mac, "cuda")


MAC15 = platform.system() == "Darwin" and tuple(int(x) for x in (platform.mac_ver()[0] or "0").split(".")) >= (15,)


@pytest.mark.skipif(not MAC15, reason="Core ML predicts only on macOS (15+ for stateful models)")
@pytest.mark.parametrize("device", ["cpu", "metal"])
def test_mlmodel_predict_matches_transformers(device, exported, tiny_checkpoint, reference_model):
    variant = "phi-3-mini-4k"
    model = reference_model(tiny_checkpoint(variant))
    bundle = exported(variant, 16).parent.parent
    session = CoreMLBackend.open(bundle, {}, device)
    prompt = tiny.random_prompt(PROMPT[variant], model.config.vocab_size, seed=1)
    tokens, ref = tiny.reference_greedy(model, prompt, STEPS)
    got = [session.forward(prompt)] + [session.forward([t]) for t in tokens[:-1]]
    for g, r in zip(got, ref):
        assert np.abs(g - r).max() / np.abs(r).max() < TOL
    session.rewind(len(prompt))  # stale slots past n_past are masked
    assert np.allclose(session.forward([tokens[0]]), got[1], atol=TOL * np.abs(ref[1]).max())


def test_the_op_list_checked_without_coremltools_is_the_lowerings():
    """export/coreml.py refuses a model by LOWERED_OPS (no coremltools import): it must name exactly the ops
    the Core ML lowering implements."""
    from edgephi import arch
    from edgephi.export.lower_coreml import CoreMLLowering

    methods = {n for n in vars(CoreMLLowering) if not n.startswith("_") and callable(getattr(CoreMLLowering, n))}
    assert {op for op in cm.LOWERED_OPS if "(" not in op} == methods
    assert all(arch.implements(CoreMLLowering, op) for op in cm.LOWERED_OPS)  # "attention(block_sparse)" too
