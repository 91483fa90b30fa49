"""GGUF tokenizer metadata (tokenizer.ggml.*) from a Hugging Face checkpoint's tokenizer files.

Two llama.cpp tokenizer models cover the Phi family:

* "llama" (SentencePiece BPE with byte fallback): Phi-3/3.5-mini and Phi-3-medium.  Tokens, scores and types come
  from tokenizer.model; added tokens (tokenizer.json / tokenizer_config.json) become CONTROL (special) or
  USER_DEFINED; ids up to vocab_size that no tokenizer file names are padded as "[PAD<i>]" UNUSED, as llama.cpp's
  converter does (Phi-3's embedding has 32064 rows for 32011 tokens).
* "gpt2" (byte-level BPE): Phi-1/1.5/2 (CodeGen vocabulary), Phi-4 and Phi-4-reasoning (cl100k vocabulary) and
  Phi-4-mini(-reasoning) (o200k vocabulary).  Tokens come
  from tokenizer.json, merges and special ids through gguf.SpecialVocab, and the pre-tokenizer name (llama.cpp's
  regex set) is told from tokenizer.json's pre_tokenizer (PRE_TOKENIZERS below).

Special token ids and add_bos/add_eos are read by gguf.SpecialVocab (gguf-py's own reader of
tokenizer_config.json / special_tokens_map.json / config.json).  What llama.cpp must do as the other clients do:

* the chat template: the checkpoint's, or edgephi's fallback (export/tokenizer_files.py), always written;
* the stop set: llama.cpp stops on eos, eot, eom and on tokens it knows by their text (formats.gguf.EOG_TEXTS);
  the bundle's stop ids that it would not stop on become eot and eom;
* whitespace after special tokens (tokenizer.json's rstrip flags): llama.cpp has no per-token flag in GGUF; it
  strips after every special token but <unk>, <s>, <|endoftext|> exactly when general.name names Phi-3
  (formats.gguf.RSTRIP_NAMES), as Phi-3's own flags say, and nowhere otherwise.  The name is chosen so that
  llama.cpp's rule equals the tokenizer's flags (model_name below).
"""
from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path

from edgephi.formats.gguf import EOG_TEXTS, RSTRIP_EXCEPT, RSTRIP_NAMES
from edgephi.spec import PhiSpec

log = logging.getLogger(__name__)

# gguf.TokenType values (== sentencepiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# First characters of the Split regex of GPT-4o's o200k tokenizer (Phi-4-mini ships it) -> llama.cpp's name.
_O200K_PREFIX = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
# ... and of GPT-4's cl100k tokenizer (Phi-4, Phi-4-reasoning)
_CL100K_PREFIX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
# (what tokenizer.json's pre_tokenizer looks like, model_type) -> llama.cpp tokenizer.ggml.pre
PRE_TOKENIZERS = {
    ("bytelevel-gpt2-regex", "phi"): "phi-2",  # Phi-1/1.5/2: GPT-2's regex (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2)
    ("bytelevel-gpt2-regex", "phi3"): "gpt-2",
    ("split-o200k", "phi3"): "gpt-4o",  # Phi-4-mini(-reasoning)
    # Phi-4(-reasoning): convert_hf_to_gguf.py knows cl100k tokenizers by the hash of their ids on its test text;
    # Phi-4's is DBRX's (a8594e3e...), so llama.cpp's own conversion names it "dbrx" (cl100k's regex)
    ("split-cl100k", "phi3"): "dbrx",
}


def _read_json(path: Path) -> dict:
    """The parsed file, read once per export (add_vocab clears the cache): Phi-4-mini's tokenizer.json is 11 MB and
    is consulted six times.  Callers only read the result."""
    st = path.stat()
    return _parse_json(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)
def _parse_json(path: str, mtime_ns: int, size: int) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def tokenizer_kind(ckpt_dir: Path) -> str:
    """ "gpt2" (byte-level BPE in tokenizer.json), "llama" (SentencePiece tokenizer.model) or "llama-json"
    (a SentencePiece-style BPE in tokenizer.json alone: "▁" for spaces, byte fallback)."""
    tj = ckpt_dir / "tokenizer.json"
    if tj.is_file() and _pre_tokenizer_shape(_read_json(tj).get("pre_tokenizer")) is not None:
        return "gpt2"
    if (ckpt_dir / "tokenizer.model").is_file():
        return "llama"
    if tj.is_file() and _is_spm_style_bpe(_read_json(tj)):
        return "llama-json"
    if tj.is_file():
        raise NotImplementedError(f"{tj}: neither a byte-level BPE tokenizer nor accompanied by tokenizer.model "
                                  "(SentencePiece); edgephi's GGUF export supports those two")
    raise FileNotFoundError(f"{ckpt_dir}: no tokenizer.json or tokenizer.model (GGUF files carry the tokenizer)")


def _is_spm_style_bpe(tok: dict) -> bool:
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in json.dumps(
        tok.get("normalizer"), ensure_ascii=False) + json.dumps(tok.get("pre_tokenizer"), ensure_ascii=False)


def _prepends_space(tok: dict) -> bool:
    """Whether the normalizer / pre-tokenizer puts a "▁" before the text (llama.cpp's add_space_prefix)."""
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"add_prefix_space": true' in text


def _spm_vocab_from_json(ckpt_dir: Path, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, types for llama.cpp's SentencePiece tokenizer from a BPE tokenizer.json.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the highest-scoring
    vocabulary piece; giving each piece the score -rank of the merge that creates it makes it apply the merges
    in the BPE model's order.
    """
    tj = ckpt_dir / "tokenizer.json"
    model = _read_json(tj)["model"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1e9] * n_vocab
    types = [UNUSED] * n_vocab
    rank = {}
    for r, m in enumerate(model.get("merges") or []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    unk = model.get("unk_token")
    for tok, i in model["vocab"].items():
        if i >= n_vocab:
            raise ValueError(f"{tj}: token {tok!r} has id {i} >= config.json vocab_size {n_vocab}")
        tokens[i], scores[i] = tok, -float(rank.get(tok, 0))
        is_byte = len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")
        types[i] = UNKNOWN if tok == unk else BYTE if is_byte else NORMAL
    for i, (content, special) in _added_tokens(ckpt_dir).items():
        if i >= n_vocab:
            raise ValueError(f"{tj}: added token {content!r} has id {i} >= config.json vocab_size {n_vocab}")
        tokens[i], scores[i] = content, 0.0
        types[i] = UNKNOWN if content == unk else CONTROL if special else USER_DEFINED
    return tokens, scores, types


def _pre_tokenizer_shape(pre) -> str | None:
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return "bytelevel-gpt2-regex" if pre.get("use_regex", True) else "bytelevel"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        for p in parts:
            pattern = (p.get("pattern") or {}).get("Regex", "") if p.get("type") == "Split" else ""
            if pattern.startswith(_O200K_PREFIX):
                return "split-o200k"
            if pattern.startswith(_CL100K_PREFIX):
                return "split-cl100k"
        if any(p.get("type") == "ByteLevel" for p in parts):
            return "bytelevel-other"
    return None


def _added_tokens(ckpt_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer_config.json's added_tokens_decoder and tokenizer.json."""
    out: dict[int, tuple[str, bool]] = {}
    cfg = ckpt_dir / "tokenizer_config.json"
    if cfg.is_file():
        for k, v in (_read_json(cfg).get("added_tokens_decoder") or {}).items():
            out[int(k)] = (v["content"], bool(v.get("special")))
    tj = ckpt_dir / "tokenizer.json"
    if tj.is_file():
        for v in _read_json(tj).get("added_tokens") or []:
            out[int(v["id"])] = (v["content"], bool(v.get("special")))
    return out


def _spm_vocab(ckpt_dir: Path, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromFile(str(ckpt_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise ValueError(f"{ckpt_dir / 'tokenizer.model'}: {sp.vocab_size()} pieces but config.json vocab_size is "
                         f"{n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    for i, (content, special) in sorted(_added_tokens(ckpt_dir).items()):
        if i >= n_vocab:
            log.warning("%s: added token %r has id %d >= vocab_size %d; left out", ckpt_dir, content, i, n_vocab)
            continue
        tokens[i], scores[i], types[i] = content, -1000.0, CONTROL if special else USER_DEFINED
    return tokens, scores, types


def _bpe_vocab(ckpt_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    tj = ckpt_dir / "tokenizer.json"
    vocab = _read_json(tj)["model"]["vocab"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for tok, i in vocab.items():
        if i >= n_vocab:
            raise ValueError(f"{tj}: token {tok!r} has id {i} >= config.json vocab_size {n_vocab}")
        tokens[i], types[i] = tok, NORMAL
    for i, (content, special) in _added_tokens(ckpt_dir).items():
        if i >= n_vocab:
            raise ValueError(f"{tj}: added token {content!r} has id {i} >= config.json vocab_size {n_vocab}")
        tokens[i], types[i] = content, CONTROL if special else USER_DEFINED
    return tokens, types


def pre_tokenizer_name(ckpt_dir: Path, spec: PhiSpec) -> str:
    tj = ckpt_dir / "tokenizer.json"
    shape = _pre_tokenizer_shape(_read_json(tj).get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get((shape, spec.model_type))
    if name is None:
        known = ", ".join(f"{s} ({m})" for s, m in PRE_TOKENIZERS)
        raise NotImplementedError(f"{tj}: pre_tokenizer of kind {shape!r} for model_type {spec.model_type!r} has no "
                                  f"known llama.cpp name (known: {known}); pass tokenizer_pre=<llama.cpp name>")
    return name


def _strip_flags(ckpt_dir: Path) -> tuple[set[str], set[str]]:
    """(tokens that swallow the whitespace after them, ... before them) from tokenizer.json's added tokens."""
    tj = ckpt_dir / "tokenizer.json"
    added = _read_json(tj).get("added_tokens") or [] if tj.is_file() else []
    cfg = ckpt_dir / "tokenizer_config.json"
    if cfg.is_file():
        decoder = _read_json(cfg).get("added_tokens_decoder")
        added = list(added) + list(decoder.values() if isinstance(decoder, dict) else [])
    entries = [a for a in added if isinstance(a, dict) and isinstance(a.get("content"), str)]
    return {a["content"] for a in entries if a.get("rstrip")}, {a["content"] for a in entries if a.get("lstrip")}


def model_name(name: str, ckpt_dir: Path, tokens: list[str], types: list[int]) -> str:
    """general.name for which llama.cpp strips whitespace after exactly the special tokens the tokenizer does."""
    rstrip, lstrip = _strip_flags(ckpt_dir)
    if lstrip:
        log.warning("%s: tokens %s strip the whitespace before them; llama.cpp's GGUF cannot say so, and its "
                    "tokenization of text next to them will differ", ckpt_dir, sorted(lstrip)[:4])
    names_phi3 = any(n in name.lower() for n in RSTRIP_NAMES)
    present = set(tokens)
    rule = {t for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)} | {"</s>"}
    rule -= set(RSTRIP_EXCEPT)
    possible = {"</s>", *RSTRIP_EXCEPT} <= present  # llama.cpp's rule looks these up and fails without them
    if rstrip and possible and rstrip & present == rule & present:
        return name if names_phi3 else f"{name} (phi3 tokenizer)"
    if rstrip:
        log.warning("%s: tokens %s strip the whitespace after them, which llama.cpp can only do for Phi-3's exact "
                    "set; its tokenization next to them will differ", ckpt_dir, sorted(rstrip)[:4])
    if names_phi3:  # llama.cpp would strip where this tokenizer does not: "Phi-3-mini" -> "Phi 3-mini"
        name = re.sub(r"(?i)(phi)-?3", r"\1 3", name)
    return name


def _stop_ids(writer, tokens: list[str], stop_ids: list[int], eos: int | None) -> None:
    """eot and eom for the stop ids llama.cpp would not end on by itself (eos and the EOG_TEXTS tokens)."""
    known = {i for i, t in enumerate(tokens) if t in EOG_TEXTS} | ({eos} if eos is not None else set())
    rest = sorted((i for i in stop_ids if i not in known), key=lambda i: tokens[i] != "<|end|>")
    if rest:
        writer.add_eot_token_id(rest[0])
    if len(rest) > 1:
        writer.add_eom_token_id(rest[1])
    if len(rest) > 2:
        log.warning("llama.cpp can be told at most three stop ids beyond its own; %s are left out", rest[2:])


def add_vocab(writer, src, tokenizer_pre: str | None = None) -> None:
    """Add tokenizer.ggml.*, the chat template and general.name to a GGUFWriter."""
    try:
        _add_vocab(writer, src, tokenizer_pre)
    finally:
        _parse_json.cache_clear()  # the parsed tokenizer files live for one export


def _add_vocab(writer, src, tokenizer_pre: str | None) -> None:
    import gguf

    from edgephi.chat_template import portable_template

    from .tokenizer_files import chat_template

    ckpt_dir, spec = src.directory, src.spec
    kind = tokenizer_kind(ckpt_dir)
    n_vocab = spec.vocab_size
    if kind in ("llama", "llama-json"):
        if kind == "llama":
            tokens, scores, types = _spm_vocab(ckpt_dir, n_vocab)
        else:
            tokens, scores, types = _spm_vocab_from_json(ckpt_dir, n_vocab)
            writer.add_add_space_prefix(_prepends_space(_read_json(ckpt_dir / "tokenizer.json")))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(tokenizer_pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        tokens, types = _bpe_vocab(ckpt_dir, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre or pre_tokenizer_name(ckpt_dir, spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    special = gguf.SpecialVocab(ckpt_dir, load_merges=(kind == "gpt2"), n_vocab=n_vocab)
    if spec.model_type == "phi" and "bos" not in special.add_special_token:
        special.add_special_token["bos"] = False  # Phi-1/1.5/2 were trained without a BOS token
    if not special.chat_template and chat_template(src):
        special.chat_template = chat_template(src)
    if isinstance(special.chat_template, str):  # llama-cpp-python's Jinja has no {% generation %} tag
        special.chat_template = portable_template(special.chat_template)
    special.add_to_gguf(writer, quiet=True)
    _stop_ids(writer, tokens, src.stop_ids, special.special_token_ids.get("eos"))
    writer.add_name(model_name(spec.name or arch_name(spec), ckpt_dir, tokens, types))


def arch_name(spec) -> str:
    from edgephi import arch

    return arch.get(spec.model_type).gguf_arch
