"""Core ML export at Phi-3-mini's exact shape (random weights): package size, bits per weight, wall time, peak RSS.

    nice python benchmarks/coreml_export.py [--config tests/data/configs/Phi-3-mini-4k-instruct.json]
        [--checkpoint DIR] [--bits 4] [--context-length 4096] [--runs 1]

The checkpoint comes from benchmarks/shapes.py's make_shape_checkpoint (cached under ~/.cache/edgephi/shapes/)
unless --checkpoint names one.  Each export runs in its own child process; its peak RSS is the child's ru_maxrss,
read by a fresh wrapper process (resource.getrusage(RUSAGE_CHILDREN)), so runs never inherit each other's peak.
Bits per weight = package bytes * 8 / parameters (the KV cache is a state, not stored in the package).
Results: benchmarks/results/coreml_export.jsonl (one line per run) and coreml_export.md (medians).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CONFIG = REPO / "tests" / "data" / "configs" / "Phi-3-mini-4k-instruct.json"
GOALS = {"bits_per_weight": 4.6, "peak_rss_gb": 1.5}

EXPORT = r"""
import logging, sys
logging.basicConfig(level=logging.WARNING)
from pathlib import Path
from edgephi.export.coreml import export
from edgephi.export.source import Source
ckpt, out = Path({ckpt!r}), Path({out!r})
out.mkdir(parents=True)
export(Source.open(ckpt), out, bits={bits}, n_ctx={context})
"""


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--checkpoint", type=Path, default=None, help="use this checkpoint instead of making one")
    ap.add_argument("--bits", type=int, choices=(4, 16), default=4)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from edgephi.benchmarks.shapes import make_shape_checkpoint, measure_child
    from edgephi.spec import PhiSpec

    if args.checkpoint is None:
        ckpt = make_shape_checkpoint(args.config)
    else:
        ckpt = args.checkpoint
    spec = PhiSpec.from_hf_config(ckpt)
    rows = []
    for run in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="coreml-bench-"))
        try:
            out = work / "coreml"
            res = measure_child([sys.executable, "-c", EXPORT.format(ckpt=str(ckpt), out=str(out), bits=args.bits,
                                                              context=args.context_length)])
            size = tree_bytes(out / "model.mlpackage")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append({"bench": "coreml_export", "model": spec.name, "config": args.config.name, "bits": args.bits,
                     "context_length": args.context_length, "run": run, **res, "package_bytes": size,
                     "params": spec.n_params, "bits_per_weight": round(size * 8 / spec.n_params, 3),
                     "machine": f"{platform.machine()} {platform.system()}, {_cpus()} cores",
                     "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": "nice python benchmarks/coreml_export.py " + " ".join(argv or sys.argv[1:])})
        print(json.dumps(rows[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "coreml_export.jsonl", "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    write_md(rows)
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def write_md(rows: list[dict]) -> None:
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "peak_rss_gb", "bits_per_weight")}
    r0 = rows[0]
    lines = [
        f"# Core ML export, {r0['model']} shape (random weights), {r0['bits']}-bit, context {r0['context_length']}",
        "",
        f"Machine: {r0['machine']}; commit {r0['commit']}; {r0['date']}; {len(rows)} run(s), medians.",
        f"Command: `{r0['command']}`",
        "",
        "| metric | value | goal |",
        "|---|---|---|",
        f"| package size | {r0['package_bytes'] / 2**30:.2f} GiB ({r0['params'] / 1e9:.2f} B params) | |",
        f"| bits per weight | {med['bits_per_weight']:.3f} | <= {GOALS['bits_per_weight']} |",
        f"| export peak RSS | {med['peak_rss_gb']:.2f} GB | <= {GOALS['peak_rss_gb']} |",
        f"| export wall time | {med['wall_s']:.0f} s | |",
        "",
    ]
    (RESULTS / "coreml_export.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
