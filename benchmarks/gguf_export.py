"""GGUF export at Phi-3-mini's exact shape: edgephi vs llama.cpp's own tools, wall time and peak RSS.

    nice python benchmarks/gguf_export.py [--config tests/data/configs/Phi-3-mini-4k-instruct.json] [--runs 3]
        [--llama-src /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp] [--threads N]

Steps, each in its own child process (peak RSS = that child's ru_maxrss, read by a fresh wrapper process through
resource.getrusage(RUSAGE_CHILDREN), so one measurement never inherits another's peak):
  edgephi f16      edgephi.export.gguf.write_float_gguf (streamed 16-bit write)
  edgephi q4_k_m   edgephi.export.gguf.quantize (llama.cpp's llama_model_quantize on that file)
  llama.cpp f16    convert_hf_to_gguf.py --outtype f16 (from the llama-cpp-python source package; run from /tmp)
  llama.cpp q4_k_m llama_model_quantize on llama.cpp's own f16 file (what llama-quantize runs)
The random-weight checkpoint comes from benchmarks/shapes.py (cached under ~/.cache/edgephi/shapes/).
Results: benchmarks/results/gguf_export.jsonl (one line per step and run) and gguf_export.md (medians).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SRC = Path("/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp")
# figures measured before on this machine class (F16 convert, Q4_K_M quantize): seconds, GB
PEER_BEFORE = {"f16": (31.0, 0.93), "q4_k_m": (117.0, 0.71)}

EDGEPHI_F16 = r"""
import sys; sys.path.insert(0, {repo!r})
from pathlib import Path
from edgephi.export.gguf import write_float_gguf
from edgephi.export.source import Source
write_float_gguf(Source.open({ckpt!r}), Path({out!r}), float_type="f16")
"""
QUANTIZE = r"""
import sys; sys.path.insert(0, {repo!r})
from pathlib import Path
from edgephi.export.gguf import quantize
quantize(Path({src!r}), Path({out!r}), "q4_k_m", {threads})
"""


def steps(ckpt: Path, work: Path, src: Path, threads: int) -> dict[str, list[str]]:
    py = sys.executable
    ours_f16, peer_f16 = work / "edgephi-f16.gguf", work / "llamacpp-f16.gguf"
    return {
        "edgephi f16": [py, "-c", EDGEPHI_F16.format(repo=str(REPO), ckpt=str(ckpt), out=str(ours_f16))],
        "edgephi q4_k_m": [py, "-c", QUANTIZE.format(repo=str(REPO), src=str(ours_f16), out=str(work / "e-q4.gguf"),
                                                     threads=threads)],
        "llama.cpp f16": [py, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16",
                          "--outfile", str(peer_f16)],
        "llama.cpp q4_k_m": [py, "-c", QUANTIZE.format(repo=str(REPO), src=str(peer_f16),
                                                       out=str(work / "l-q4.gguf"), threads=threads)],
    }


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "logical_cpus": os.cpu_count(), "physical_cpus": psutil.cpu_count(logical=False),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "tests/data/configs/Phi-3-mini-4k-instruct.json")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        ap.error(f"{args.llama_src}: no convert_hf_to_gguf.py; get it with `pip download --no-deps --no-binary :all: "
                 "llama-cpp-python==0.3.36 -d /tmp/llsrc` and unpack it")
    from edgephi.benchmarks.shapes import make_shape_checkpoint, measure_child

    t = time.perf_counter()
    ckpt = make_shape_checkpoint(args.config)
    print(f"checkpoint {ckpt} ({time.perf_counter() - t:.0f} s)", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    command = "python benchmarks/gguf_export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"commit": commit, "command": command, "config": args.config.name, "machine": machine(),
            "threads": args.threads, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    try:
        for run in range(args.runs):
            for name, cmd in steps(ckpt, work, args.llama_src, args.threads).items():
                r = measure_child(cmd, cwd="/tmp")
                rows.setdefault(name, []).append(r)
                print(f"run {run + 1}/{args.runs} {name:18s} {r['wall_s']:8.1f} s  {r['peak_rss_gb']:.2f} GB", flush=True)
                with open(RESULTS / "gguf_export.jsonl", "a") as f:
                    f.write(json.dumps({**meta, "step": name, "run": run + 1, **r}) + "\n")
        sizes = {p.name: p.stat().st_size for p in work.glob("*.gguf")}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_markdown(rows, meta, sizes, args.runs)
    return 0


def write_markdown(rows: dict, meta: dict, sizes: dict, runs: int) -> None:
    med = {k: (statistics.median(r["wall_s"] for r in v), statistics.median(r["peak_rss_gb"] for r in v))
           for k, v in rows.items()}
    lines = [f"# GGUF export at {meta['config']} shape (random bf16 weights)", "",
             f"commit {meta['commit']}, {meta['date']}, `{meta['command']}`", "",
             f"machine: {json.dumps(meta['machine'])}, quantizer threads {meta['threads']}; "
             f"medians of {runs} run(s)", "",
             "| step | edgephi s | edgephi peak RSS GB | llama.cpp s | llama.cpp peak RSS GB | time ratio |",
             "|---|---|---|---|---|---|"]
    for step in ("f16", "q4_k_m"):
        (et, er), (lt, lr) = med[f"edgephi {step}"], med[f"llama.cpp {step}"]
        lines.append(f"| {step} | {et:.1f} | {er:.2f} | {lt:.1f} | {lr:.2f} | {et / lt:.2f} |")
    lines += ["", "Sizes: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(sizes.items())), "",
              "llama.cpp f16 = convert_hf_to_gguf.py --outtype f16 (llama-cpp-python 0.3.36's vendored llama.cpp); "
              "q4_k_m = llama_model_quantize (the code of llama-quantize) on each side's own f16 file.",
              f"Figures measured before for llama.cpp: {PEER_BEFORE}.", ""]
    (RESULTS / "gguf_export.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
