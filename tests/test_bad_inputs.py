"""Every bad checkpoint, config or bundle file is a clean error (issue 19): one case per defect of the corpus, each
asserting the exception type and that the message names the file and the field; a few through the CLI (exit 1,
one line `edgephi: error: ...`, no traceback).  tests/test_fuzz.py keeps it so on inputs nobody wrote down.

Bad checkpoints and bundles are cheap copies: a folder of symlinks to the tiny checkpoint's (or bundle's) files,
with real copies of only the files a case changes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from edgephi.formats.gguf import read_header as read_gguf
from edgephi.manifest import BundleError, Manifest
from edgephi.spec import PhiSpec
from edgephi.weights import Checkpoint, CheckpointError

VARIANT = "phi-3-mini-4k"  # bf16, 2 layers, vocab 32064; its tokenizer has 32011 tokens
SHARED_GGUF = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "ggml-vocab-phi-3.gguf"


def clone(src: Path, dst: Path, copy: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Path:
    """dst mirroring src: symlinks to its files, real copies of the relative paths in `copy` (to be edited)."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_dir() or rel in drop:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in copy:
            shutil.copyfile(f, dst / rel)
        else:
            (dst / rel).symlink_to(f)
    return dst


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.unlink()  # never write through a symlink into the shared original
    path.write_text(json.dumps(doc))


def cli(capsys, *args) -> tuple[int, str, str]:
    from edgephi.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("edgephi: error:"), err
    assert "Traceback" not in err and all(w in lines[0] for w in words), err


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint(VARIANT)


# ---- 1. the safetensors header -------------------------------------------------------------------------------------
def write_safetensors(path: Path, header: dict, data_bytes: int = 64) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, field", [
    ({"a": {**T, "data_offsets": ["0", "8"]}}, "data_offsets"),  # strings: a TypeError before
    ({"a": {**T, "data_offsets": [0.0, 8.0]}}, "data_offsets"),  # floats: accepted before
    ({"a": {**T, "shape": [2.7]}}, "shape"),  # truncated to 2 before
    ({"a": {**T, "shape": [-2, -1]}}, "shape"),  # a product of 2 before
    ({"a": T, "b": {**T, "data_offsets": [4, 12]}}, "overlap"),  # b read a's bytes before
    ({"a": {**T, "dtype": ["F32"]}}, "dtype"),  # unhashable before
    ({"a": {**T, "shape": "22"}}, "shape"),  # iterated as digits before
    ({"__metadata__": [1], "a": T}, "__metadata__"),
], ids=["str-offsets", "float-offsets", "float-dims", "negative-dims", "overlap", "dtype-list", "shape-str",
        "metadata-list"])
def test_bad_safetensors_headers(tmp_path, header, field):
    f = write_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=field) as e:
        Checkpoint(tmp_path)
    assert str(f) in str(e.value)


def test_gaps_and_an_offset_start_are_accepted(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": {**T, "data_offsets": [8, 16]},
                                                       "b": {**T, "data_offsets": [32, 40]}})
    assert set(Checkpoint(tmp_path).tensors) == {"a", "b"}


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("opening the FIFO blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(CheckpointError, match="not a regular file") as e:
            Checkpoint(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "model.safetensors" in str(e.value)


# ---- 2. the shard index --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_map, words", [
    (["model.safetensors"], "weight_map"),  # a list: a traceback before
    ({"a": 1}, "weight_map"),  # ids: a traceback before
    ({"a": "../../etc/hostname"}, "../../etc/hostname"),  # outside the checkpoint
    ({"a": "/etc/hostname"}, "/etc/hostname"),
], ids=["list", "ints", "dotdot", "absolute"])
def test_bad_shard_indexes(tmp_path, weight_map, words):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    assert str(index) in str(e.value) and words in str(e.value)


# ---- 3. config.json ------------------------------------------------------------------------------------------------
BASE = dict(model_type="phi3", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LONG = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {**LONG, "short_factor": [None] * 8}, "original_max_position_embeddings": 16}, "short_factor"),
    ({"rope_scaling": {**LONG, "long_factor": [1.0] * 7 + [None]}, "original_max_position_embeddings": 16},
     "long_factor"),
    ({"rope_scaling": LONG, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"rope_scaling": LONG, "original_max_position_embeddings": 1}, "original_max_position_embeddings"),
    ({"rope_scaling": {**LONG, "factor": "4"}, "original_max_position_embeddings": 16}, "factor"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # bool("false") is True
    ({"rope_scaling": "longrope"}, "rope_scaling"),  # silently dropped before
    ({"rope_scaling": [LONG]}, "rope_scaling"),
    ({"bos_token_id": "1"}, "bos_token_id"),
    ({"eos_token_id": [2, "3"]}, "eos_token_id"),
    ({"eos_token_id": [100]}, "eos_token_id"),  # past the vocabulary
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),  # ~100 s to a MemoryError before
    ({"max_position_embeddings": 10**12}, "max_position_embeddings"),  # 7 TiB of rotary tables before
    ({"vocab_size": 2**30}, "vocab_size"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"model_type": ["phi3"]}, "model_type"),
], ids=lambda v: None if isinstance(v, dict) else v)
def test_bad_configs_name_the_field(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=field) as e:
        PhiSpec.from_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 1.0


def test_rope_scaling_without_type_is_default_rope():
    assert PhiSpec.from_hf_config({**BASE, "rope_scaling": {"factor": 2.0}}).rope_scaling is None


@pytest.mark.parametrize("layers, words", [(1, ["num_hidden_layers=1", "layer 1", "2 layers are stored"]),
                                           (3, ["num_hidden_layers=3", "holds 2 layers", "model.layers.2."])],
                         ids=["extra-layer-in-checkpoint", "missing-layer"])
def test_layer_count_against_the_checkpoint(tmp_path, ckpt, layers, words):
    from edgephi.export.source import Source

    d = clone(ckpt, tmp_path / "c", copy=("config.json",))
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=layers))
    with pytest.raises(CheckpointError) as e:
        Source.open(d)
    assert all(w in str(e.value) for w in words), e.value


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, ckpt):
    from edgephi.export.source import Source

    d = clone(ckpt, tmp_path / "c", drop=("tokenizer.json",))  # the sentencepiece file and added_tokens.json
    (d / "added_tokens.json").write_text(json.dumps({"<|big|>": 40000}))
    with pytest.raises(ValueError, match="vocab_size is 32064") as e:
        Source.open(d)
    assert "40001 tokens" in str(e.value)


# ---- 4. non-finite weights -----------------------------------------------------------------------------------------
def poison(ckpt_dir: Path, dst: Path, name: str) -> Path:
    """A copy of the checkpoint whose tensor `name` starts with a bfloat16 NaN."""
    d = clone(ckpt_dir, dst, copy=("model.safetensors",))
    info = Checkpoint(d).info(name)
    assert info.dtype == "BF16"
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(info.offset + 2 * 5)
        f.write(struct.pack("<H", 0x7FC0))
    return d


def test_nan_weights_are_refused_by_every_read(tmp_path, ckpt):
    name = "model.layers.1.mlp.down_proj.weight"
    c = Checkpoint(poison(ckpt, tmp_path / "c", name))
    for read in (lambda: c.read(name), lambda: c.read(name, dtype=None), lambda: c.read_rows(name, 0, 1),
                 lambda: list(c.read_blocks(name, max_bytes=64))):
        with pytest.raises(CheckpointError, match="non-finite") as e:
            read()
        assert name in str(e.value) and "model.safetensors" in str(e.value)
    assert np.isfinite(c.read_rows(name, 1, 3)).all()  # rows without the NaN read fine


@pytest.mark.parametrize("dtype, value", [("F32", np.inf), ("F16", -np.inf), ("F32", np.nan)])
def test_inf_and_nan_in_float_tensors(tmp_path, dtype, value):
    from edgephi.weights import save_safetensors

    save_safetensors(tmp_path / "model.safetensors", {"w": (3, 4)},
                     lambda n: np.where(np.arange(12).reshape(3, 4) == 7, value, 1.0), dtype=dtype)
    with pytest.raises(CheckpointError, match="'w' holds 1 non-finite"):
        Checkpoint(tmp_path).read("w")


# ---- 5. tokenizer_config.json --------------------------------------------------------------------------------------
def test_a_list_added_tokens_decoder_is_named(tmp_path, ckpt):
    from edgephi.tokenizer import Tokenizer

    d = clone(ckpt, tmp_path / "c", copy=("tokenizer_config.json",), drop=("tokenizer.json",))
    edit_json(d / "tokenizer_config.json", lambda c: c.update(added_tokens_decoder=[{"content": "<x>"}]))
    with pytest.raises(ValueError, match="added_tokens_decoder is a list") as e:
        Tokenizer.from_dir(d)
    assert "tokenizer_config.json" in str(e.value)


# ---- 6. bundles ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory) -> Path:
    from edgephi.export.bundle import export_bundle

    out, _ = export_bundle(str(ckpt), tmp_path_factory.mktemp("bad") / "bundle", formats=("onnx", "gguf"), bits=16)
    return out


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize("change, words", [
    (_set("formats", []), "'formats'"),  # AttributeError traceback before
    (lambda m: m["formats"]["gguf"].__setitem__("files", 5), "'files'"),  # TypeError traceback before
    (lambda m: m["formats"]["gguf"].__setitem__("sizes", [1]), "'sizes'"),
    (_set("stop_ids", "abc"), "'stop_ids'"),
    (_set("context_length", float("inf")), "'context_length'"),  # OverflowError traceback before
    (lambda m: m["spec"].__setitem__("num_hidden_layers", 10**9), "num_hidden_layers"),
    (lambda m: m["formats"]["gguf"].__setitem__("entry", "../../etc/hostname"), "'entry'"),
    (lambda m: m["formats"].__setitem__("coreml", {**m["formats"]["gguf"], "format": "coreml",
                                                   "entry": "coreml/model.mlpackage",
                                                   "files": ["coreml/model.mlpackage"], "sizes": {}, "sha256": {}}),
     "coreml/model.mlpackage: listed in manifest.json but missing"),
], ids=["formats-list", "files-int", "sizes-list", "stop-ids-str", "context-inf", "spec-layers", "entry-outside",
        "missing-format"])
def test_corrupt_manifests(tmp_path, bundle, change, words):
    d = clone(bundle, tmp_path / "b", copy=("manifest.json",))
    edit_json(d / "manifest.json", change)
    with pytest.raises(BundleError) as e:
        Manifest.load(d)
    assert "manifest.json" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", ["onnx/model.onnx.data", "onnx/model.onnx", "gguf/model-f16.gguf"])
def test_a_truncated_file_is_caught_by_its_size(tmp_path, bundle, path):
    d = clone(bundle, tmp_path / "b", copy=(path,))
    size = (d / path).stat().st_size
    os.truncate(d / path, size // 2)
    with pytest.raises(BundleError) as e:
        Manifest.load(d)
    assert str(d / path) in str(e.value) and f"{size // 2} bytes" in str(e.value) and f"recorded {size}" in str(e.value)


def test_a_zeroed_file_is_caught_by_verify(tmp_path, bundle):
    d = clone(bundle, tmp_path / "b", copy=("onnx/model.onnx.data",))
    data = d / "onnx/model.onnx.data"
    data.write_bytes(bytes(data.stat().st_size))
    m = Manifest.load(d)  # same size: the cheap check passes
    with pytest.raises(BundleError, match="sha256") as e:
        m.verify(d)
    assert str(data) in str(e.value)
    assert Manifest.load(bundle).verify(bundle) == sum(len(f.files) for f in m.formats.values())


def test_a_truncated_onnx_graph_is_a_value_error(tmp_path, bundle):
    from edgephi.backends.onnx import make_session

    graph = tmp_path / "model.onnx"
    graph.write_bytes((bundle / "onnx" / "model.onnx").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot load this ONNX graph") as e:
        make_session(graph, "CPUExecutionProvider", cache=False)
    assert str(graph) in str(e.value)


@pytest.mark.parametrize("key, value", [("general.architecture", "phi2"), ("phi3.block_count", 40),
                                        ("phi3.embedding_length", 3072), ("phi3.context_length", 4096)])
def test_a_gguf_of_another_model_is_refused_before_llama_cpp(tmp_path, bundle, key, value):
    from edgephi.backends.llamacpp import LlamaCppBackend

    manifest = Manifest.load(bundle)
    d = clone(bundle, tmp_path / "b", drop=("gguf/model-f16.gguf",))
    md = dict(read_gguf(bundle / "gguf/model-f16.gguf")["metadata"])
    kvs = [(k, 8, v) if isinstance(v, str) else (k, 4, v) for k, v in md.items()
           if k.startswith(("general.architecture", "phi3.block_count", "phi3.embedding", "phi3.context"))]
    kvs = [(k, t, value if k == key else v) for k, t, v in kvs]
    (d / "gguf").mkdir(exist_ok=True)
    (d / "gguf/model-f16.gguf").write_bytes(gguf_file(kvs))
    with pytest.raises(ValueError) as e:
        LlamaCppBackend.open(d, manifest, "cpu")
    assert key in str(e.value) and repr(value) in str(e.value) and "model-f16.gguf" in str(e.value)


# ---- 7. the GGUF header reader ------------------------------------------------------------------------------------
def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def gguf_file(kvs, version: int = 3, tensors: int = 0) -> bytes:
    fmt = {4: "<I", 6: "<f"}
    body = b"".join(_s(k.encode()) + struct.pack("<I", t) + (_s(v.encode()) if t == 8 else struct.pack(fmt[t], v))
                    for k, t, v in kvs)
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(kvs)) + body


@pytest.mark.parametrize("data, words", [
    (b"GGML" + bytes(20), "not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62), "metadata pairs do not fit"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "tensors do not fit"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + bytes(16), "at most 65535"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"\xff\xfe") + struct.pack("<IB", 0, 1), "not UTF-8"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"k") + struct.pack("<IIQ", 9, 8, 2**50), "does not fit"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"k") + struct.pack("<I", 13) + bytes(8), "value type 13"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 9 + bytes(64),
     "nested"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + (_s(b"k") + struct.pack("<IB", 0, 1)) * 2, "appears twice"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"general.alignment") + struct.pack("<II", 4, 3), "alignment"),
], ids=["magic", "version", "kv-count", "tensor-count", "key-length", "utf8", "array-length", "value-type",
        "nesting", "duplicate", "alignment"])
def test_bad_gguf_headers(tmp_path, data, words):
    f = tmp_path / "x.gguf"
    f.write_bytes(data)
    with pytest.raises(ValueError, match=words) as e:
        read_gguf(f)
    assert str(f) in str(e.value)


def test_gguf_reader_on_a_real_file_and_its_truncations(tmp_path):
    if not SHARED_GGUF.is_file():
        pytest.skip(f"{SHARED_GGUF} not here")
    h = read_gguf(SHARED_GGUF)
    md = h["metadata"]
    assert h["version"] == 3 and md["general.architecture"] == "phi3" and len(md["tokenizer.ggml.tokens"]) == 32064
    data = SHARED_GGUF.read_bytes()
    for cut in (10, 30, 1000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf"):
            read_gguf(tmp_path / "cut.gguf")
    os.mkfifo(tmp_path / "fifo.gguf")
    with pytest.raises(ValueError, match="not a regular file"):
        read_gguf(tmp_path / "fifo.gguf")
    with pytest.raises(FileNotFoundError, match="none.gguf"):
        read_gguf(tmp_path / "none.gguf")


# ---- 9. through the CLI: exit 1, one line naming the field ---------------------------------------------------------
def test_cli_info_on_a_corrupt_manifest(tmp_path, bundle, capsys):
    d = clone(bundle, tmp_path / "b", copy=("manifest.json",))
    edit_json(d / "manifest.json", _set("formats", []))
    assert_one_line_error(*cli(capsys, "info", d)[::2], "manifest.json", "'formats'")


def test_cli_info_verify(tmp_path, bundle, capsys):
    rc, out, err = cli(capsys, "info", "--verify", bundle)
    n = sum(len(e.files) for e in Manifest.load(bundle).formats.values())
    assert rc == 0 and f"verified    {n} files" in out, err
    d = clone(bundle, tmp_path / "b", copy=("gguf/model-f16.gguf",))
    with open(d / "gguf/model-f16.gguf", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(bytes(100))
    assert cli(capsys, "info", d)[0] == 0  # sizes agree
    assert_one_line_error(*cli(capsys, "info", "--verify", d)[::2], "model-f16.gguf", "sha256")


@pytest.mark.parametrize("edit, words", [
    (lambda d: edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings="false")),
     ["config.json", "'tie_word_embeddings'", "'false'"]),
    (lambda d: edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1)),
     ["num_hidden_layers=1", "layer 1"]),
], ids=["tie-str", "layers"])
def test_cli_export_refuses_a_bad_config(tmp_path, ckpt, capsys, edit, words):
    d = clone(ckpt, tmp_path / "c", copy=("config.json",))
    edit(d)
    rc, _, err = cli(capsys, "export", d, "--format", "gguf", "--bits", "16", "-q", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_nan_weights(tmp_path, ckpt, capsys):
    name = "model.embed_tokens.weight"
    d = poison(ckpt, tmp_path / "c", name)
    rc, _, err = cli(capsys, "export", d, "--format", "gguf", "--bits", "16", "-q", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, name, "non-finite", "model.safetensors")
    assert not (tmp_path / "out").exists()
