"""ONNX int4 at Phi-3-mini's exact shape: edgephi's export (time, peak RSS) and runtime vs onnxruntime-genai.

    nice python benchmarks/onnx_bench.py [--work /tmp/edgephi-bench] [--threads 2] [--trials 3]

A random-weight checkpoint with Phi-3-mini-4k-instruct's config (bf16, 3.8 B parameters) is written once; the
int4 export runs in a child process so that its peak RSS is its own.  Both runtimes then run the same files
with the same thread count: prefill of 128 and 512 random prompt ids, and 128 greedy decode steps (EOS
ignored), one warm-up and the median of --trials.  Results: benchmarks/results/onnx_bench.{jsonl,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "data" / "configs" / "Phi-3-mini-4k-instruct.json"
RESULTS = ROOT / "benchmarks" / "results"
CHUNK = 1 << 24  # elements generated at a time


def make_shape_checkpoint(config_json: Path, out_dir: Path, seed: int = 0) -> Path:
    """A bf16 safetensors checkpoint with the config's exact tensor shapes and N(0, 0.02) weights, streamed."""
    try:
        from edgephi.benchmarks.shapes import make_shape_checkpoint as colleague  # the shared helper, when it exists

        return colleague(config_json, out_dir)
    except ImportError:
        pass
    from edgephi.spec import PhiSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    cfg = json.loads(Path(config_json).read_text())
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    spec = PhiSpec.from_hf_config(cfg)
    shapes = spec.tensor_shapes()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    rng = np.random.default_rng(seed)
    tmp = out_dir / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            left = math.prod(shape)
            norm = "norm" in name
            while left:
                n = min(left, CHUNK)
                x = np.ones(n, np.float32) if norm else rng.standard_normal(n, dtype=np.float32) * 0.02
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # bf16 = top half of fp32
                left -= n
    tmp.replace(out_dir / "model.safetensors")
    return out_dir


def export_child(ckpt: str, out: str) -> None:
    """Run in a child process: export, then report seconds and peak RSS as JSON on stdout."""
    from edgephi.export.onnx import export
    from edgephi.export.source import Source

    t = time.perf_counter()
    export(Source.open(ckpt), Path(out), bits=4)
    secs = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": secs, "peak_rss_bytes": rss}))


def median_of(fn, trials: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(trials))


def bench_edgephi(onnx_dir: Path, threads: int, trials: int, vocab: int) -> dict:
    from edgephi.backends.onnx import OnnxSession

    s = OnnxSession(onnx_dir, n_ctx=1024, threads=threads)
    rng = np.random.default_rng(0)
    out = {}
    for n in (128, 512):
        prompt = rng.integers(100, vocab - 100, n).tolist()

        def prefill():
            s.reset()
            t = time.perf_counter()
            s.forward(prompt)
            return n / (time.perf_counter() - t)

        out[f"prefill_{n}_tps"] = median_of(prefill, trials)
    prompt = rng.integers(100, vocab - 100, 16).tolist()

    def decode(steps=128):
        s.reset()
        tok = int(np.argmax(s.forward(prompt)))
        t = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(s.forward([tok])))
        return steps / (time.perf_counter() - t)

    out["decode_tps"] = median_of(decode, trials)
    s.close()
    return out


def bench_genai(onnx_dir: Path, threads: int, trials: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    cfg = og.Config(str(onnx_dir))
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    rng = np.random.default_rng(0)

    def generator():
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=1024, do_sample=False)
        return og.Generator(model, p)

    out = {}
    for n in (128, 512):
        prompt = rng.integers(100, vocab - 100, n).tolist()

        def prefill():
            g = generator()
            t = time.perf_counter()
            g.append_tokens(prompt)
            return n / (time.perf_counter() - t)

        out[f"prefill_{n}_tps"] = median_of(prefill, trials)
    prompt = rng.integers(100, vocab - 100, 16).tolist()

    def decode(steps=128):
        g = generator()
        g.append_tokens(prompt)
        t = time.perf_counter()
        for _ in range(steps):
            g.generate_next_token()
        return steps / (time.perf_counter() - t)

    out["decode_tps"] = median_of(decode, trials)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgephi-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true", help="reuse --work/onnx from an earlier run")
    args = ap.parse_args()
    ckpt = make_shape_checkpoint(CONFIG, args.work / "phi-3-mini-shape")
    onnx_dir = args.work / "onnx"
    record = {"model": "Phi-3-mini-4k shape, random bf16 weights", "format": "onnx int4-b32-sym",
              "threads": args.threads, "trials": args.trials, "machine": f"{platform.machine()} {platform.processor()}",
              "cpus": __import__("os").cpu_count(), "command": " ".join(sys.argv),
              "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()}
    if not args.skip_export:
        import shutil

        shutil.rmtree(onnx_dir, ignore_errors=True)
        onnx_dir.mkdir(parents=True)
        res = subprocess.run([sys.executable, __file__, "--export-child", str(ckpt), str(onnx_dir)],
                             capture_output=True, text=True, check=True)
        record["export"] = json.loads(res.stdout.strip().splitlines()[-1])
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    record["edgephi"] = bench_edgephi(onnx_dir, args.threads, args.trials, vocab)
    record["onnxruntime_genai"] = bench_genai(onnx_dir, args.threads, args.trials, vocab)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "onnx_bench.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(r: dict) -> None:
    e, g = r["edgephi"], r["onnxruntime_genai"]
    lines = [f"# ONNX int4, Phi-3-mini shape ({r['machine']}, {r['cpus']} CPUs, {r['threads']} threads, "
             f"commit {r['commit']})", "", f"Command: `{r['command']}` — medians of {r['trials']} after one warm-up.", ""]
    if "export" in r:
        lines += [f"edgephi int4 export: {r['export']['seconds']:.0f} s, peak RSS "
                  f"{r['export']['peak_rss_bytes'] / 2**30:.2f} GiB", ""]
    lines += ["| tokens/s | edgephi | onnxruntime-genai | ratio |", "|---|---|---|---|"]
    for k, label in (("prefill_128_tps", "prefill 128"), ("prefill_512_tps", "prefill 512"), ("decode_tps", "decode 128")):
        lines.append(f"| {label} | {e[k]:.1f} | {g[k]:.1f} | {e[k] / g[k]:.2f}× |")
    (RESULTS / "onnx_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--export-child":
        export_child(sys.argv[2], sys.argv[3])
    else:
        main()
