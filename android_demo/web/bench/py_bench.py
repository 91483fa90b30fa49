"""The Python ONNX backend (edgephi/backends/onnx.py) on a web/ folder, timed as web_bench.mjs times the browser:
random prompt ids, EOS ignored, one warm-up, then RUNS trials of prefill PROMPT tokens + GEN greedy tokens.
Usage: py_bench.py FOLDER PROMPT GEN RUNS THREADS -> one JSON line per trial on stdout."""
import json
import sys
import time

import numpy as np

from edgephi.backends.onnx import OnnxSession


def main(folder, prompt, gen, runs, threads):
    sess = OnnxSession(folder, threads=threads, cache_optimized=False)
    vocab = sess.vocab
    ids = np.random.default_rng(0).integers(100, min(vocab, 30000), size=prompt).tolist()
    for trial in range(runs + 1):
        sess.rewind(0)
        t0 = time.perf_counter()
        logits = sess.forward(ids)
        t1 = time.perf_counter()
        for _ in range(gen):
            logits = sess.forward([int(np.argmax(logits))])
        t2 = time.perf_counter()
        if trial:  # trial 0 is the warm-up
            print(json.dumps({"prefill_tps": prompt / (t1 - t0), "decode_tps": gen / (t2 - t1)}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]))
