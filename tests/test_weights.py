"""Streamed safetensors reading: exact values, sharded checkpoints, and clear errors for bad files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tiny
from edgephi.spec import PhiSpec
from edgephi.weights import Checkpoint, CheckpointError, iter_tensors


@pytest.mark.parametrize("variant", ["phi-3-mini-4k", "phi-2", "phi-3-mini-128k"])  # bf16, fp16, fp32
def test_tensors_equal_safetensors_own_reader(tiny_checkpoint, variant):
    from safetensors.torch import load_file

    d = tiny_checkpoint(variant)
    ref = load_file(str(d / "model.safetensors"))
    seen = 0
    for name, thunk in iter_tensors(d):
        arr = thunk()
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, ref[name].float().numpy())
        seen += 1
    assert seen == len(ref)


@pytest.mark.parametrize("variant", ["phi-3-mini-4k", "phi-2", "phi-3-mini-128k"])  # bf16, fp16, fp32
def test_row_blocks_equal_the_whole_tensor(tiny_checkpoint, variant):
    ckpt = Checkpoint(tiny_checkpoint(variant))
    name = "model.embed_tokens.weight"
    whole = ckpt.read(name)
    rows = whole.shape[0]
    cuts = [0, 1, 1000, rows - 7, rows]
    got = np.concatenate([ckpt.read_rows(name, a, b) for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_array_equal(got, whole)
    assert ckpt.read_rows(name, 5, 5).shape == (0, whole.shape[1])
    with pytest.raises(IndexError, match=name):
        ckpt.read_rows(name, 10, rows + 1)


def test_sharded_checkpoint(tmp_path, tiny_checkpoint):
    model = tiny.load_reference(tiny_checkpoint("phi-3-medium"))
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(tmp_path)
    assert len({t.file for t in ckpt.tensors.values()}) > 1
    ckpt.check(PhiSpec.from_hf_config(tmp_path))
    # a missing shard is named
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Checkpoint(tmp_path)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_named(tmp_path, tiny_checkpoint):
    d = _copy(tiny_checkpoint("phi-3-mini-4k"), tmp_path / "ckpt")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Checkpoint(d)
    assert str(f) in str(e.value)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(d)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[100:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(d)


def test_shape_contradicting_config_is_named(tmp_path, tiny_checkpoint):
    d = _copy(tiny_checkpoint("phi-3-mini-4k"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 640
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_up_proj") as e:
        Checkpoint(d).check(PhiSpec.from_hf_config(d))
    assert "model.safetensors" in str(e.value) and "640" not in str(e.value) or "1280" in str(e.value)


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    from safetensors.numpy import save_file

    src = tiny_checkpoint("phi-3-medium")
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in src.glob("*.json"):
        shutil.copy(f, d)
    ckpt = Checkpoint(src)
    tensors = {n: ckpt.read(n) for n in ckpt.names() if n != "model.layers.1.mlp.down_proj.weight"}
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        Checkpoint(d).check(PhiSpec.from_hf_config(d))


def test_pickle_checkpoints_are_refused_never_unpickled(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    # a pickle that would run code if loaded
    (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/edgephi-pwned'\ntR.")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as e:
        Checkpoint(tmp_path)
    assert "safetensors" in str(e.value)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Checkpoint(tmp_path)


def test_import_edgephi_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, edgephi, edgephi.spec, edgephi.weights, edgephi.export.checkpoints; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
