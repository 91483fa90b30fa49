"""Held-out quality of edgephi's default model: bits per byte and perplexity against ``xz -9``, plus greedy samples.

    nice -n 19 python benchmarks/eval_default_model.py [--model edgephi/data/default-model]

Held-out text: Python files of third-party packages installed in edgephi's virtualenv (HELDOUT below; none of
them is in the training data, which is CPython's standard library only).  Each file is scored on its own, starting
from <|endoftext|>, with transformers' Phi3ForCausalLM in the stored 16-bit weights (computed in fp32), windows of
``--window`` tokens sliding by half a window so every token after the first window sees at least half a window of
context.  bits/byte = total negative log-likelihood (bits) / UTF-8 bytes; perplexity is per token of this model's
tokenizer.  The peer, ``xz -9``, compresses each file on its own (the same information the model gets); xz on all
files concatenated is reported too.  Writes benchmarks/results/default_model_quality.md and .json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / ".venv" / "lib" / "python3.11" / "site-packages"
HELDOUT = [  # (package, version, licence, file)
    ("packaging", "26.3", "Apache-2.0 OR BSD-2-Clause", "packaging/requirements.py"),
    ("packaging", "26.3", "Apache-2.0 OR BSD-2-Clause", "packaging/utils.py"),
    ("click", "8.5.1", "BSD-3-Clause", "click/formatting.py"),
    ("click", "8.5.1", "BSD-3-Clause", "click/exceptions.py"),
    ("jinja2", "3.1.6", "BSD-3-Clause", "jinja2/bccache.py"),
    ("jinja2", "3.1.6", "BSD-3-Clause", "jinja2/utils.py"),
]
# No prompt ends with its line break: the tokenizer keeps a line break with the indentation after it
# ("\n▁▁▁▁" is one piece), so a prompt ending in "\n" would end on a piece boundary that training seldom shows.
PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:",
           "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\""]


def xz_size(data: bytes) -> int:
    """Size of ``xz -9`` output (the xz binary when present, else Python's lzma with the same preset)."""
    try:
        return len(subprocess.run(["xz", "-9", "-c"], input=data, capture_output=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        import lzma
        return len(lzma.compress(data, preset=9))


@torch.no_grad()
def nll_nats(model, ids: list[int], window: int) -> tuple[float, int]:
    """Sum of -log p(ids[i] | ids[:i]) for i >= 1 (ids[0] is the <|endoftext|> context), and the count."""
    x = torch.tensor(ids, dtype=torch.long)
    total, count, done = 0.0, 0, 1  # ids[:done] are scored (ids[0] is context only)
    stride = window // 2
    while done < len(ids):
        start = max(0, done - (window - stride) if done > 1 else 0)
        end = min(len(ids), start + window)
        logits = model(input_ids=x[None, start:end]).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = x[start + 1:end]
        lp = logp.gather(1, targets[:, None])[:, 0]  # lp[j] = log p(x[start+1+j])
        new = lp[done - start - 1:]
        total -= new.sum().item()
        count += new.numel()
        done = end
    return total, count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "edgephi" / "data" / "default-model")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", type=int, default=len(HELDOUT), help="score only the first N held-out files")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    stored = json.loads((args.model / "config.json").read_text()).get("dtype") or "float16"
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    rows, tot_nll, tot_tok, tot_bytes, tot_xz, texts = [], 0.0, 0, 0, 0, []
    for pkg, ver, lic, rel in HELDOUT[:args.files]:
        text = (SITE / rel).read_text(encoding="utf-8")
        texts.append(text)
        raw = text.encode("utf-8")
        ids = [eot] + tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[1:]) == text, f"{rel}: tokenizer does not round-trip"
        nll, n = nll_nats(model, ids, args.window)
        xz = xz_size(raw)
        rows.append({"file": rel, "package": f"{pkg} {ver}", "licence": lic, "bytes": len(raw), "tokens": n,
                     "model_bits_per_byte": round(nll / math.log(2) / len(raw), 4),
                     "xz9_bits_per_byte": round(8 * xz / len(raw), 4),
                     "perplexity": round(math.exp(nll / n), 3)})
        print(rows[-1], flush=True)
        tot_nll, tot_tok, tot_bytes, tot_xz = tot_nll + nll, tot_tok + n, tot_bytes + len(raw), tot_xz + xz
    xz_concat = xz_size("".join(texts).encode("utf-8"))
    summary = {
        "bytes": tot_bytes, "tokens": tot_tok, "bytes_per_token": round(tot_bytes / tot_tok, 3),
        "model_bits_per_byte": round(tot_nll / math.log(2) / tot_bytes, 4),
        "xz9_bits_per_byte_per_file": round(8 * tot_xz / tot_bytes, 4),
        "xz9_bits_per_byte_concatenated": round(8 * xz_concat / tot_bytes, 4),
        "perplexity_per_token": round(math.exp(tot_nll / tot_tok), 3),
        "nats_per_token": round(tot_nll / tot_tok, 4),
    }
    # per file is the fair match (the model scores each file on its own); concatenated lets xz reuse other files
    summary["model_beats_xz9_per_file"] = summary["model_bits_per_byte"] < summary["xz9_bits_per_byte_per_file"]
    summary["model_beats_xz9_concatenated"] = (summary["model_bits_per_byte"]
                                               < summary["xz9_bits_per_byte_concatenated"])
    samples = []
    for p in PROMPTS:
        enc = tok(p, return_tensors="pt")  # adds <|endoftext|> in front, as in training
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=[eot, tok.convert_tokens_to_ids("<|end|>")], pad_token_id=eot)
        samples.append({"prompt": p, "continuation": tok.decode(out[0, enc["input_ids"].shape[1]:],
                                                                skip_special_tokens=False)})
        print(repr(p + samples[-1]["continuation"]), flush=True)
    training = {}
    if (args.model / "training.json").is_file():
        training = json.loads((args.model / "training.json").read_text())
    result = {
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "stored_dtype": stored, "eval_dtype": "float32 (weights as stored)", "window": args.window,
        "summary": summary, "files": rows, "samples": samples, "training": training,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "seconds": round(time.time() - t0, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "default_model_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "default_model_quality.md").write_text(markdown(result))
    print(json.dumps(summary, indent=2))
    return 0


def markdown(r: dict) -> str:
    s, t = r["summary"], r["training"]
    lines = [
        "# Default model: held-out quality", "",
        f"Model `{r['model']}` ({r['stored_dtype']} stored, scored in {r['eval_dtype']}), "
        f"window {r['window']} tokens sliding by half. Command: `{r['command']}`; {r['machine']}.", "",
        "Held-out text: Python files of third-party packages (never in training, which is CPython's stdlib only), "
        "each file scored on its own from `<|endoftext|>`. xz: `xz -9`, each file compressed on its own "
        "(and, for reference, all files concatenated).", "",
        "| | bits / byte |", "|---|---|",
        f"| **default model** | **{s['model_bits_per_byte']:.3f}** |",
        f"| xz -9, per file | {s['xz9_bits_per_byte_per_file']:.3f} |",
        f"| xz -9, concatenated | {s['xz9_bits_per_byte_concatenated']:.3f} |", "",
        f"Perplexity {s['perplexity_per_token']:.2f} per token ({s['nats_per_token']:.3f} nats/token, "
        f"{s['bytes_per_token']:.2f} bytes/token; {s['tokens']} tokens, {s['bytes']} bytes). "
        f"Model beats xz -9 per file (the fair match): **{'yes' if s['model_beats_xz9_per_file'] else 'NO'}**; "
        f"beats xz -9 on all files concatenated: **{'yes' if s['model_beats_xz9_concatenated'] else 'no'}**.", "",
        "| file | package | licence | bytes | tokens | model bpb | xz -9 bpb | ppl |", "|---|---|---|---|---|---|---|---|",
    ]
    for f in r["files"]:
        lines.append(f"| {f['file']} | {f['package']} | {f['licence']} | {f['bytes']} | {f['tokens']} | "
                     f"{f['model_bits_per_byte']:.3f} | {f['xz9_bits_per_byte']:.3f} | {f['perplexity']:.2f} |")
    if t:
        lines += ["", f"Training: {t.get('steps')} steps, {t.get('tokens_seen')} tokens "
                      f"({t.get('epochs')} epochs), {t.get('train_seconds', 0) / 60:.1f} min on the CPU; "
                      f"final validation loss {t.get('final_val_loss_nats_per_token')} nats/token; "
                      f"model {t.get('model')}, vocab {t.get('vocab_size')}."]
    lines += ["", "## Greedy continuations", ""]
    for smp in r["samples"]:
        lines += ["```python", smp["prompt"] + smp["continuation"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
