"""Tokenizer folders of Phi-4 (cl100k_base) and Phi-4-mini (o200k_base) for the test checkpoints (test helper).

The BPE ranks are OpenAI's, as shipped in the PyPI package ``bpe-openai`` 0.1.4 (MIT; a test dependency in the
``dev`` extra): ``bpe_openai/data/cl100k_base.tiktoken.gz`` and ``bpe_openai/data/o200k_base.tiktoken.gz``, one
"base64(token bytes) rank" line per token.  Uncompressed, their SHA-256 are the hashes tiktoken pins for the same
files (RANKS below), checked on every load.  Only the data files are read; the package's code is not imported.

From the ranks this module writes what a Hugging Face release of these models ships: a byte-level BPE
tokenizer.json (vocab = the ranks; merges derived from them the standard way: each token is the merge of the two
parts that BPE with the lower ranks leaves of it, in rank order; the encoding's regex as a Split pre-tokenizer, then
ByteLevel without its own regex), the special tokens at their ids, tokenizer_config.json with
the chat template, special_tokens_map.json.  Where each special token, id and template comes from is said at its
table; tests/data/configs/README.md lists the sources.
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path

# encoding -> (SHA-256 of the uncompressed ranks file, number of ranks); hashes as pinned by tiktoken's openai_public
RANKS = {"cl100k_base": ("223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7", 100256),
         "o200k_base": ("446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d", 199998)}
# tiktoken's pre-tokenizer patterns for the two encodings
PATTERNS = {
    "cl100k_base": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "o200k_base": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""]),
}

# Phi-4 (microsoft/phi-4, Phi-4-reasoning): cl100k_base's 100256 ranks, then 96 added tokens up to id 100351
# (torchtune's PHI4_SPECIAL_TOKENS and .NET's Tiktoken Phi-4 table): <|dummy_0|> 100256, <|endoftext|> 100257,
# FIM 100258-100260, <|dummy_1..3|>, <|im_start|> 100264, <|im_end|> 100265, <|im_sep|> 100266, <|endofprompt|>
# 100276, and <|dummy_4|>..<|dummy_87|> in the other ids.  bos <|endoftext|>, eos <|im_end|>, pad <|dummy_85|>.
PHI4_NAMED = {100256: "<|dummy_0|>", 100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
              100260: "<|fim_suffix|>", 100261: "<|dummy_1|>", 100262: "<|dummy_2|>", 100263: "<|dummy_3|>",
              100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>"}
# microsoft/phi-4's published template (the revision with add_generation_prompt)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
PHI4_REASONING_SYSTEM = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracing, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "{Thought section} </think> {Solution section}. In the Thought section, detail your reasoning process in steps. "
    "Each step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion. Now, try to solve "
    "the following question through the above guidelines:")
# microsoft/Phi-4-reasoning(-plus)'s template: a fixed system prompt, then the turns; {% generation %} marks the
# assistant's tokens for transformers' return_assistant_tokens_mask
PHI4_REASONING_TEMPLATE = (
    "<|im_start|>system<|im_sep|>" + PHI4_REASONING_SYSTEM + "<|im_end|>"
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'}}"
    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")

# Phi-4-mini(-reasoning): o200k_base's 199998 ranks, <|endoftext|> 199999 and <|endofprompt|> 200018 (o200k_base's
# own specials), then Phi-4-mini's chat and tool tokens.  <|assistant|>, <|end|>, <|user|>, <|system|> ids as the
# issue states them; the tool tokens follow in the order the issue lists them (ids not checked against a published
# file).  bos = eos = pad = <|endoftext|> as in the published config.json.  Phi-4-mini-reasoning writes <think> and
# </think> as plain text (no added tokens for them are known).  The ids no table names (199998, 200000-200017) get
# "<|reserved_<id>|>" placeholders: tokenizers numbers added tokens without gaps.
PHI4_MINI_NAMED = {199999: "<|endoftext|>", 200018: "<|endofprompt|>", 200019: "<|assistant|>", 200020: "<|end|>",
                   200021: "<|user|>", 200022: "<|system|>", 200023: "<|tool|>", 200024: "<|/tool|>",
                   200025: "<|tool_call|>", 200026: "<|/tool_call|>", 200027: "<|tool_response|>"}
# microsoft/Phi-4-mini-reasoning's published template
PHI4_MINI_REASONING_TEMPLATE = (
    "{{ '<|system|>Your name is Phi, an AI math expert developed by Microsoft.' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %} {{ message['content'] }}"
    "{% if 'tools' in message and message['tools'] is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}"
    "{% endif %}{% endif %}{% endfor %}{{ '<|end|>' }}{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# Phi-3-small (microsoft/Phi-3-small-8k-instruct's tokenization_phi3_small.py): cl100k_base's ranks, its four
# specials at their ids, the chat tokens, <|dummy_id_N|> in every other id up to 100351 (vocab padded to 100352).
# bos = eos = <|endoftext|> (the tokenizer sets bos to eos).  No published chat template was found: none is written.
PHI3SMALL_NAMED = {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
                   100260: "<|fim_suffix|>", 100261: "<|system|>", 100262: "<|user|>", 100263: "<|assistant|>",
                   100264: "<|dummy_id_0|>", 100265: "<|dummy_id_1|>", 100266: "<|end|>", 100256: "<|dummy_id_2|>",
                   100276: "<|endofprompt|>", **{100264 + k: f"<|dummy_id_{k}|>" for k in range(3, 12)},
                   **{100276 + k: f"<|dummy_id_{11 + k}|>" for k in range(1, 76)}}

# kind -> (encoding, added tokens, chat template, bos, eos, pad)
KINDS = {
    "phi3small": ("cl100k_base", "phi3small", None, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    "phi4": ("cl100k_base", "phi4", PHI4_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|dummy_85|>"),
    "phi4-reasoning": ("cl100k_base", "phi4", PHI4_REASONING_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|dummy_85|>"),
    "phi4-mini-reasoning": ("o200k_base", "phi4-mini", PHI4_MINI_REASONING_TEMPLATE, "<|endoftext|>",
                            "<|endoftext|>", "<|endoftext|>"),
}


def _phi4_added() -> dict[int, str]:
    names = dict(PHI4_NAMED)
    free = [i for i in range(100267, 100352) if i not in names]
    names.update({i: f"<|dummy_{4 + k}|>" for k, i in enumerate(free)})  # <|dummy_4|> .. <|dummy_87|>
    return dict(sorted(names.items()))


def _phi4_mini_added() -> dict[int, str]:
    return {i: PHI4_MINI_NAMED.get(i, f"<|reserved_{i}|>") for i in range(199998, max(PHI4_MINI_NAMED) + 1)}


ADDED = {"phi4": _phi4_added, "phi4-mini": _phi4_mini_added, "phi3small": lambda: dict(sorted(PHI3SMALL_NAMED.items()))}


@functools.lru_cache(maxsize=2)
def load_ranks(encoding: str) -> dict[bytes, int]:
    """token bytes -> rank, from bpe-openai's data file, checked against tiktoken's hash."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package bpe-openai (dev extra) is not installed: it ships the BPE ranks")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{encoding}.tiktoken.gz"
    raw = gzip.decompress(path.read_bytes())
    want, n = RANKS[encoding]
    if hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"{path}: SHA-256 of the ranks is not tiktoken's {want}")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: expected ranks 0..{n - 1}")
    return ranks


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(extra)}}


def _parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE of ``token`` with the merges of rank below ``max_rank`` only."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        parts[best[0]:best[0] + 2] = [parts[best[0]] + parts[best[0] + 1]]


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The standard derivation (as tiktoken-to-Hugging-Face conversions do it): each multi-byte token, in rank
    order, is the merge of the two parts that BPE with the lower ranks leaves of it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
            merges.append((parts[0], parts[1]))
    return merges


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEPHI_TEST_CACHE") or Path.home() / ".cache" / "edgephi" / "test-tokenizers")


@functools.lru_cache(maxsize=3)
def tokenizer_json(kind: str) -> str:
    """The tokenizer.json text of ``kind``; built once (about 15 s for o200k) and kept in a cache folder keyed by
    this module's source and the ranks' hash (EDGEPHI_TEST_CACHE, default ~/.cache/edgephi/test-tokenizers)."""
    key = hashlib.sha256(Path(__file__).read_bytes() + RANKS[KINDS[kind][0]][0].encode()).hexdigest()[:16]
    cached = _cache_dir() / f"{kind}-{key}.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    out = _build_tokenizer_json(kind)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(out, encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:  # a read-only home only costs the rebuild
        pass
    return out


def _build_tokenizer_json(kind: str) -> str:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    encoding, added_kind, *_ = KINDS[kind]
    ranks = load_ranks(encoding)
    b2u = byte_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    tok = Tokenizer(BPE(vocab=vocab, merges=[(text(a), text(b)) for a, b in _merges(ranks)], fuse_unk=False,
                        byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[encoding]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    obj = json.loads(tok.to_str())
    obj["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, c in ADDED[added_kind]().items()]
    out = json.dumps(obj, ensure_ascii=False)
    check = Tokenizer.from_str(out)
    for i, c in ADDED[added_kind]().items():
        if check.token_to_id(c) != i:
            raise ValueError(f"{kind}: added token {c!r} got id {check.token_to_id(c)}, wanted {i}")
    return out


def _files(kind: str) -> dict[str, str]:
    encoding, added_kind, template, bos, eos, pad = KINDS[kind]
    decoder = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, c in ADDED[added_kind]().items()}
    config = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
              "added_tokens_decoder": decoder, "bos_token": bos, **({"chat_template": template} if template else {}),
              "clean_up_tokenization_spaces": False, "eos_token": eos, "extra_special_tokens": {},
              "model_max_length": 16384 if encoding == "cl100k_base" else 131072, "pad_token": pad,
              # the releases say GPT2Tokenizer (llama.cpp's converter reads it); the generic class makes
              # transformers 5 use tokenizer.json as written instead of rebuilding GPT-2's pre-tokenizer
              "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<|endoftext|>"}
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": "<|endoftext|>"}
    return {"tokenizer.json": tokenizer_json(kind),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def write_tokenizer(out_dir, kind: str) -> Path:
    """Write the tokenizer folder of ``kind`` ("phi4", "phi4-reasoning", "phi4-mini-reasoning") into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in _files(kind).items():
        (out / name).write_text(text, encoding="utf-8")
    return out
