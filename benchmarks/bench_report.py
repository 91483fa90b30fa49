"""Benchmark context and output: machine, memory bandwidth, weight bytes read per token, JSONL, markdown, PNG."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


# ---- the machine ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = val.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
              "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "i8mm", "sve")
    try:
        import psutil

        cores, ram = psutil.cpu_count(logical=False), psutil.virtual_memory().total
    except ImportError:
        cores, ram = None, None
    return {"cpu": cpu, "flags": [f for f in wanted if f in flags], "logical_cpus": os.cpu_count(),
            "physical_cores": cores, "ram_gb": round(ram / 2**30, 1) if ram else None,
            "system": f"{platform.system()} {platform.release()} {platform.machine()}",
            "python": platform.python_version()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def commit(root: Path | None) -> str | None:
    if root is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else None
    except OSError:
        return None


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("edgephi", "numpy", "onnxruntime", "onnxruntime-genai", "llama-cpp-python", "onnx", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ---- memory bandwidth ----------------------------------------------------------------------------------------------
def bandwidth(gb: float = 1.0, threads: int = 2, repeats: int = 3) -> dict:
    """GB/s of numpy sum (read) and copy (read + write) over a `gb` GB array, split over `threads` threads
    (numpy releases the GIL in both); best of `repeats`."""
    n = int(gb * 2**30) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(fn, parts))
            best = min(best, time.perf_counter() - t0)
        return best

    t_sum = timed(lambda s: float(src[s].sum()))
    t_copy = timed(lambda s: np.copyto(dst[s], src[s]))
    pool.shutdown()
    nbytes = n * 8
    return {"array_gb": round(nbytes / 1e9, 2), "threads": threads, "sum_gbps": round(nbytes / t_sum / 1e9, 1),
            "copy_gbps": round(2 * nbytes / t_copy / 1e9, 1)}


def int4_kernel(shapes: list[tuple[int, int]], threads: int = 2, min_gb: float = 0.5, repeats: int = 5,
                block: int = 32) -> dict:
    """GB/s at which onnxruntime's int4 MatMulNBits (accuracy level 4, as the bundle's graph uses it) streams
    its weights for one token: one graph of whole layers of `shapes` (random weights, at least `min_gb` so the
    caches do not hold them), one activation row, median of `repeats` after a warm-up.  Set beside the
    memory bandwidth, it says how much a faster decode loop could still gain over the same kernels."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    per_layer = sum(n * k // 2 + 4 * n * k // block for n, k in shapes)
    layers = max(1, -(-int(min_gb * 1e9) // per_layer))
    rng = np.random.default_rng(0)
    inits, nodes, outs, ins = [], [], [], {}
    for i, (n, k) in enumerate(shapes * layers):
        ins.setdefault(k, f"x{k}")
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8), f"w{i}"),
                  numpy_helper.from_array(rng.random(n * k // block, dtype=np.float32) * 0.01, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [ins[k], f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "int4_kernel", [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, k])
                                                     for k, v in ins.items()], outs, inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model, graph, inits
    feed = {v: np.ones((1, k), np.float32) for k, v in ins.items()}
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    nbytes = per_layer * layers
    return {"weights_gb": round(nbytes / 1e9, 2), "layers": layers, "block": block, "threads": threads,
            "gbps": round(nbytes / float(np.median(times)) / 1e9, 1), "onnxruntime": ort.__version__}


# ---- weight bytes streamed per generated token -------------------------------------------------------------------
EMBED_NAMES = ("token_embd.weight", "embed_tokens", "embed")


def gguf_bytes(path: Path) -> tuple[int, int]:
    """(all tensor bytes, bytes of the embedding table) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    total = emb = 0
    for t in r.tensors:
        total += int(t.n_bytes)
        if t.name == "token_embd.weight":
            emb += int(t.n_bytes)
    return total, emb


def onnx_bytes(model_path: Path) -> tuple[int, int]:
    """(all initializer bytes, bytes of the embedding gather table) of an ONNX model (external data by length)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    total = emb = 0
    gather_inputs = {n.input[0] for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        n = int(ext["length"]) if "length" in ext else len(t.raw_data)
        if not n and not ext:
            n = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += n
        if t.name in gather_inputs or any(k in t.name for k in ("embed_tokens",)):
            emb += n
    return total, emb


def bytes_per_token(fmt: str, path: Path) -> dict:
    """Weight bytes read per decoded token ≈ every weight except the embedding table (gathered, not streamed)."""
    try:
        if fmt == "gguf":
            total, emb = gguf_bytes(path)
        elif fmt == "onnx":
            model = path if path.is_file() else path / "model.onnx"
            total, emb = onnx_bytes(model)
        else:
            return {"weight_bytes": None, "bytes_per_token": None}
    except Exception as e:  # report, don't fail the benchmark over an estimate
        return {"weight_bytes": None, "bytes_per_token": None, "bytes_error": f"{e.__class__.__name__}: {e}"}
    return {"weight_bytes": total, "embedding_bytes": emb, "bytes_per_token": total - emb}


# ---- statistics and rows -----------------------------------------------------------------------------------------
def stat(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def fmt_stat(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")


def summarize(subjects: list[dict], prompts: list[int]) -> dict:
    """Best edgephi vs best peer: decode at the shortest prompt, prefill at the longest."""
    p_dec, p_pre = str(prompts[0]), str(prompts[-1])

    def best(kind: str, key: str, p: str):
        vals = [(s["results"][p][key]["median"], s["label"]) for s in subjects
                if s["kind"] == kind and s.get("results") and p in s["results"]]
        return max(vals) if vals else (None, None)

    out = {}
    for key, p in (("decode_tps", p_dec), ("prefill_tps", p_pre)):
        e, el = best("edgephi", key, p)
        q, ql = best("peer", key, p)
        out[key] = {"prompt": int(p), "edgephi": e, "edgephi_label": el, "peer": q, "peer_label": ql,
                    "ratio": (e / q) if e and q else None}
    out["goal"] = {"decode_ratio_min": 1.1, "prefill_ratio_min": 1.0,
                   "decode_met": bool(out["decode_tps"]["ratio"] and out["decode_tps"]["ratio"] >= 1.1),
                   "prefill_met": bool(out["prefill_tps"]["ratio"] and out["prefill_tps"]["ratio"] >= 1.0)}
    return out


def markdown(meta: dict, subjects: list[dict], prompts: list[int], summary: dict) -> str:
    m, bw = meta["machine"], meta["bandwidth"]
    ceiling = max(bw["sum_gbps"], bw["copy_gbps"])
    p0 = str(prompts[0])
    lines = [f"# edgephi bench — {meta['subject']}", "",
             f"`{meta['command']}`", "",
             f"- machine: {m['cpu']}, {m['physical_cores']} cores / {m['logical_cpus']} threads, {m['ram_gb']} GB RAM, "
             f"flags {' '.join(m['flags']) or 'none'}; {m['system']}",
             f"- load average at start {meta['load_start']}, at end {meta['load_end']} "
             f"({'quiet' if meta['quiet'] else 'SHARED: other work was running, figures are low bounds'})",
             f"- commit {meta['commit']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)}",
             f"- {meta['threads']} threads; prompts {', '.join(map(str, prompts))} random ids; {meta['gen']} tokens "
             f"generated, EOS ignored; {meta['runs']} interleaved rounds (each loads every subject afresh in a rotated "
             "order, warms it up and measures it once), median (min–max) over the rounds",
             f"- memory bandwidth (numpy, {bw['threads']} threads, {bw['array_gb']} GB): sum {bw['sum_gbps']} GB/s, "
             f"copy {bw['copy_gbps']} GB/s; decode limit = {ceiling} GB/s ÷ weight bytes per token "
             "(the file's weights less the embedding table)"]
    k = meta.get("int4_kernel")
    if k and k.get("gbps"):
        lines.append(f"- onnxruntime {k['onnxruntime']} int4 MatMulNBits alone (block {k['block']}, accuracy level 4, "
                     f"{k['layers']} layers of this model's matmuls, {k['weights_gb']} GB, one token, "
                     f"{k['threads']} threads): {k['gbps']} GB/s of weights, "
                     f"{100 * k['gbps'] / bw['sum_gbps']:.0f}% of the numpy-sum read rate; on the same weights, "
                     "a faster loop around these kernels can win only the time they do not take")
    elif k:
        lines.append(f"- onnxruntime int4 kernel rate: not measured ({k.get('error', '?')})")
    lines.append("")
    pre_cols = [f"prefill {p} tok/s" for p in prompts]
    head = (["subject", "file", "MB", "bits/w", "load s", f"TTFT {p0} ms"] + pre_cols +
            [f"decode tok/s (after {p0})", "% of BW limit", "peak RSS MB", "× best peer decode",
             f"× best peer prefill {prompts[-1]}"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best_dec, best_pre = summary["decode_tps"]["peer"], summary["prefill_tps"]["peer"]
    for s in subjects:
        if not s.get("results"):
            lines.append(f"| {s['label']} | {s.get('file', '')} | – | – | – | – | "
                         + " | ".join("–" for _ in prompts)
                         + f" | not measured: {s.get('error', '?')} | – | – | – | – |")
            continue
        res = s["results"]
        dec = res[p0]["decode_tps"]
        limit = s.get("decode_limit_tps")
        frac = f"{100 * dec['median'] / limit:.0f}%" if limit else "–"
        ttft = res[p0]["ttft_s"]
        cells = [s["label"], s.get("file", ""), f"{s['size_bytes'] / 2**20:.0f}" if s.get("size_bytes") else "–",
                 f"{s['bits_per_weight']:.2f}" if s.get("bits_per_weight") else "–", f"{s['load_s']:.1f}",
                 fmt_stat({k: v * 1000 if k in ("median", "min", "max") else v for k, v in ttft.items()}, 0)]
        cells += [fmt_stat(res[str(p)]["prefill_tps"]) if str(p) in res else "–" for p in prompts]
        cells += [fmt_stat(dec, 2), frac, f"{s['peak_rss_mb']:.0f}",
                  f"{dec['median'] / best_dec:.2f}" if best_dec else "–",
                  f"{res[str(prompts[-1])]['prefill_tps']['median'] / best_pre:.2f}"
                  if best_pre and str(prompts[-1]) in res else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    exports = [s for s in subjects if s.get("export_s")]
    if exports:
        lines += ["", "| export | seconds | peak RSS MB |", "|---|---|---|"]
        lines += [f"| {s['label']} | {s['export_s']:.1f} | {s.get('export_peak_rss_mb') or '–'} |" for s in exports]
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in skipped]
    d, p = summary["decode_tps"], summary["prefill_tps"]

    def ratio(x):
        return f"{x['ratio']:.2f}×" if x["ratio"] else "n/a"

    lines += ["", f"Goal (reported, not asserted): best edgephi decode ≥ 1.1 × best peer — {ratio(d)} "
              f"({d['edgephi_label']} vs {d['peer_label']}); prefill ({p['prompt']} tokens) ≥ 1.0 × — {ratio(p)} "
              f"({p['edgephi_label']} vs {p['peer_label']})."]
    return "\n".join(lines) + "\n"


def chart(meta: dict, subjects: list[dict], prompts: list[int], path: Path) -> Path | None:
    """Two horizontal bar charts (prefill at the longest prompt, decode after the shortest), edgephi vs peers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [s for s in subjects if s.get("results")]
    if not done:
        return None
    labels = [s["label"] for s in done]
    colors = ["#1f77b4" if s["kind"] == "edgephi" else "#aaaaaa" for s in done]
    p0, p1 = str(prompts[0]), str(prompts[-1])
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.6 + 0.55 * len(done)), constrained_layout=True)
    for ax, key, p, title in ((axes[0], "prefill_tps", p1, f"prefill, {p1}-token prompt (tok/s)"),
                              (axes[1], "decode_tps", p0, f"decode after {p0} tokens (tok/s)")):
        med = [s["results"][p][key]["median"] if p in s["results"] else 0 for s in done]
        lo = [m - s["results"][p][key]["min"] if p in s["results"] else 0 for m, s in zip(med, done)]
        hi = [s["results"][p][key]["max"] - m if p in s["results"] else 0 for m, s in zip(med, done)]
        y = np.arange(len(done))[::-1]
        ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(y, labels, fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.grid(axis="x", alpha=0.3)
        for yi, v, h, s in zip(y, med, hi, done):
            extra = ""
            if key == "decode_tps" and s.get("decode_limit_tps"):
                extra = f"  ({100 * v / s['decode_limit_tps']:.0f}% of BW limit)"
            ax.text(v + h, yi, f"  {v:.1f}{extra}", va="center", fontsize=9)  # right of the error bar
        top = max([m + h for m, h in zip(med, hi)] + [1e-9])
        ax.set_xlim(0, top * (1.6 if key == "decode_tps" else 1.3))
    m = meta["machine"]
    fig.suptitle(f"edgephi bench: {meta['subject']} — {m['cpu']}, {meta['threads']} threads, median of "
                 f"{meta['runs']} (blue: edgephi, grey: peers)" + ("" if meta["quiet"] else " — shared machine"),
                 fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
