"""Speculative decoding, prompt caches and KV memory, measured beside the peers (issue 17).

    python -m edgephi.benchmarks.bench_speculate verify BUNDLE [--formats onnx,gguf] [--rounds 3]   # (a)
    python -m edgephi.benchmarks.bench_speculate tasks BUNDLE [--rounds 3] [--gen 128]              # (b)
    python -m edgephi.benchmarks.bench_speculate ttft BUNDLE [--context 1000] [--rounds 3]          # (c)
    python -m edgephi.benchmarks.bench_speculate memory BUNDLE [--n-ctx 4096]                       # (d)

BUNDLE: ~/.cache/edgephi/shapes/phi-3-mini/bundle (`edgephi bench --shape phi-3-mini` makes it: random weights of
Phi-3-mini's exact shape) or the built-in model's bundle (`edgephi export default -o DIR -q`).  Each measurement
runs in its own process (benchmarks/spec_worker.py); rounds rotate the order of the subjects; medians; speed as a
ratio to the peer measured in the same run.  Results: benchmarks/results/spec_<part>_<bundle>.{jsonl,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_report import commit, load_average, machine, versions

RESULTS = Path(__file__).resolve().parent / "results"
HELDOUT = Path(__file__).resolve().parents[1] / "edgephi" / "data" / "heldout" / "packaging_version.py"


VOCAB_HI: list[str] = []  # --vocab-hi for random prompt ids: below the bundle's vocabulary (set by main)


def worker(task: str, *args: str, timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "edgephi.benchmarks.spec_worker", task, *args, *VOCAB_HI]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads(line[len("BENCH_JSON "):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def rotate(items: list, r: int) -> list:
    return items[r % len(items):] + items[:r % len(items)]


def files(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    return {fmt: bundle / e["entry"] for fmt, e in m["formats"].items()}


def meta(args, part: str) -> dict:
    return {"part": part, "command": " ".join(["python -m edgephi.benchmarks.bench_speculate"] + args.argv),
            "bundle": str(args.bundle), "machine": machine(), "versions": versions(),
            "commit": commit(Path(__file__).resolve().parents[1]), "load_before": load_average(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def save(args, part: str, info: dict, rows: list[dict], md: list[str]) -> Path:
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    name = f"spec_{part}_{args.bundle.parent.name if args.bundle.name == 'bundle' else args.bundle.name}"
    info["load_after"] = load_average()
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for row in [{"meta": info}] + rows:
            f.write(json.dumps(row) + "\n")
    head = [f"# {part}: {args.bundle}", "", f"- command: `{info['command']}`",
            f"- machine: {info['machine']['cpu']}, {info['machine']['physical_cores']} cores, "
            f"{info['machine']['ram_gb']} GB; {info['machine']['system']}",
            f"- load average before / after: {info['load_before']} / {info['load_after']}",
            f"- started {info['started']}; commit {info['commit']}", ""]
    (out / f"{name}.md").write_text("\n".join(head + md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return out / f"{name}.md"


# ---- (a) verify cost and decode at fixed acceptance ---------------------------------------------------------------
def cmd_verify(args) -> None:
    info, rows, md = meta(args, "verify"), [], []
    for fmt in args.formats.split(","):
        r = worker("verify", "--path", str(args.bundle), "--format", fmt, "--threads", str(args.threads),
                   "--rounds", str(args.rounds), "--gen", str(args.gen), "--context", str(args.context),
                   "--n-ctx", str(args.context + args.gen + 64))
        rows.append(r)
        one = med(r["verify_s"]["0"])
        md += [f"## {fmt}: one forward of 1 + k tokens after {args.context} tokens (median of {args.rounds})", "",
               "| k | ms | × one token | ms per token |", "|---|---|---|---|"]
        for k, xs in r["verify_s"].items():
            m = med(xs)
            md.append(f"| {k} | {m * 1000:.1f} | {m / one:.2f} | {m * 1000 / (int(k) + 1):.1f} |")
        plain = med(r["decode"]["plain"]["tps"])
        md += ["", f"## {fmt}: decode of {args.gen} tokens, drafts replayed from a greedy run with a share replaced",
               "", "| drafts | tok/s | × plain | acceptance | mean k |", "|---|---|---|---|---|",
               f"| none (plain) | {plain:.2f} | 1.00 | | |"]
        for key, v in r["decode"].items():
            if key == "plain":
                continue
            label = "prompt lookup on free text" if key == "ngram" else f"{100 - float(key) * 100:.0f}% kept"
            md.append(f"| {label} | {med(v['tps']):.2f} | {med(v['tps']) / plain:.2f} | "
                      f"{med(v['acceptance']):.2f} | {med(v['k_mean']):.1f} |")
        md.append("")
    save(args, "verify", info, rows, md)


# ---- (b) input-grounded tasks on real weights, beside the peers' own speculation -----------------------------------
def task_prompts(bundle: Path) -> dict[str, list[int]]:
    from edgephi.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundle)
    src = HELDOUT.read_text()
    start = src.index("def _validate_pre(")
    func = src[start:src.index("\ndef ", start + 10)].rstrip() + "\n"
    text = src[src.index("class Version(") :][:1400]
    doc = text[text.index('"""'):]
    doc = doc[: doc.index('"""', 3) + 3]
    prompts = {
        # edit a given function: the function, then its copy under a new name to be written
        "edit": func + "\n\n" + func.splitlines()[0].replace("_validate_pre", "_check_pre") + "\n",
        # quote from a given text: a docstring, then the start of a quotation of it
        "quote": doc + "\n\nQUOTE = " + doc[:60],
        # the model's own repetition (greedy loops, README "Quality")
        "repeat": 'def is_prime(n):\n    """Return True if n is a prime number."""\n',
    }
    return {k: tok.encode(v, add_special_tokens=True) for k, v in prompts.items()}


def stop_ids(bundle: Path) -> list[int]:
    """The ids edgephi's min_tokens holds back: the manifest's stop ids and the tokenizer's."""
    from edgephi.tokenizer import Tokenizer

    manifest = json.loads((bundle / "manifest.json").read_text())
    return sorted(set(manifest["stop_ids"]) | Tokenizer.from_dir(bundle).stop_ids)


def cmd_tasks(args) -> None:
    info, rows = meta(args, "tasks"), []
    f = files(args.bundle)
    tmp = tempfile.TemporaryDirectory(prefix="edgephi-spec-")  # the prompts, for the worker processes
    prompts = Path(tmp.name) / "prompts.json"
    prompts.write_text(json.dumps(task_prompts(args.bundle)))
    subjects = [("edgephi onnx", ["--runner", "edgephi", "--path", str(args.bundle), "--format", "onnx"]),
                ("edgephi gguf", ["--runner", "edgephi", "--path", str(args.bundle), "--format", "gguf"]),
                ("llama.cpp", ["--runner", "llamacpp", "--path", str(f["gguf"])]),
                ("onnxruntime-genai", ["--runner", "genai", "--path", str(f["onnx"].parent)])]
    runs = [(name, spec, a) for name, a in subjects for spec in (False, True)]
    stops = ",".join(map(str, stop_ids(args.bundle)))
    for rnd in range(args.rounds):
        for name, spec, a in rotate(runs, rnd):
            r = worker("tasks", *a, "--prompts", str(prompts), "--gen", str(args.gen), "--threads", str(args.threads),
                       "--stop-ids", stops, "--reps", str(args.reps), *(["--spec"] if spec else []))
            rows.append({"subject": name, "spec": spec, "round": rnd, **r})
    md = tasks_markdown(rows, list(task_prompts(args.bundle)))
    save(args, "tasks", info, rows, md)


def _spec_rounds(rows: list[dict]) -> list[list[dict]]:
    """Each round's speculating rows, for rounds that have both an edgephi and a peer row (a drift of the machine's
    speed over minutes cancels in their ratio)."""
    out = []
    for rnd in sorted({r.get("round") for r in rows if r.get("round") is not None}):
        rs = [r for r in rows if r.get("round") == rnd and r["spec"]]
        if any(r["subject"].startswith("edgephi") for r in rs) and any(not r["subject"].startswith("edgephi")
                                                                      for r in rs):
            out.append(rs)
    return out


SAME_FILE = {"onnxruntime-genai": "edgephi onnx", "llama.cpp": "edgephi gguf"}  # peer -> edgephi on its file


def tasks_markdown(rows: list[dict], names: list[str]) -> list[str]:
    subjects = sorted({(r["subject"], r["spec"]) for r in rows}, key=lambda s: (s[0], s[1]))
    md = ["| subject | speculation | " + " | ".join(f"{n} tok/s" for n in names)
          + " | same tokens as plain decoding of the same file |", "|---|---|" + "---|" * (len(names) + 1)]
    table, differ = {}, []
    for subj in subjects:
        rs = [r for r in rows if (r["subject"], r["spec"]) == subj]
        table[subj] = {n: med([r["tasks"][n]["decode_tps"] for r in rs]) for n in names}
        ref = SAME_FILE.get(subj[0], subj[0])  # the peers are checked against edgephi on the same file
        plain = [r for r in rows if r["subject"] == ref and not r["spec"]] or \
            [r for r in rows if r["subject"] == subj[0] and not r["spec"]]
        same = all(r["tasks"][n]["tokens"] == plain[0]["tasks"][n]["tokens"] for r in rs for n in names)
        differ += [] if same else [f"{subj[0]} ({'own speculation' if subj[1] else 'plain'})"]
        acc = [(r["tasks"][n].get("accepted"), r["tasks"][n].get("drafted")) for r in rs[:1] for n in names]
        md.append(f"| {subj[0]} | {'own' if subj[1] else 'none'} | "
                  + " | ".join(f"{table[subj][n]:.0f}" for n in names) + f" | {'yes' if same else 'NO'} "
                  + (f"(accepted/drafted {acc})" if subj[1] else "") + " |")
    md += ["", "Ratios (medians): edgephi's best with speculation / the best peer's own speculation, and each "
           "edgephi backend's speculation / its plain decoding:", ""]
    for n in names:
        ours = max(table[s][n] for s in subjects if s[0].startswith("edgephi") and s[1])
        peer = max(table[s][n] for s in subjects if not s[0].startswith("edgephi") and s[1])
        own = ", ".join(f"{s[0]} {table[s][n] / table[(s[0], False)][n]:.2f}×" for s in subjects
                        if s[0].startswith("edgephi") and s[1])
        paired = [max(r["tasks"][n]["decode_tps"] for r in rs if r["subject"].startswith("edgephi"))
                  / max(r["tasks"][n]["decode_tps"] for r in rs if not r["subject"].startswith("edgephi"))
                  for rs in _spec_rounds(rows)]
        md.append(f"- {n}: **{ours / peer:.2f}×** the best peer's speculation; {own} its plain decoding"
                  + (f"; within each round: median {med(paired):.2f}× (range {min(paired):.2f}–{max(paired):.2f})"
                     if paired else ""))
    if differ:
        md.append(f"- NOT comparable: {', '.join(differ)} wrote other tokens than plain decoding of the same file")
    return md


# ---- (c) time to first token after a saved prefix ----------------------------------------------------------------
def cmd_ttft(args) -> None:
    info, rows = meta(args, "ttft"), []
    f = files(args.bundle)
    cache = Path(args.out or RESULTS).parent / ".spec_prefix.kv"
    subjects = [("edgephi onnx", ["--runner", "edgephi", "--path", str(args.bundle), "--format", "onnx"]),
                ("edgephi gguf", ["--runner", "edgephi", "--path", str(args.bundle), "--format", "gguf"]),
                ("llama.cpp (save_state/load_state)", ["--runner", "llamacpp", "--path", str(f["gguf"])])]
    for name, a in subjects:
        r = worker("ttft", *a, "--context", str(args.context), "--rounds", str(args.rounds), "--threads",
                   str(args.threads), "--n-ctx", str(args.context + 64), "--cache-file", str(cache))
        rows.append({"subject": name, **r})
    cache.unlink(missing_ok=True)
    md = [f"Time to the first token of a 16-token question after a {args.context}-token prefix (median of "
          f"{args.rounds}, saved state read from the page cache):", "",
          "| subject | recompute s | saved prefix s | ratio | state file MB |", "|---|---|---|---|---|"]
    for r in rows:
        a, b = med(r["recompute_s"]), med(r["saved_s"])
        md.append(f"| {r['subject']} | {a:.3f} | {b:.3f} | **{b / a:.3f}** | {r['state_mb']:.0f} |")
    save(args, "ttft", info, rows, md)


# ---- (d) peak RSS at a full context -------------------------------------------------------------------------------
def cmd_memory(args) -> None:
    info, rows = meta(args, "memory"), []
    f = files(args.bundle)
    ep = ["--runner", "edgephi", "--path", str(args.bundle)]
    subjects = [("edgephi onnx (f32, full)", ep + ["--format", "onnx"]),
                ("edgephi onnx kv_ring", ep + ["--format", "onnx", "--load-option", "kv_ring=1"]),
                ("edgephi gguf (f16, full)", ep + ["--format", "gguf"]),  # weights read (mmap=auto on CPU)
                ("edgephi gguf kv_type=q8_0", ep + ["--format", "gguf", "--load-option", "kv_type=q8_0"]),
                ("edgephi gguf kv_ring", ep + ["--format", "gguf", "--load-option", "kv_ring=1"]),
                ("edgephi gguf q8_0 + kv_ring", ep + ["--format", "gguf", "--load-option", "kv_type=q8_0",
                                                     "--load-option", "kv_ring=1"]),
                ("llama.cpp (f16)", ["--runner", "llamacpp", "--path", str(f["gguf"])]),
                ("llama.cpp (q8_0 K and V)", ["--runner", "llamacpp", "--path", str(f["gguf"]), "--load-option",
                                              "type_k=8", "--load-option", "type_v=8", "--load-option",
                                              "flash_attn=1"]),
                ("onnxruntime-genai", ["--runner", "genai", "--path", str(f["onnx"].parent)]),
                # the file mapped, as before edgephi read the weights on CPU (mmap=auto), and the peer reading them
                ("edgephi gguf (f16, full), mmap on", ep + ["--format", "gguf", "--load-option", "mmap=on"]),
                ("edgephi gguf q8_0 + kv_ring, mmap on", ep + ["--format", "gguf", "--load-option", "kv_type=q8_0",
                                                              "--load-option", "kv_ring=1", "--load-option", "mmap=on"]),
                ("llama.cpp (f16), no mmap", ["--runner", "llamacpp", "--path", str(f["gguf"]), "--load-option",
                                              "use_mmap=0"]),
                ("edgephi onnx kv_type=int8", ep + ["--format", "onnx", "--load-option", "kv_type=int8"]),
                ("edgephi onnx int8 + kv_ring", ep + ["--format", "onnx", "--load-option", "kv_type=int8",
                                                     "--load-option", "kv_ring=1"])]
    only = set(args.only.split(",")) if args.only else None
    partial = Path(args.out or RESULTS) / ".spec_memory_partial.jsonl"  # one row per finished subject
    done = {}
    if args.resume and partial.is_file():
        done = {r["subject"]: r for r in map(json.loads, partial.read_text().splitlines()) if r.get("subject")}
    for i, (name, a) in enumerate(subjects):
        if (only and str(i) not in only) or name in done:
            rows += [done[name]] if name in done else []
            continue
        r = worker("memory", *a, "--n-ctx", str(args.n_ctx), "--gen", "32", "--threads", str(args.threads))
        rows.append({"subject": name, **r})
        with open(partial, "a", encoding="utf-8") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(name, round(r["peak_rss_mb"]), "MB", round(r["seconds"]), "s", flush=True)
    base = next((r["peak_rss_mb"] for r in rows if r["subject"] == "llama.cpp (f16)"), None)
    md = [f"Peak RSS after {args.n_ctx} tokens of context (one process each):", "",
          "| subject | peak RSS MB | × llama.cpp (f16) | fill s |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['subject']} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] / base:.2f} | {r['seconds']:.0f} |" if base else
                  f"| {r['subject']} | {r['peak_rss_mb']:.0f} | | {r['seconds']:.0f} |")
    save(args, "memory", info, rows, md)


PARTS = {"verify": cmd_verify, "tasks": cmd_tasks, "ttft": cmd_ttft, "memory": cmd_memory}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgephi.benchmarks.bench_speculate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=list(PARTS))
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--formats", default="onnx,gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9, help="tasks: runs of each prompt per worker (their median)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", default=None, help="memory: comma-separated subject indices")
    ap.add_argument("--resume", action="store_true", help="memory: keep the subjects a previous run finished")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as run (also through `edgephi bench --speculate`)
    vocab = json.loads((args.bundle / "manifest.json").read_text())["spec"]["vocab_size"]
    VOCAB_HI[:] = ["--vocab-hi", str(min(int(vocab) - 100, 32000))]
    PARTS[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
