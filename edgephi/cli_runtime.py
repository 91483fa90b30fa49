"""CLI flags of `run` and `chat` for speculative decoding, prompt caches, KV memory and min_tokens (the API's keyword
arguments: speculate=, prompt_cache= / Model.save_prompt_cache, kv_type=, kv_ring=, min_tokens=)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_runtime_flags(p) -> None:
    p.add_argument("--speculate", default=None, metavar="ngram|DRAFT_BUNDLE",
                   help="speculative decoding: 'ngram' drafts from the prompt and the text so far, or a draft "
                        "bundle with the same tokenizer (e.g. Phi-3-mini for Phi-3-medium); output is unchanged")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="load the prompt's saved KV state from FILE if it exists (refused unless saved from this "
                        "bundle and format), else save it there after evaluating the prompt (chat: the --system "
                        "prompt)")
    p.add_argument("--kv-type", default=None, choices=["f16", "q8_0", "f32", "int8"],
                   help="KV cache element type: q8_0 halves the gguf format's cache (llama.cpp); int8 quarters the "
                        "onnx format's float32 cache on the CPU (scales calibrated at load)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="the stop tokens cannot end the answer before N tokens (vLLM's min_tokens)")
    p.add_argument("--kv-ring", action="store_true",
                   help="sliding-window models keep only the window's keys (memory stops growing past it); "
                        "rewinds beyond the window recompute")


def load_options(args) -> dict:
    opts = {}
    if getattr(args, "kv_type", None):
        opts["kv_type"] = args.kv_type
    if getattr(args, "kv_ring", False):
        opts["kv_ring"] = True
    if getattr(args, "prompt_cache", None) and Path(args.prompt_cache).is_file():
        opts["prompt_cache"] = args.prompt_cache
    return opts


def gen_options(args) -> dict:
    opts = {"speculate": args.speculate} if getattr(args, "speculate", None) else {}
    if getattr(args, "min_tokens", 0):
        opts["min_tokens"] = args.min_tokens
    return opts


def prepare_prompt_cache(model, args, prompt: str | None, raw: bool) -> None:
    """--prompt-cache FILE that does not exist yet: evaluate the prefix now and save it (run: the whole prompt;
    chat: the system prompt).  A file that exists was loaded by edgephi.load (or refused there)."""
    path = getattr(args, "prompt_cache", None)
    if not path:
        return
    if Path(path).is_file():
        print(f"[prompt cache: {len(model._cached)} tokens from {path}]", file=sys.stderr, flush=True)
        return
    ids = prefix_ids(model, prompt, getattr(args, "system", None), raw)
    if not ids:
        print(f"[prompt cache: nothing to save in {path} (chat saves the --system prompt)]", file=sys.stderr,
              flush=True)
        return
    n = model.save_prompt_cache(path, ids)
    print(f"[prompt cache: {n} tokens saved to {path}]", file=sys.stderr, flush=True)


def prefix_ids(model, prompt: str | None, system: str | None, raw: bool) -> list[int]:
    """The token ids a run's prompt (or a chat's system prompt) starts with, as Model.stream/chat render them."""
    tok = model.tokenizer
    if raw or not tok.chat_template:
        return model.encode(prompt) if prompt is not None else []
    if system is None and prompt is None:
        return []
    system_msgs = [{"role": "system", "content": system}] if system is not None else []
    if prompt is not None:
        text = tok.apply_chat_template(system_msgs + [{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    # chat: what every conversation with this system prompt starts with
    from .generate import common_prefix

    a, b = ({"role": "user", "content": m} for m in ("a", "b"))
    one = tok.encode(tok.apply_chat_template(system_msgs + [a], add_generation_prompt=True, tokenize=False))
    two = tok.encode(tok.apply_chat_template(system_msgs + [b], add_generation_prompt=True, tokenize=False))
    return one[:common_prefix(one, two)]


def stats_suffix(r) -> str:
    drafted = getattr(r, "drafted_tokens", 0)
    return f", {r.accepted_tokens}/{drafted} drafts accepted" if drafted else ""


def with_prompt_cache(model, args):
    """The CLI's loaded model after --prompt-cache (run: the prompt; chat: the system prompt)."""
    prepare_prompt_cache(model, args, getattr(args, "prompt", None), getattr(args, "raw", False))
    return model
