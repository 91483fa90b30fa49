"""One benchmark subject in its own process, so that peak RSS is this subject's alone; prints one JSON line.

    python -m edgephi.benchmarks.bench_worker --runner edgephi --path BUNDLE --format onnx --prompt 128,512 --gen 128 \
        --runs 3 --threads 2 --vocab-lo 3 --vocab-hi 32000

runners: edgephi (edgephi.load on a bundle, format forced), llamacpp (llama-cpp-python directly on a .gguf file,
no edgephi code), genai (onnxruntime-genai directly on a directory with genai_config.json).

Every runner does the same: load (timed), one warm-up, then for each prompt length `runs` trials of
prefill of random prompt ids (the same ids for every runner: seeded by length and trial) and greedy decode of
`gen` tokens with EOS ignored.  ttft = prefill + first token; prefill tok/s = prompt / ttft; decode tok/s =
(gen - 1) / (time from the first token to the last), as edgephi's GenerationResponse counts them.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def prompt_ids(n: int, trial: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng([seed, n, trial + 1])  # trial -1 is the warm-up
    return rng.integers(lo, hi, size=n).tolist()


def peak_rss_mb() -> float:
    """This process's peak RSS since exec: VmHWM (ru_maxrss would also count the parent's pages copied at fork)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


# ---- runners: load(args) -> (run(ids, gen) -> (ttft, decode_tps, n_generated), info dict) ------------------------
def load_edgephi(a):
    import edgephi

    info_opts = {"threads": a.threads, "n_ctx": a.n_ctx}
    for kv in a.load_option:  # backend options, e.g. flash_attn=off for the llamacpp backend
        k, _, v = kv.partition("=")
        info_opts[k] = int(v) if v.lstrip("-").isdigit() else v
    model = edgephi.load(a.path, device="cpu", format=a.format, **info_opts)

    def run(ids, gen):
        last = None
        for r in model.stream(ids, max_tokens=gen, ignore_eos=True):
            if r.token is not None:
                last = r
        return last.ttft, last.generation_tps, last.generation_tokens

    return run, {"backend": model.backend, "device": model.device, "format": model.format,
                 "load_options": info_opts}


def load_llamacpp(a):
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=a.path, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.n_ctx, n_batch=512,
                verbose=False)
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def run(ids, gen):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = argmax_last()
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([tok])
            tok = argmax_last()
        t2 = time.perf_counter()
        return t1 - t0, (gen - 1) / (t2 - t1) if gen > 1 else 0.0, gen

    return run, {"backend": "llama-cpp-python", "device": "cpu", "format": "gguf",
                 "version": getattr(llama_cpp, "__version__", "?")}


def load_genai(a):
    import onnxruntime_genai as og

    config = og.Config(a.path)
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(ids, gen):
        params = og.GeneratorParams(model)
        n = len(ids) + gen
        params.set_search_options(max_length=n, min_length=n, do_sample=False)  # min_length: EOS never wins
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray(ids, dtype=np.int32))  # prefill: computes the prompt's logits
        g.generate_next_token()  # picks the first token
        t1 = time.perf_counter()
        k = 1
        while k < gen and not g.is_done():
            g.generate_next_token()  # one forward of the previous token, then the pick
            k += 1
        t2 = time.perf_counter()
        del g
        return t1 - t0, (k - 1) / (t2 - t1) if k > 1 else 0.0, k

    return run, {"backend": "onnxruntime-genai", "device": "cpu", "format": "onnx", "version": og.__version__}


RUNNERS = {"edgephi": load_edgephi, "llamacpp": load_llamacpp, "genai": load_genai}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgephi.benchmarks.bench_worker")
    ap.add_argument("--runner", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--path", required=True)
    ap.add_argument("--format", default=None, choices=["onnx", "gguf", "coreml"])
    ap.add_argument("--prompt", default="128,512")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--vocab-lo", type=int, default=3)
    ap.add_argument("--vocab-hi", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-option", action="append", default=[], metavar="KEY=VALUE",
                    help="edgephi runner: an option for edgephi.load (repeatable)")
    ap.add_argument("--trial", type=int, default=0, help="index of the first measured trial (its prompt ids)")
    ap.add_argument("--load-only", action="store_true", help="load and exit (primes caches: ONNX optimized graph)")
    a = ap.parse_args(argv)
    prompts = [int(p) for p in a.prompt.split(",") if p.strip()]

    t0 = time.perf_counter()
    run, info = RUNNERS[a.runner](a)
    out = {"runner": a.runner, "path": a.path, "load_s": time.perf_counter() - t0, **info,
           "rss_after_load_mb": _rss_now_mb()}
    if not a.load_only:
        run(prompt_ids(prompts[0], -1, a.vocab_lo, a.vocab_hi, a.seed), min(a.gen, 16))  # warm-up
        results = {}
        for p in prompts:
            r = {"ttft_s": [], "prefill_tps": [], "decode_tps": [], "generated": []}
            for t in range(a.trial, a.trial + a.runs):
                ttft, dec, n = run(prompt_ids(p, t, a.vocab_lo, a.vocab_hi, a.seed), a.gen)
                r["ttft_s"].append(ttft)
                r["prefill_tps"].append(p / ttft)
                r["decode_tps"].append(dec)
                r["generated"].append(n)
            results[str(p)] = r
        out["results"] = results
    out["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write("\nBENCH_JSON " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def _rss_now_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
