"""Benchmark inputs: random-weight checkpoints of real Phi shapes, their edgephi bundles, and the peers' own
conversions of the same checkpoint (llama.cpp's convert_hf_to_gguf.py, onnxruntime-genai's model builder).

Everything is cached under $EDGEPHI_HOME/shapes/<shape>/ (default ~/.cache/edgephi/shapes/<shape>/) and written
to a temporary name first, so an interrupted run never leaves a directory that looks complete:

    checkpoint/   Hugging Face layout: config.json, generation_config.json, sharded safetensors + index, tokenizer
    bundle/       edgephi export (the formats a backend here runs)
    peer-gguf/    llama.cpp's own conversion: convert_hf_to_gguf.py (bf16) then llama.cpp's quantizer (Q4_K_M)
    peer-genai/   onnxruntime-genai's builder output (int4, cpu)
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

import edgephi

log = logging.getLogger(__name__)

DATA = Path(edgephi.__file__).resolve().parent / "data" / "shapes"  # shipped with edgephi (package data)
PHI3_TOKENIZER = DATA / "phi3-tokenizer"
# shape -> (config file in edgephi/data/shapes, tokenizer dir or None when none ships with edgephi)
SHAPES: dict[str, tuple[str, Path | None]] = {
    "phi-3-mini": ("Phi-3-mini-4k-instruct.json", PHI3_TOKENIZER),
    "phi-3-medium": ("Phi-3-medium-4k-instruct.json", PHI3_TOKENIZER),  # same 32064-entry vocabulary
    "phi-2": ("phi-2.json", None),  # GPT-2/CodeGen BPE: pass --tokenizer DIR
    "phi-4-mini": ("Phi-4-mini-instruct.json", None),  # 200k-entry BPE: pass --tokenizer DIR
}
PHI3_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size ("5GB")
LLAMA_CPP_PY_VERSION = "0.3.36"


def shapes_home() -> Path:
    base = os.environ.get("EDGEPHI_HOME")
    return (Path(base) if base else Path.home() / ".cache" / "edgephi") / "shapes"


def repo_root() -> Path | None:
    """The source checkout edgephi runs from (benchmarks/ lives there), if any."""
    for p in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (p / "benchmarks").is_dir() and (p / "edgephi").is_dir():
            return p
    return None


# ---- the checkpoint ------------------------------------------------------------------------------------------------
def _shared_maker():
    """benchmarks/shapes.py's make_shape_checkpoint when it runs from a source checkout (its tokenizer writer uses
    the checkout's tests/vocab_build.py), else None."""
    if not (Path(__file__).resolve().parent.parent / "tests" / "vocab_build.py").is_file():
        return None
    from edgephi.benchmarks import shapes

    return shapes.make_shape_checkpoint


def write_random_checkpoint(config_path: Path, out_dir: Path, dtype: str = "bf16", seed: int = 0) -> Path:
    """Random weights of the config's shape in the Hugging Face layout (sharded safetensors + index), one tensor
    in memory at a time."""
    from edgephi.spec import PhiSpec
    from edgephi.weights import save_safetensors

    cfg = json.loads(Path(config_path).read_text())
    spec = PhiSpec.from_hf_config(cfg)
    st_dtype = {"bf16": "BF16", "fp16": "F16", "f16": "F16", "fp32": "F32", "f32": "F32"}[dtype]
    itemsize = 4 if st_dtype == "F32" else 2
    shapes = spec.tensor_shapes()
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    rng = np.random.default_rng(seed)

    def make(name: str) -> np.ndarray:
        shape = shapes[name]
        if len(shape) == 1:  # norm weights near 1, biases near 0
            base = 0.0 if name.endswith("bias") else 1.0
            return base + 0.05 * rng.standard_normal(shape, dtype=np.float32)
        return 0.02 * rng.standard_normal(shape, dtype=np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(out_dir / fname, shard, make, dtype=st_dtype)
        weight_map.update({k: fname for k in shard})
        total += sum(math.prod(s) * itemsize for s in shard.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[st_dtype]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def shape_checkpoint(shape: str, tokenizer: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The cached random-weight checkpoint of `shape` (written on first use)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    config_name, tok_dir = SHAPES[shape]
    tok_dir = Path(tokenizer) if tokenizer else tok_dir
    maker = _shared_maker()  # benchmarks/shapes.py also writes a tokenizer of the right kind (from tests/data)
    if tok_dir is None and maker is None:
        raise NotImplementedError(f"--shape {shape}: edgephi ships no tokenizer for its vocabulary; pass "
                                  f"--tokenizer DIR (a directory with its tokenizer.json)")
    if tok_dir is not None and not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json or tokenizer.model")
    out = shapes_home() / shape / "checkpoint"
    if (out / "config.json").is_file():
        return out
    staging = out.with_name(f".checkpoint.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if maker is not None:
            log.warning("writing a random %s checkpoint with benchmarks/shapes.py to %s", shape, out)
            made = Path(maker(DATA / config_name, staging, dtype="bf16", seed=seed))
        else:
            log.warning("writing a random %s checkpoint to %s", shape, out)
            made = write_random_checkpoint(DATA / config_name, staging, dtype="bf16", seed=seed)
        for f in tok_dir.iterdir() if tok_dir is not None else ():
            if f.is_file() and not (made / f.name).exists():
                shutil.copy2(f, made / f.name)
        if tok_dir == PHI3_TOKENIZER and not (made / "generation_config.json").exists():
            (made / "generation_config.json").write_text(json.dumps(PHI3_GENERATION_CONFIG, indent=2))
        (made / "edgephi-shape.json").write_text(json.dumps(
            {"shape": shape, "config": config_name, "seed": seed, "dtype": "bf16",
             "seconds": round(time.perf_counter() - t0, 1)}))
        if made != staging:
            shutil.move(str(made), staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def shape_bundle(shape: str, formats: tuple[str, ...], tokenizer=None, rebuild: bool = False) -> Path:
    """The cached edgephi bundle of the shape's checkpoint, holding at least `formats`."""
    from edgephi.export.bundle import export_bundle
    from edgephi.manifest import Manifest

    ckpt = shape_checkpoint(shape, tokenizer)
    out = shapes_home() / shape / "bundle"
    stamp = exporter_stamp()
    if (out / "manifest.json").is_file() and not rebuild:
        have = tuple(Manifest.load(out).formats)
        old = json.loads((out / BUNDLE_STAMP).read_text()) if (out / BUNDLE_STAMP).is_file() else {}
        stale = [f for f in have if old.get(f) != stamp.get(f)]
        if set(formats) <= set(have) and not stale:
            return out
        if stale:
            log.warning("the %s exporter changed since %s was written: exporting again", ", ".join(stale), out)
        formats = tuple(dict.fromkeys(have + tuple(formats)))
    log.warning("exporting %s (%s) to %s", shape, ", ".join(formats), out)
    export_bundle(str(ckpt), out, formats=formats, bits=4, force=True)
    (out / BUNDLE_STAMP).write_text(json.dumps({f: stamp.get(f) for f in formats}, indent=2))
    return out


BUNDLE_STAMP = "bench-exporters.json"  # beside manifest.json; not listed in it


def exporter_stamp() -> dict[str, str]:
    """format -> sha1 of the exporter's source files (and the bundle writer's): a cached bundle made by other
    exporter code is exported again."""
    import hashlib

    from edgephi import export

    root = Path(export.__file__).resolve().parent
    runtime = Path(edgephi.__file__).resolve().parent  # the format layouts and architectures the exporters write
    common = [f for name in ("bundle", "registry", "source", "checkpoints") for f in sorted(root.glob(f"{name}.py"))]
    common += sorted((runtime / "arch").glob("*.py"))
    out = {}
    for fmt in ("onnx", "gguf", "coreml"):
        h = hashlib.sha1()
        own = [root / f"{fmt}*.py", root / f"lower_{fmt}*.py", runtime / "formats" / f"{fmt}*.py"]
        for f in common + [f for pattern in own for f in sorted(pattern.parent.glob(pattern.name))]:
            h.update(f"{f.parent.name}/{f.name}".encode() + f.read_bytes())
        out[fmt] = h.hexdigest()[:16]
    return out


# ---- the peers' own converters ---------------------------------------------------------------------------------
def _measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run cmd; wall seconds and peak RSS of its process tree (polled), rc and the tail of its output."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    out_lines: list[str] = []
    import threading

    def reader():
        for line in proc.stdout:
            out_lines.append(line)
            del out_lines[:-40]

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    th.join(timeout=5)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "tail": "".join(out_lines[-15:])}


def llama_cpp_source() -> Path:
    """llama.cpp's sources from the llama-cpp-python sdist (downloaded once by pip into the cache; never
    committed)."""
    peers = shapes_home().parent / "peers"
    src = peers / f"llama_cpp_python-{LLAMA_CPP_PY_VERSION}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    peers.mkdir(parents=True, exist_ok=True)
    sdist = peers / f"llama_cpp_python-{LLAMA_CPP_PY_VERSION}.tar.gz"
    if not sdist.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PY_VERSION}", "-d", str(peers)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not sdist.is_file():
            raise FileNotFoundError(f"could not download the llama-cpp-python {LLAMA_CPP_PY_VERSION} sdist: "
                                    f"{(r.stderr or r.stdout).strip()[-300:]}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PY_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and
                   (m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "gguf-py/")
                    or m.name.startswith(prefix + "conversion/"))]
        tf.extractall(peers, members=members, filter="data")
    return src


def peer_gguf(ckpt: Path, out_dir: Path, quant: str = "q4_k_m") -> dict:
    """llama.cpp's own conversion: convert_hf_to_gguf.py to bf16, then llama.cpp's quantizer."""
    gguf_path = out_dir / f"model-{quant}.gguf"
    info_path = out_dir / "peer.json"
    if gguf_path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    src = llama_cpp_source()
    out_dir.mkdir(parents=True, exist_ok=True)
    bf16 = out_dir / "model-bf16.gguf"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    conv = _measured([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(bf16),
                      "--outtype", "bf16"], env=env)
    if conv["rc"] != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed (rc {conv['rc']}): {conv['tail'][-500:]}")
    quant_cmd = [sys.executable, "-c", _QUANTIZE, str(bf16), str(gguf_path) + ".tmp", quant]
    qz = _measured(quant_cmd)
    bf16.unlink(missing_ok=True)
    if qz["rc"] != 0:
        raise RuntimeError(f"llama.cpp quantize failed (rc {qz['rc']}): {qz['tail'][-500:]}")
    os.replace(str(gguf_path) + ".tmp", gguf_path)
    info = {"path": str(gguf_path), "convert_s": conv["seconds"], "convert_peak_rss_mb": conv["peak_rss_mb"],
            "quantize_s": qz["seconds"], "quantize_peak_rss_mb": qz["peak_rss_mb"],
            "export_s": round(conv["seconds"] + qz["seconds"], 2),
            "export_peak_rss_mb": max(conv["peak_rss_mb"], qz["peak_rss_mb"]),
            "tool": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {LLAMA_CPP_PY_VERSION} sdist) + "
                    f"llama_model_quantize {quant}"}
    info_path.write_text(json.dumps(info, indent=2))
    return info


_QUANTIZE = """
import sys, llama_cpp
ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[sys.argv[3]]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def builder_unavailable() -> str | None:
    for mod in ("onnxruntime_genai.models.builder", "onnx_ir", "torch", "transformers"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
        except ModuleNotFoundError as e:
            return f"{e.name} is not installed"
    return None


def peer_genai(ckpt: Path, out_dir: Path, need_gb: float) -> dict:
    """onnxruntime-genai's model builder (int4, cpu), guarded by available memory."""
    import psutil

    info_path = out_dir / "peer.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    why = builder_unavailable()
    if why:
        raise RuntimeError(f"onnxruntime-genai's model builder cannot run here: {why}")
    avail = psutil.virtual_memory().available / 2**30
    if avail < need_gb:
        raise MemoryError(f"onnxruntime-genai's builder needs about {need_gb:.0f} GiB available here (23 GB peak RSS "
                          f"measured for Phi-3-mini); {avail:.0f} GiB is available")
    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cache = tmp / "cache"
    r = _measured([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(ckpt), "-i", str(ckpt),
                   "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(cache)])
    shutil.rmtree(cache, ignore_errors=True)
    if r["rc"] != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"onnxruntime-genai builder failed (rc {r['rc']}): {r['tail'][-500:]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    info = {"path": str(out_dir), "export_s": r["seconds"], "export_peak_rss_mb": r["peak_rss_mb"],
            "tool": "python -m onnxruntime_genai.models.builder -p int4 -e cpu"}
    info_path.write_text(json.dumps(info, indent=2))
    return info
