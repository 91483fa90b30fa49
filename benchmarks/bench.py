"""edgephi bench: speed and memory of every backend on one bundle, with the peers measured on the same files.

    edgephi bench BUNDLE [--prompt 128,512] [--gen 128] [--runs 3] [--peers] [--threads N] [--formats onnx,gguf]
    edgephi bench --shape phi-3-mini --peers          # random-weight checkpoint of the real shape, exported once
    python benchmarks/bench.py --shape phi-3-mini --peers   # the same, from a checkout

Subjects, each measured in its own process (python -m edgephi.benchmarks.bench_worker) so that peak RSS is its own:
  edgephi <format>          edgephi.load(bundle, format=…) and Model.stream(ids, ignore_eos=True)
  llama.cpp (bundle gguf)   llama-cpp-python directly on the bundle's GGUF file (--peers)
  ort-genai (bundle onnx)   onnxruntime-genai directly on the bundle's onnx/ folder (--peers)
  llama.cpp (own convert)   llama.cpp's convert_hf_to_gguf.py + quantizer on the same checkpoint (--peers)
  ort-genai (own builder)   onnxruntime-genai's model builder on the same checkpoint (--peer-builders)
Output (--out, default benchmarks/results): bench_<subject>.jsonl (rows appended, each with machine, commit,
command and versions), bench_<subject>.md (table with ratios to the best peer) and bench_<subject>.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHAPE_NAMES = ("phi-3-mini", "phi-2", "phi-4-mini", "phi-3-medium")
RUNNABLE = ("onnx", "gguf")  # formats with a CPU backend on Linux (Core ML runs on macOS only)
WORKER_TIMEOUT_S = 4 * 3600


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", default=None, help="bundle directory (or use --shape)")
    p.add_argument("--shape", default=None, choices=SHAPE_NAMES,
                   help="benchmark a random-weight checkpoint of this real Phi shape (written and exported once, "
                        "cached under $EDGEPHI_HOME/shapes or ~/.cache/edgephi/shapes)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --shape phi-2 / phi-4-mini")
    p.add_argument("--prompt", default="128,512", help="comma-separated prompt lengths (default 128,512)")
    p.add_argument("--gen", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--runs", type=int, default=3,
                   help="measured runs, in interleaved rounds: each round loads every subject afresh, warms it "
                        "up and measures it once (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every subject (default: physical "
                                                              "cores)")
    p.add_argument("--formats", default=None, help="edgephi formats to measure (default: onnx,gguf present)")
    p.add_argument("--peers", action="store_true", help="also measure llama.cpp and onnxruntime-genai")
    p.add_argument("--no-peer-convert", action="store_true",
                   help="with --peers: skip llama.cpp's own conversion of the checkpoint")
    p.add_argument("--peer-builders", action="store_true",
                   help="also run onnxruntime-genai's model builder (≈23 GB peak RSS for Phi-3-mini)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--rebuild", action="store_true", help="re-export the --shape bundle")
    p.add_argument("--speculate", default=None, choices=["verify", "tasks", "ttft", "memory"],
                   help="instead: one part of the speculation / prompt-cache / KV-memory benchmark "
                        "(benchmarks/bench_speculate.py) on the bundle or --shape")
    p.add_argument("--bandwidth-gb", type=float, default=1.0,
                   help="array size for the bandwidth test (GB); half of it for the int4 kernel test")


def cmd_bench(args) -> int:
    if args.speculate:
        from edgephi.benchmarks import bench_speculate

        bundle = resolve_subject(args)[0]
        return bench_speculate.main([args.speculate, str(bundle), "--rounds", str(args.runs), "--gen",
                                     str(args.gen), *(["--formats", args.formats] if args.formats else []),
                                     *(["--threads", str(args.threads)] if args.threads else []),
                                     *(["--out", args.out] if args.out else [])])
    run_bench(args, argv=sys.argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgephi bench", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="edgephi: %(message)s", stream=sys.stderr)
    run_bench(args, argv=[sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    return 0


# ---- subjects -----------------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "bundle"


def _n_ctx(prompts: list[int], gen: int) -> int:
    return int(math.ceil((max(prompts) + gen + 16) / 256) * 256)


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def subjects_for(bundle: Path, manifest, formats: list[str], peers: bool) -> tuple[list[dict], list[tuple]]:
    out, skipped = [], []
    for fmt in formats:
        e = manifest.formats[fmt]
        out.append({"label": f"edgephi {fmt}", "kind": "edgephi", "runner": "edgephi", "format": fmt,
                    "path": str(bundle), "file": e.entry, "weights": str(bundle / e.entry),
                    "size_bytes": e.nbytes, "quant": e.quant})
    if peers:
        if "gguf" in manifest.formats:
            e = manifest.formats["gguf"]
            if _has("llama_cpp"):
                out.append({"label": "llama.cpp (bundle gguf)", "kind": "peer", "runner": "llamacpp",
                            "format": "gguf", "path": str(bundle / e.entry), "file": e.entry,
                            "weights": str(bundle / e.entry), "size_bytes": e.nbytes, "quant": e.quant})
            else:
                skipped.append(("llama.cpp (bundle gguf)", "llama-cpp-python is not installed"))
        if "onnx" in manifest.formats:
            e = manifest.formats["onnx"]
            folder = (bundle / e.entry).parent
            if not _has("onnxruntime_genai"):
                skipped.append(("ort-genai (bundle onnx)", "onnxruntime-genai is not installed"))
            elif not (folder / "genai_config.json").is_file():
                skipped.append(("ort-genai (bundle onnx)", f"{folder}/genai_config.json is missing"))
            else:
                out.append({"label": "ort-genai (bundle onnx)", "kind": "peer", "runner": "genai", "format": "onnx",
                            "path": str(folder), "file": e.entry, "weights": str(bundle / e.entry),
                            "size_bytes": e.nbytes, "quant": e.quant})
    return out, skipped


def own_conversions(ckpt: Path, base: Path, n_params: int, builders: bool) -> tuple[list[dict], list[tuple]]:
    """The peers' own conversions of the checkpoint (cached under base)."""
    from edgephi.benchmarks import bench_shapes as shapes
    from edgephi.manifest import tree_size

    out, skipped = [], []
    if _has("llama_cpp"):
        try:
            info = shapes.peer_gguf(ckpt, base / "peer-gguf")
            p = Path(info["path"])
            out.append({"label": "llama.cpp (own convert)", "kind": "peer", "runner": "llamacpp", "format": "gguf",
                        "path": str(p), "file": f"{p.parent.name}/{p.name}", "weights": str(p),
                        "size_bytes": p.stat().st_size,
                        "quant": "q4_k_m", "export_s": info["export_s"],
                        "export_peak_rss_mb": info["export_peak_rss_mb"], "tool": info["tool"]})
        except (OSError, RuntimeError, ValueError) as e:
            skipped.append(("llama.cpp (own convert)", str(e).splitlines()[0][:300]))
    else:
        skipped.append(("llama.cpp (own convert)", "llama-cpp-python is not installed"))
    if not builders:
        skipped.append(("ort-genai (own builder)", "needs --peer-builders (≈23 GB peak RSS for Phi-3-mini)"))
        return out, skipped
    # onnxruntime-genai 0.18's builder on Phi-3-mini here: 23.4 GB peak RSS polled over its process tree,
    # 19.2 GiB max RSS by /usr/bin/time; it ran with 22 GiB available
    need_gb = 20 * n_params / 3.82e9
    try:
        info = shapes.peer_genai(ckpt, base / "peer-genai", need_gb)
        d = Path(info["path"])
        out.append({"label": "ort-genai (own builder)", "kind": "peer", "runner": "genai", "format": "onnx",
                    "path": str(d), "file": f"{d.name}/model.onnx", "weights": str(d / "model.onnx"),
                    "size_bytes": sum(tree_size(f) for f in d.iterdir()  # not edgephi's optimized-graph cache
                                      if f.suffix in (".onnx", ".data") and ".opt-" not in f.name),
                    "quant": "int4", "export_s": info["export_s"], "export_peak_rss_mb": info["export_peak_rss_mb"],
                    "tool": info["tool"]})
    except (OSError, RuntimeError, MemoryError, ValueError) as e:
        skipped.append(("ort-genai (own builder)", str(e).splitlines()[0][:300]))
    return out, skipped


# ---- running ------------------------------------------------------------------------------------------------------
def _other_load() -> float | None:
    """CPU busy % over one second while this benchmark is idle: how much else is running."""
    try:
        import psutil

        return psutil.cpu_percent(interval=1.0)
    except ImportError:
        return None


def run_worker(subject: dict, args, prompts: list[int], threads: int, vocab: tuple[int, int],
               load_only: bool = False, trial: int = 0) -> dict:
    """One measured run (trial `trial`'s prompts) of one subject in a fresh worker process, after its warm-up."""
    cmd = [sys.executable, "-m", "edgephi.benchmarks.bench_worker", "--runner", subject["runner"],
           "--path", subject["path"], "--prompt", ",".join(map(str, prompts)), "--gen", str(args.gen),
           "--runs", "1", "--trial", str(trial), "--threads", str(threads), "--n-ctx", str(_n_ctx(prompts, args.gen)),
           "--vocab-lo", str(vocab[0]), "--vocab-hi", str(vocab[1])]
    if subject["runner"] == "edgephi":
        cmd += ["--format", subject["format"]]
    if load_only:
        cmd.append("--load-only")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    tail = (r.stderr or r.stdout).strip().splitlines()
    raise RuntimeError(f"worker failed (rc {r.returncode}): {tail[-1] if tail else 'no output'}")


def _read_through(path: Path) -> None:
    files = [path] if path.is_file() else []
    if path.suffix == ".onnx":
        files += [p for p in path.parent.iterdir() if p.suffix == ".data" or p.name.endswith(".onnx.data")]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def measure_bandwidth(gb: float, threads: int) -> dict:
    """In a child process, so that this process never holds the arrays while it starts the workers."""
    code = ("import json, sys; from edgephi.benchmarks.bench_report import bandwidth; "
            f"print(json.dumps(bandwidth({float(gb)!r}, {int(threads)})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_int4_kernel(spec, threads: int, gb: float) -> dict:
    """onnxruntime's int4 kernel rate on this model's layer shapes, in a child process (bench_report.int4_kernel)."""
    shapes = []  # (N, K) of one decoder layer's matmuls, as the ONNX exporter lays them out
    for name, shape in spec.tensor_shapes().items():
        if name.startswith("model.layers.0.") and len(shape) == 2:
            split = 2 if name.endswith("gate_up_proj.weight") else 1  # export/onnx.py: gate and up, two matmuls
            shapes += [(shape[0] // split, shape[1])] * split
    code = ("import json; from edgephi.benchmarks.bench_report import int4_kernel; "
            f"print(json.dumps(int4_kernel({shapes!r}, {int(threads)}, min_gb={float(gb) / 2!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def resolve_subject(args):
    """(bundle dir, checkpoint dir or None, cache base for peer conversions, subject name)."""
    from edgephi.manifest import Manifest

    if args.shape and args.bundle:
        raise ValueError("give a BUNDLE or --shape, not both")
    if args.shape:
        from edgephi.benchmarks import bench_shapes as shapes
        from edgephi.export.bundle import exportable_formats

        fmts = tuple(f for f in (args.formats.split(",") if args.formats else RUNNABLE)
                     if f in exportable_formats())
        if not fmts:
            raise ValueError("no exporter for onnx or gguf is installed here")
        bundle = shapes.shape_bundle(args.shape, fmts, args.tokenizer, rebuild=args.rebuild)
        return bundle, shapes.shapes_home() / args.shape / "checkpoint", bundle.parent, args.shape
    if not args.bundle:
        raise ValueError("give a BUNDLE directory or --shape NAME")
    bundle = Path(args.bundle)
    m = Manifest.load(bundle)
    ckpt = Path(m.source.get("path", ""))
    ckpt = ckpt if m.source.get("path") and (ckpt / "config.json").is_file() else None
    from edgephi.benchmarks.bench_shapes import shapes_home

    if bundle.resolve().parent.parent == shapes_home().resolve():  # a cached --shape bundle, used as it is
        return bundle, ckpt, bundle.resolve().parent, bundle.resolve().parent.name
    return bundle, ckpt, shapes_home().parent / "bench-peers" / _slug(bundle.resolve().name), _slug(bundle.name)


def default_out() -> Path:
    from edgephi.benchmarks.bench_shapes import repo_root

    root = repo_root()
    return (root if root else Path.cwd()) / "benchmarks" / "results"


def run_bench(args, argv: list[str] | None = None) -> dict:
    from edgephi.benchmarks import bench_report as report
    from edgephi.benchmarks.bench_shapes import repo_root, shapes_home
    from edgephi.devices import physical_cores
    from edgephi.manifest import Manifest

    prompts = [int(p) for p in str(args.prompt).split(",") if p.strip()]
    if not prompts or min(prompts) < 1 or args.gen < 2 or args.runs < 1:
        raise ValueError("--prompt needs positive lengths, --gen ≥ 2, --runs ≥ 1")
    threads = args.threads or physical_cores()
    load_start = report.load_average()
    bundle, ckpt, base, name = resolve_subject(args)
    manifest = Manifest.load(bundle)
    spec = manifest.spec
    wanted = args.formats.split(",") if args.formats else list(RUNNABLE)
    formats = [f for f in wanted if f in manifest.formats]
    skipped = [(f"edgephi {f}", "not in the bundle") for f in wanted if f not in manifest.formats]
    subjects, sk = subjects_for(bundle, manifest, formats, args.peers)
    skipped += sk
    if args.peers and args.no_peer_convert:
        skipped.append(("peers' own conversions", "--no-peer-convert"))
    elif args.peers and ckpt is not None:
        own, sk = own_conversions(ckpt, base, spec.n_params, args.peer_builders)
        subjects += own
        skipped += sk
    elif args.peers:
        skipped.append(("peers' own conversions", "the bundle's source checkpoint is not on this machine"))
    vocab = (3, 32000 if spec.vocab_size in (32000, 32064) else spec.vocab_size)

    bw = measure_bandwidth(args.bandwidth_gb, threads)
    has_onnx = any(s["format"] == "onnx" for s in subjects)
    kernel = measure_int4_kernel(spec, threads, args.bandwidth_gb) if has_onnx else None
    busy = []
    for s in subjects:
        s["bits_per_weight"] = 8 * s["size_bytes"] / spec.n_params if s.get("size_bytes") else None
        s.update(report.bytes_per_token(s["format"], Path(s["weights"])))
        bpt = s.get("bytes_per_token")
        s["decode_limit_tps"] = max(bw["sum_gbps"], bw["copy_gbps"]) * 1e9 / bpt if bpt else None
        s["_raw"] = []
    # Interleaved rounds: round r runs every subject once (trial r, a fresh process with its own warm-up), starting
    # one subject later each round, so that the slow drift of a shared machine and any effect of running first or
    # last fall on every subject alike instead of on whoever happens to come first.
    for r in range(args.runs if subjects else 0):
        order = subjects[r % len(subjects):] + subjects[:r % len(subjects)]
        for s in order:
            if s.get("error"):
                continue
            try:
                if r == 0 and s["runner"] == "edgephi" and s["format"] == "onnx":  # writes the optimized graph
                    run_worker(s, args, prompts, threads, vocab, load_only=True)
                _read_through(Path(s["weights"]))  # every subject starts with its files in the page cache
                busy.append(_other_load())
                s["_raw"].append(run_worker(s, args, prompts, threads, vocab, trial=r))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                s["error"] = str(e)[:300]
                log.warning("%s: %s", s["label"], s["error"])
                continue
            w = s["_raw"][-1]
            print(f"round {r + 1}/{args.runs} {s['label']:<26} " + "  ".join(
                f"p{p}: prefill {x['prefill_tps'][0]:.1f} decode {x['decode_tps'][0]:.2f}"
                for p, x in w["results"].items()) + f"  rss {w['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    for s in subjects:
        raw = s.pop("_raw")
        if s.get("error") or not raw:
            continue
        keep = ("backend", "device", "load_options", "version")
        s.update({k: raw[0][k] for k in keep if k in raw[0]})
        s["load_s"] = statistics.median(w["load_s"] for w in raw)
        s["peak_rss_mb"] = max(w["peak_rss_mb"] for w in raw)
        s["rss_after_load_mb"] = max(w["rss_after_load_mb"] for w in raw)
        s["results"] = {}
        for p in raw[0]["results"]:
            merged = {k: [x for w in raw for x in w["results"][p][k]] for k in raw[0]["results"][p]}
            s["results"][p] = ({k: report.stat(v) for k, v in merged.items() if k != "generated"}
                               | {"generated": merged["generated"]})

    busy_known = [b for b in busy if b is not None]
    random_weights = args.shape or (bundle.resolve().parent.parent == shapes_home().resolve())
    meta = {"subject": f"{name} ({spec.n_params / 1e9:.2f} B parameters, random weights)" if random_weights
            else f"{name} ({spec.n_params / 1e9:.2f} B parameters)",
            "command": " ".join(shlex.quote(a) for a in (argv or sys.argv)), "commit": report.commit(repo_root()),
            "machine": report.machine(), "versions": report.versions(), "bandwidth": bw, "int4_kernel": kernel,
            "threads": threads,
            "prompts": prompts, "gen": args.gen, "runs": args.runs, "load_start": load_start,
            "load_end": report.load_average(), "other_cpu_busy_pct": busy,
            "quiet": bool(busy_known) and max(busy_known) < 15.0, "skipped": skipped,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bundle": str(bundle),
            "bundle_created": manifest.created}
    summary = report.summarize(subjects, prompts)
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{_slug(name)}_t{threads}"
    rows = []
    for s in subjects:
        base_row = {k: v for k, v in s.items() if k != "results"}
        for p, r in (s.get("results") or {"-": None}).items():
            rows.append({"type": "result", **meta, **base_row, "prompt_tokens": None if p == "-" else int(p),
                         "gen_tokens": args.gen, **(r or {})})
    rows.append({"type": "summary", **meta, **summary})
    report.write_jsonl(rows, out / f"{stem}.jsonl")
    md = report.markdown(meta, subjects, prompts, summary)
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    png = report.chart(meta, subjects, prompts, out / f"{stem}.png")
    print(md)
    print(f"results: {out / (stem + '.jsonl')}, {out / (stem + '.md')}"
          + (f", {png}" if png else " (no chart: pip install matplotlib)"), file=sys.stderr)
    return {"meta": meta, "subjects": subjects, "summary": summary, "out": out, "stem": stem}


if __name__ == "__main__":
    sys.exit(main())
