"""Where a verification forward's time goes: the ceiling of decode at 100% acceptance on this device.

Speculation at 100% acceptance with k drafts runs (k + 1) x t(1) / t(k + 1) times as fast as plain decoding, so 3x
at k = 16 needs a 17-token forward to cost at most 5.67 one-token forwards.  This check times an ONNX bundle's
forward of 1 and of 17 tokens after 128 (interleaved, medians of --rounds runs), and onnxruntime's profiler splits
the 17-token forwards' time by operator.

    python -m edgephi.benchmarks.verify_cost_check ONNX_DIR [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def session(onnx_dir: Path, threads: int, profile_to: str | None = None):
    """An OnnxSession with 128 tokens cached; onnxruntime's profiler on when profile_to is a folder (it adds a cost
    per operator, so times are taken from a session without it)."""
    import edgephi.backends.onnx as backend

    plain = backend._session_options

    def profiled(n, save_to):
        so = plain(n, save_to)
        so.enable_profiling, so.profile_file_prefix = True, profile_to + "/ort"
        return so

    backend._session_options = profiled if profile_to else plain
    try:
        s = backend.OnnxSession(onnx_dir, threads=threads, n_ctx=512, cache_optimized=False)
    finally:
        backend._session_options = plain
    s.forward(np.random.default_rng(0).integers(0, min(s.vocab, 32000), 128).tolist())
    return s


def forwards(s, rounds: int) -> dict[int, list[float]]:
    """Seconds of each forward of 1 and 17 tokens after the cached 128, interleaved."""
    rng = np.random.default_rng(1)
    times = defaultdict(list)
    for _ in range(rounds):
        for m in (1, 17):
            s.rewind(128)
            ids = rng.integers(0, min(s.vocab, 32000), m).tolist()
            t = time.perf_counter()
            s.forward(ids, all_logits=True)
            times[m].append(time.perf_counter() - t)
    return times


def by_operator(onnx_dir: Path, rounds: int, threads: int) -> dict[str, float]:
    """{operator: mean ms in a 17-token forward}, from onnxruntime's profile."""
    with tempfile.TemporaryDirectory(prefix="verify-prof-") as prof:
        s = session(onnx_dir, threads, prof)
        forwards(s, rounds)
        events = json.loads(Path(s.sess.end_profiling()).read_text())
        s.close()
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # after the 128-token prefill
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs[1::2]]  # the 17-token forwards
    ops = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in spans):
            ops[e["args"]["op_name"]] += e["dur"] / len(spans) / 1e3
    return ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx_dir", type=Path, help="a bundle's onnx/ folder (Phi-3-mini's shape: bench_shapes)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    s = session(a.onnx_dir, a.threads)
    times = forwards(s, a.rounds)
    s.close()
    ops = by_operator(a.onnx_dir, 3, a.threads)
    t1, t17 = statistics.median(times[1]), statistics.median(times[17])
    print(f"{a.onnx_dir}, {a.threads} threads, medians of {a.rounds} interleaved runs: 1 token {t1 * 1e3:.2f} ms, "
          f"17 tokens {t17 * 1e3:.2f} ms = {t17 / t1:.2f}x one token; at 100% acceptance with k = 16 decode runs at "
          f"{17 * t1 / t17:.2f}x plain (3x needs 17 tokens <= 5.67x one token)")
    total = sum(ops.values())
    print("17-token forward by operator (mean of the profiled runs): " + ", ".join(
        f"{op} {ms:.1f} ms ({100 * ms / total:.1f}%)" for op, ms in sorted(ops.items(), key=lambda x: -x[1])[:4]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
