"""Serving benchmark: N concurrent streaming clients against `edgephi serve` and llama-cpp-python's own OpenAI
server (`python -m llama_cpp.server`) on the same GGUF file, in one run.

Each client sends its requests one after another (POST /v1/completions, stream, greedy, a different code prompt
each, max_tokens tokens); a measurement is N such clients at once against a freshly started server that has
answered one warm-up request.  Figures: aggregate tokens/s (all tokens over the wall time from the first request
to the last token), time to first token p50 and p99 over the requests.  Rounds are interleaved: each round starts
every subject afresh for every N in a rotated order, so drift and running first fall on every subject alike;
the tables give medians over the rounds (aggregate min–max beside them), and the server process's CPU time per
token, which the other work on a shared machine disturbs less than the wall time.  llama-cpp-python's server gets
--threads threads (it answers one request at a time); edgephi serve runs with --parallel N, its sessions sharing
those threads (at least one each).

    python benchmarks/serve_bench.py --bundle BUNDLE [--clients 1,2,4] [--rounds 3] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [  # code the built-in model continues without stopping
    "import os\nimport sys\n\n\ndef {name}(path):\n    \"\"\"Return the files under path.\"\"\"\n",
    "class {name}:\n    \"\"\"A queue of pending jobs.\"\"\"\n\n    def __init__(self, size):\n",
    "def {name}(items, key=None):\n    \"\"\"Sort items and drop duplicates.\"\"\"\n    result = []\n",
    "# Parse the command line\nimport argparse\n\n\ndef {name}(argv=None):\n    parser = argparse.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subjects(bundle: Path, gguf: Path, threads: int) -> dict:
    """name -> command builder (n_clients, port) -> argv.  llama-cpp-python's server gets `threads` threads; edgephi
    serve's N sessions share them (at least one each)."""
    py = sys.executable

    def edgephi(fmt: str):
        return lambda n, port: [py, "-m", "edgephi.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port",
                                str(port), "--format", fmt, "--parallel", str(n), "--threads",
                                str(max(1, threads // n)), "--queue", "64"]

    return {
        "edgephi serve (gguf)": edgephi("gguf"),
        "edgephi serve (onnx)": edgephi("onnx"),
        "llama-cpp-python server": lambda n, port: [py, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                                    "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                                    "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                                    # its default cuts a streaming answer short when another request
                                                    # arrives; off, requests wait for each other and finish whole
                                                    "--interrupt_requests", "False"],
    }


def start(argv: list[str], port: int, log: Path, timeout: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(argv[:4])} exited with {proc.returncode}: {' | '.join(tail)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{argv[:4]} did not answer on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: seconds to the first token, tokens, seconds in all."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, chunks, usage = None, 0, None
    for line in r:  # SSE: "data: {...}" lines; one chunk per token from llama-cpp-python, one or more from edgephi
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            usage = obj["usage"]["completion_tokens"]
        for c in obj.get("choices") or ():
            if c.get("finish_reason") is None:
                chunks += 1
                if first is None and c.get("text"):
                    first = time.perf_counter() - t0
    conn.close()
    return {"ttft": first if first is not None else time.perf_counter() - t0,
            "tokens": usage if usage is not None else chunks, "seconds": time.perf_counter() - t0}


def measure(port: int, n_clients: int, per_client: int, max_tokens: int, tag: str) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            prompt = PROMPTS[(k + j) % len(PROMPTS)].format(name=f"{tag}_c{k}_r{j}")
            try:
                res = request(port, prompt, max_tokens)
            except (OSError, RuntimeError, ValueError) as e:
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    if errors or len(results) != n_clients * per_client:
        raise RuntimeError(f"{len(errors)} failed requests: {errors[:3]}")
    short = [r["tokens"] for r in results if r["tokens"] < max_tokens]
    if short:  # every prompt continues past max_tokens: a short answer was cut (or stopped), and is not comparable
        raise RuntimeError(f"{len(short)} answers ended early ({short[:4]} of {max_tokens} tokens)")
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"aggregate_tps": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
            "tokens": tokens, "requests": len(results), "wall_s": wall}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def report(rows: list[dict], args, info: dict, out: Path) -> str:
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["subject"], r["clients"]), []).append(r)
    keys = ("aggregate_tps", "ttft_p50_ms", "ttft_p99_ms", "server_cpu_ms_per_token")
    med = {k: {m: statistics.median(x.get(m, float("nan")) for x in v) for m in keys} for k, v in by.items()}
    peer = "llama-cpp-python server"
    lines = [f"# Serving benchmark: {args.clients} concurrent clients, {args.rounds} interleaved rounds (medians)", "",
             f"`{' '.join(sys.argv)}`  ", f"bundle `{args.bundle}`, GGUF `{args.gguf}`; {args.requests} requests per "
             f"client, {args.max_tokens} tokens each (streamed /v1/completions, greedy); {args.threads} threads "
             f"for llama-cpp-python's server, shared by edgephi serve's sessions (at least one each).  ",
             f"machine: {info['cpu']}, {info['cores']} cores, load average at start "
             f"{info['load_average_at_start'][0]:.2f} (shared with other work: read ratios, not absolutes)", "",
             "| subject | clients | aggregate tok/s (min–max) | vs llama-cpp-python | TTFT p50 ms | TTFT p99 ms | "
             "server CPU ms/token |", "|---|---|---|---|---|---|---|"]
    for n in args.clients:
        for name in sorted({s for s, c in med if c == n}):
            m = med[(name, n)]
            ratio = m["aggregate_tps"] / med[(peer, n)]["aggregate_tps"] if (peer, n) in med else float("nan")
            tps = [r["aggregate_tps"] for r in by[(name, n)]]
            lines.append(f"| {name} | {n} | {m['aggregate_tps']:.0f} ({min(tps):.0f}–{max(tps):.0f}) | "
                         f"{ratio:.2f}× | {m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} | "
                         f"{m['server_cpu_ms_per_token']:.2f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle with gguf/ (default: the built-in model, exported to a "
                    "temporary folder)")
    ap.add_argument("--clients", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads each server may use")
    ap.add_argument("--subjects", default=None, help="comma-separated subset of the subject names")
    ap.add_argument("--out", default=str(RESULTS / "serve_bench"))
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="serve_bench_")
    if args.bundle is None:
        from edgephi.export.bundle import export_bundle

        args.bundle, _ = export_bundle("default", Path(tmp.name) / "bundle", formats=("onnx", "gguf"), bits=4)
    args.bundle = Path(args.bundle)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    args.gguf = args.bundle / manifest["formats"]["gguf"]["entry"]
    table = subjects(args.bundle, args.gguf, args.threads)
    names = list(table) if args.subjects is None else [s.strip() for s in args.subjects.split(",")]
    out, log = Path(args.out), Path(tmp.name) / "servers.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine()
    rows = []
    with out.with_suffix(".jsonl").open("w") as f:
        for rnd in range(args.rounds):
            for n in args.clients:
                order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotated each round
                for name in order:
                    port = free_port()
                    proc = start(table[name](n, port), port, log)
                    try:
                        request(port, PROMPTS[0].format(name="warmup"), 16)
                        cpu0 = cpu_seconds(proc.pid)
                        m = measure(port, n, args.requests, args.max_tokens, f"r{rnd}")
                        cpu1 = cpu_seconds(proc.pid)
                        if cpu0 is not None and cpu1 is not None:  # the server's own work, whatever else runs
                            m["server_cpu_ms_per_token"] = 1000 * (cpu1 - cpu0) / m["tokens"]
                    finally:
                        stop(proc)
                    row = {"subject": name, "clients": n, "round": rnd, **m, "max_tokens": args.max_tokens,
                           "threads": args.threads, "machine": info}
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"round {rnd} clients {n} {name:<26} {m['aggregate_tps']:8.1f} tok/s  ttft p50 "
                          f"{m['ttft_p50_ms']:6.1f} ms  p99 {m['ttft_p99_ms']:6.1f} ms", flush=True)
    print(report(rows, args, info, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
