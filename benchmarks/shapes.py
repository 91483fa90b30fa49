"""Random-weight checkpoints of a release's EXACT shape, for benchmarks (no torch, no download).

make_shape_checkpoint(config_json, out_dir) writes what the release ships: config.json, sharded safetensors (two
shards, like Phi-3-mini's model-0000{1,2}-of-00002.safetensors) with model.safetensors.index.json, and a tokenizer.
Each tensor is written in blocks with a hand-written safetensors header, so memory stays at one block whatever the
model size.  Values: a pool of 2^22 normal(0, 0.02) numbers rounded to the stored dtype, each block a random slice of
it (generating 3.8 billion fresh normals would take minutes and measure nothing); norm weights are 1.

Cached: ~/.cache/edgephi/shapes/<config name>-<dtype>-s<seed>/ is reused when its index is complete.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEPHI_SHAPES_CACHE", Path.home() / ".cache" / "edgephi" / "shapes"))
POOL = 1 << 22
BLOCK = 1 << 24  # elements per write
DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}
log = logging.getLogger(__name__)


def _pool(dtype: str, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(POOL, dtype=np.float32) * np.float32(0.02)
    if dtype == "bf16":
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
    return x.astype("<f2" if dtype == "f16" else "<f4")


def _ones(dtype: str, n: int) -> np.ndarray:
    if dtype == "bf16":
        return np.full(n, 0x3F80, dtype="<u2")
    return np.ones(n, dtype="<f2" if dtype == "f16" else "<f4")


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, pool, rng) -> None:
    st_dtype, size = DTYPES[dtype]
    header, offset = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            left = math.prod(shape)
            while left:
                n = min(left, BLOCK, POOL)
                if len(shape) == 1 and "norm" in name:
                    _ones(dtype, n).tofile(f)
                else:
                    start = int(rng.integers(0, POOL - n + 1))
                    pool[start:start + n].tofile(f)
                left -= n


def make_shape_checkpoint(config_json_path, out_dir=None, dtype: str = "bf16", seed: int = 0,
                          n_shards: int = 2) -> Path:
    """Write (or reuse) a random checkpoint shaped like config_json_path; returns its directory."""
    sys.path.insert(0, str(REPO))
    from edgephi.spec import PhiSpec

    config_json_path = Path(config_json_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir) if out_dir else CACHE / f"{config_json_path.stem}-{dtype}-s{seed}"
    if (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file():
        return out
    spec = PhiSpec.from_hf_config(config_json_path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = list(spec.tensor_shapes().items())
    # split at half the bytes, keeping file order
    total = sum(math.prod(s) for _, s in shapes) * DTYPES[dtype][1]
    shards: list[list] = [[] for _ in range(n_shards)]
    acc = 0
    for name, shape in shapes:
        k = min(n_shards - 1, acc * n_shards // total)
        shards[k].append((name, shape))
        acc += math.prod(shape) * DTYPES[dtype][1]
    pool, rng = _pool(dtype, seed), np.random.default_rng(seed + 1)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        log.info("writing %s (%d tensors)", fname, len(tensors))
        _write_shard(tmp / fname, tensors, dtype, pool, rng)
        weight_map.update({name: fname for name, _ in tensors})
    cfg = json.loads(config_json_path.read_text())
    cfg["torch_dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_tokenizer(tmp, spec)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _write_tokenizer(out: Path, spec) -> None:
    """The test suite's tokenizer builders (from llama.cpp's vocab files in tests/data)."""
    sys.path.insert(0, str(REPO / "tests"))
    import vocab_build

    phi3 = spec.model_type == "phi3"
    if phi3 and spec.vocab_size == 32064:
        vocab_build.write_phi3_tokenizer(out)
    else:
        vocab_build.write_gpt2_tokenizer(out, codegen_whitespace=not phi3)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(make_shape_checkpoint(sys.argv[1], *(sys.argv[2:3] or [None])))


# Runs one command and reports its wall time and the peak RSS of it and its children.  A fresh wrapper process per
# measurement reads resource.getrusage(RUSAGE_CHILDREN), so one measurement never inherits another's peak.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:], cwd=sys.argv[1] or None)
wall = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure_child(cmd: list[str], cwd: str | None = None) -> dict:
    """{"wall_s", "peak_rss_gb"} of cmd run in a child process; a failing command raises with its stderr."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, cwd or "", *cmd], capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed (rc {res['rc']}): {out.stderr[-3000:]}")
    return {"wall_s": round(res["wall_s"], 2), "peak_rss_gb": round(res["peak_rss_kb"] / 1e6, 3)}
