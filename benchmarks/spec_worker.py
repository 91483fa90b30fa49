"""One measurement of benchmarks/bench_speculate.py in its own process (peak RSS is this subject's alone); prints
one line "BENCH_JSON {...}".

    python -m edgephi.benchmarks.spec_worker TASK --runner RUNNER --path PATH [options]

tasks:   verify  (edgephi): cost of one forward of 1 + k tokens after a context, k = 0..16, and decode tok/s with
                 drafts replayed from a greedy run and corrupted at set rates
         tasks   (any runner): greedy generation on input-grounded prompts, plain or with the runner's own speculation
         ttft    (edgephi, llamacpp): time to first token after a saved prefix, against recomputing it
         memory  (any runner): peak RSS after filling --n-ctx tokens of context
runners: edgephi (edgephi.load, --format), llamacpp (llama-cpp-python on the same .gguf; speculation: its
         LlamaPromptLookupDecoding), genai (onnxruntime-genai 0.18 on the same onnx/ folder; speculation: its
         n-gram speculative decoding, set_speculative_options(ngram_size, max_draft_tokens)).
Timed sections contain only the engine's work.  In tasks the stop tokens cannot be drawn (edgephi's min_tokens,
onnxruntime-genai's min_length, a logits processor in llama.cpp), so all engines write the same text; elsewhere EOS
is ignored.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from .bench_worker import peak_rss_mb, prompt_ids


# ---- generation through each engine: gen(ids, n, spec) -> (ttft_s, decode_tps, tokens, extra) ----------------------
def edgephi_engine(a):
    import edgephi

    opts = {"threads": a.threads, "n_ctx": a.n_ctx, **dict(kv.split("=", 1) for kv in a.load_option)}
    for k in ("kv_ring",):
        if k in opts:
            opts[k] = opts[k] not in ("0", "false", "False")
    model = edgephi.load(a.path, device="cpu", format=a.format, **opts)

    def gen(ids, n, spec, **kw):
        model.session.rewind(0)  # from an empty cache, as the peers (reset) do
        model._cached = []
        last, toks = None, []
        for r in model.stream(ids, max_tokens=n, min_tokens=n, speculate="ngram" if spec else None, **kw):
            if r.token is not None:
                toks.append(r.token)
            last = r
        return last.ttft, last.generation_tps, toks, {"drafted": last.drafted_tokens,
                                                      "accepted": last.accepted_tokens}

    return model, gen


def llamacpp_engine(a):
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    kw = dict(n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.n_ctx, n_batch=512, verbose=False)
    for kv in a.load_option:
        k, _, v = kv.partition("=")
        kw[k] = int(v) if v.isdigit() else v
    plain = Llama(model_path=a.path, **kw)
    spec = None
    stops = np.asarray(a.stop_ids, dtype=np.int64)

    def hold(_ids, scores):  # the stop tokens cannot be drawn (llama.cpp's --ignore-eos; edgephi's min_tokens)
        scores[stops] = -np.inf
        return scores

    def gen(ids, n, use_spec):
        nonlocal spec
        llm = plain
        if use_spec:
            if spec is None:  # the peer's own prompt lookup (defaults of llama-cpp-python 0.3.36)
                spec = Llama(model_path=a.path, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), **kw)
            llm = spec
        llm.reset()
        toks, t0 = [], time.perf_counter()
        t1 = None
        for tok in llm.generate(ids, top_k=1, temp=0.0, min_p=0.0, top_p=1.0, reset=True,
                                logits_processor=llama_cpp.LogitsProcessorList([hold]) if len(stops) else None):
            if t1 is None:
                t1 = time.perf_counter()
            toks.append(int(tok))
            if len(toks) >= n:
                break
        t2 = time.perf_counter()
        return t1 - t0, (len(toks) - 1) / (t2 - t1), toks, {}

    return (plain, llama_cpp), gen


def genai_engine(a):
    import onnxruntime_genai as og

    config = og.Config(a.path)
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def gen(ids, n, use_spec):
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        if use_spec:  # the peer's own n-gram speculation (onnxruntime-genai 0.18)
            params.set_speculative_options(ngram_size=a.genai_ngram, max_draft_tokens=a.genai_k)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        g.generate_next_token()
        t1 = time.perf_counter()
        while not g.is_done():
            g.generate_next_token()
        t2 = time.perf_counter()
        toks = [int(t) for t in g.get_sequence(0)[len(ids):]]
        extra = {}
        if use_spec:
            st = g.get_speculative_stats()
            extra = {"drafted": st.get("draft_tokens_evaluated"), "accepted": st.get("draft_tokens_accepted")}
        return t1 - t0, (len(toks) - 1) / (t2 - t1), toks, extra

    return model, gen


ENGINES = {"edgephi": edgephi_engine, "llamacpp": llamacpp_engine, "genai": genai_engine}


# ---- tasks -------------------------------------------------------------------------------------------------------
def task_tasks(a) -> dict:
    prompts = json.loads(open(a.prompts, encoding="utf-8").read())  # {name: ids}
    _, gen = ENGINES[a.runner](a)
    gen(next(iter(prompts.values())), 16, a.spec)  # warm-up
    out = {name: {"decode_tps_reps": []} for name in prompts}
    for _ in range(a.reps):  # a small model's answer takes milliseconds: the median of several, tasks interleaved
        for name, ids in prompts.items():
            ttft, tps, toks, extra = gen(ids, a.gen, a.spec)
            out[name].update({"ttft_s": ttft, "tokens": toks, **extra})
            out[name]["decode_tps_reps"].append(tps)
    for v in out.values():
        v["decode_tps"] = statistics.median(v["decode_tps_reps"])
    return {"tasks": out}


def planned_speculator():
    """A Speculator judging drafts against the reference run instead of the argmax: the same forwards, rewinds and
    processors, at exactly the replayed acceptance rate.  The random-weight shape checkpoint's logits have exact
    ties (its embedding rows repeat), which a multi-token kernel and a one-token kernel break differently, so the
    argmax rule would measure tie-breaking, not the mechanics."""
    import numpy as np

    from edgephi.speculate import Speculator

    class Planned(Speculator):
        def __init__(self, reference, prefix_len, drafter, **kw):
            super().__init__(drafter, **kw)
            self.ref, self.prefix_len, self.pos = list(reference), prefix_len, 0

        def _want(self, i: int, logits) -> int:
            best = int(np.argmax(logits))  # the greedy rule's work, then the reference's token
            return self.ref[i] if i < len(self.ref) else best

        def sample(self, logits) -> int:  # plain steps (and the first token)
            self.pos += 1
            return self._want(self.pos - 1, logits)

        def _judge(self, tokens, drafts, q, rows, processors):
            i0, out, ctx = len(tokens) - self.prefix_len, [], list(tokens)
            for i in range(len(drafts) + 1):
                logits = rows[i]
                for proc in processors:
                    logits = proc(ctx, logits)
                tok = self._want(i0 + i, logits)
                out.append((tok, logits))
                ctx.append(tok)
                if i == len(drafts) or drafts[i] != tok:
                    break
            self.pos = i0 + len(out)
            return out

    return Planned


def task_verify(a) -> dict:
    """Per round: each k's forward cost (k + 1 tokens after a context), then each acceptance setting's decode."""
    from edgephi.drafters import NgramDrafter, ReplayDrafter
    from edgephi.generate import stream
    from edgephi.speculate import Speculator

    PlannedSpeculator = planned_speculator()
    model, _ = edgephi_engine(a)
    s = model.session
    ctx = prompt_ids(a.context, 0, a.vocab_lo, a.vocab_hi)
    s.forward(ctx)
    ks = list(range(0, a.k_max + 1))
    costs: dict[int, list[float]] = {k: [] for k in ks}
    x = prompt_ids(a.k_max + 1, 1, a.vocab_lo, a.vocab_hi)
    s.forward(x[:2])  # warm-up of a multi-token call
    s.rewind(len(ctx))
    plain = [r.token for r in stream(s, model.tokenizer, ctx, max_tokens=a.gen, cached=ctx[:-1])
             if r.token is not None]
    misses = [float(m) for m in a.misses.split(",")]
    runs: dict[str, dict[str, list]] = {str(m): {"tps": [], "acceptance": [], "k_mean": []} for m in misses}
    runs["plain"] = {"tps": []}
    runs["ngram"] = {"tps": [], "acceptance": [], "k_mean": []}
    for rnd in range(a.rounds):
        for k in ks[rnd % len(ks):] + ks[:rnd % len(ks)]:  # rotated
            s.rewind(len(ctx))
            t0 = time.perf_counter()
            s.forward(x[:k + 1], all_logits=True)
            costs[k].append(time.perf_counter() - t0)
        order = ["plain", "ngram"] + [str(m) for m in misses]
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for key in order:
            s.rewind(len(ctx) - 1)
            if key == "plain":
                spec = None
            elif key == "ngram":  # prompt lookup on free text of random weights: drafts (almost) never hit
                spec = Speculator(NgramDrafter(), k=a.k0, k_max=a.k_max)
            else:
                spec = PlannedSpeculator(plain, len(ctx), ReplayDrafter(len(ctx), plain, miss=float(key), seed=rnd,
                                                                        vocab=a.vocab_hi), k=a.k0, k_max=a.k_max)
            last = None
            for r in stream(s, model.tokenizer, ctx, max_tokens=a.gen, cached=ctx[:-1], speculator=spec,
                            **({"sampler": spec.sample} if isinstance(spec, PlannedSpeculator) else {})):
                last = r
            runs[key]["tps"].append(last.generation_tps)
            if spec is not None:
                st = spec.stats
                runs[key]["acceptance"].append(st.accepted / max(1, st.drafted))
                runs[key]["k_mean"].append(st.drafted / max(1, st.rounds))
    return {"verify_s": {str(k): v for k, v in costs.items()}, "decode": runs, "context": a.context}


def task_ttft(a) -> dict:
    """Recompute a prefix + question vs load its saved state (file in the page cache) + the question."""
    prefix = prompt_ids(a.context, 0, a.vocab_lo, a.vocab_hi)
    question = prompt_ids(16, 1, a.vocab_lo, a.vocab_hi)
    res = {"recompute_s": [], "saved_s": [], "state_mb": None}
    if a.runner == "edgephi":
        model, _ = edgephi_engine(a)
        model.save_prompt_cache(a.cache_file, prefix)
        import os

        res["state_mb"] = os.path.getsize(a.cache_file) / 2**20

        def first(load: bool) -> float:
            model.reset()
            model.session.rewind(0)
            model._cached = []
            t0 = time.perf_counter()
            if load:
                model.load_prompt_cache(a.cache_file)
            next(r for r in model.stream(prefix + question, max_tokens=1, ignore_eos=True))
            return time.perf_counter() - t0
    else:  # llama.cpp's own state save / load (llama_state_save_file / load_file via llama-cpp-python)
        import llama_cpp

        (llm, ll), _ = llamacpp_engine(a)
        llm.reset()
        llm.eval(prefix)
        state = llm.save_state()
        import pickle

        with open(a.cache_file, "wb") as f:
            pickle.dump(state, f)
        res["state_mb"] = state.llama_state_size / 2**20

        def first(load: bool) -> float:
            llm.reset()
            t0 = time.perf_counter()
            if load:
                with open(a.cache_file, "rb") as f:
                    llm.load_state(pickle.load(f))
                llm.eval(question)
            else:
                llm.eval(prefix + question)
            int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))
            return time.perf_counter() - t0
    for rnd in range(a.rounds):
        for load in ((True, False) if rnd % 2 == 0 else (False, True)):
            res["saved_s" if load else "recompute_s"].append(first(load))
    return res


def task_memory(a) -> dict:
    ids = prompt_ids(a.n_ctx - a.gen, 0, a.vocab_lo, a.vocab_hi)
    _, gen = ENGINES[a.runner](a)
    t0 = time.perf_counter()
    _, tps, toks, _ = gen(ids, a.gen, False)
    return {"filled": len(ids) + len(toks), "seconds": time.perf_counter() - t0, "decode_tps": tps}


TASKS = {"tasks": task_tasks, "verify": task_verify, "ttft": task_ttft, "memory": task_memory}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgephi.benchmarks.spec_worker")
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--runner", default="edgephi", choices=sorted(ENGINES))
    ap.add_argument("--path", required=True)
    ap.add_argument("--format", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--load-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--spec", action="store_true", help="tasks: the runner's own speculation")
    ap.add_argument("--prompts", default=None, help="tasks: JSON file {name: token ids}")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1, help="tasks: runs of each prompt (decode_tps: their median)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k0", type=int, default=4)
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--misses", default="0,0.1,0.25,0.5,1")
    ap.add_argument("--cache-file", default=None)
    ap.add_argument("--stop-ids", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="tasks, llamacpp: token ids it may not draw (edgephi holds its own with min_tokens, "
                         "onnxruntime-genai its genai_config eos_token_id with min_length)")
    ap.add_argument("--genai-ngram", type=int, default=3)
    ap.add_argument("--genai-k", type=int, default=8)
    ap.add_argument("--vocab-lo", type=int, default=3)
    ap.add_argument("--vocab-hi", type=int, default=32000)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = {"task": a.task, "runner": a.runner, "path": a.path, "format": a.format, "spec": a.spec,
           "load_option": a.load_option, **TASKS[a.task](a), "seconds": time.perf_counter() - t0,
           "peak_rss_mb": peak_rss_mb()}
    sys.stdout.write("\nBENCH_JSON " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def median(xs):
    return statistics.median(xs) if xs else float("nan")


if __name__ == "__main__":
    sys.exit(main())
