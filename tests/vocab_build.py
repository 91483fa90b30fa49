"""Build Hugging Face style tokenizer directories from llama.cpp's vocab-only GGUF files (test helper).

The GGUF files in tests/data come from llama.cpp (MIT, see tests/data/LICENSE-llama.cpp) together with their
test vectors (*.inp / *.out). From them this module writes what a real Phi release ships:

* ``write_phi3_tokenizer``: Phi-3 (SentencePiece BPE with byte fallback, Llama-2 vocabulary + Phi-3 added tokens):
  tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json.
* ``write_gpt2_tokenizer``: Phi-1 / 1.5 / 2 (GPT-2 byte-level BPE + CodeGen's whitespace tokens):
  tokenizer.json, tokenizer_config.json, special_tokens_map.json.

Both are deterministic; the parsed vocabularies are cached per process so session fixtures stay fast.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

DATA = Path(__file__).resolve().parent / "data"
PHI3_VOCAB = DATA / "ggml-vocab-phi-3.gguf"
GPT2_VOCAB = DATA / "ggml-vocab-gpt-2.gguf"

# gguf.TokenType values (llama.cpp) == sentencepiece ModelProto.SentencePiece.Type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # "▁"

from edgephi.tokenizer import PHI3_CHAT_TEMPLATE  # noqa: E402  (the published Phi-3-mini template)
# Phi-3 added tokens: first and last id (taken by content from the gguf, checked there).
PHI3_ADDED = ("<|endoftext|>", "<|user|>")
# The release strips whitespace after these (tokenizer.json rstrip=true): </s> and every added token but
# <|endoftext|> (Phi-3-mini's tokenizer_config.json added_tokens_decoder).
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")
# CodeGen (and so Phi-1/1.5/2) whitespace tokens after <|endoftext|>: 31..2 spaces, then 9..2 tabs.
CODEGEN_WHITESPACE = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))


@functools.lru_cache(maxsize=4)
def _read_gguf_vocab(path: str) -> dict:
    reader = gguf.GGUFReader(path)

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens array")
    return {
        "model": field("tokenizer.ggml.model"),
        "tokens": tuple(tokens),
        "scores": tuple(field("tokenizer.ggml.scores", [0.0] * len(tokens))),
        "types": tuple(field("tokenizer.ggml.token_type", [NORMAL] * len(tokens))),
        "merges": tuple(field("tokenizer.ggml.merges", [])),
        "bos": field("tokenizer.ggml.bos_token_id"),
        "eos": field("tokenizer.ggml.eos_token_id"),
        "unk": field("tokenizer.ggml.unknown_token_id"),
        "pad": field("tokenizer.ggml.padding_token_id"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def _added_entry(content: str, special: bool, normalized: bool = False, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": rstrip,
            "single_word": False, "special": special}


# ----------------------------------------------------------------------------------------------- Phi-3 (SPM)

@functools.lru_cache(maxsize=2)
def _phi3_layout(path: str) -> dict:
    """Split the gguf vocab into the SentencePiece model part (ids < first added token) and the added tokens."""
    v = _read_gguf_vocab(path)
    tokens = v["tokens"]
    first, last = (tokens.index(t) for t in PHI3_ADDED)
    n_model = first  # 32000 in the real release: tokenizer.model holds the Llama-2 pieces only
    types = list(v["types"][:n_model])
    # llama.cpp's phi3 conversion marks <unk> CONTROL and </s> USER_DEFINED; SentencePiece (and the real
    # tokenizer.model) has <unk> UNKNOWN and <s>, </s> CONTROL.
    types[v["unk"]] = UNKNOWN
    for i in (v["bos"], tokens.index("</s>")):
        types[i] = CONTROL
    added = {i: tokens[i] for i in range(first, last + 1)}
    return {"tokens": tokens[:n_model], "scores": v["scores"][:n_model], "types": tuple(types), "added": added,
            "bos": v["bos"], "eos": tokens.index("</s>"), "unk": v["unk"], "add_bos": v["add_bos"]}


@functools.lru_cache(maxsize=2)
def _phi3_merges(path: str) -> tuple:
    """BPE merges equivalent to SentencePiece BPE: every split of a normal piece into two pieces of the vocab,
    ranked by the score of the merged piece (higher first); ties (same piece) by the ids of the two parts."""
    lay = _phi3_layout(path)
    vocab = {t: i for i, t in enumerate(lay["tokens"])}
    cands = []
    for i, (piece, score, typ) in enumerate(zip(lay["tokens"], lay["scores"], lay["types"])):
        if typ != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and lay["types"][ia] == NORMAL and lay["types"][ib] == NORMAL:
                cands.append((-score, i, ia, ib, a, b))
    cands.sort()
    return tuple((a, b) for *_, a, b in cands)


def _phi3_tokenizer_json(path: str) -> str:
    lay = _phi3_layout(path)
    vocab = {t: i for i, t in enumerate(lay["tokens"])}
    unk = lay["tokens"][lay["unk"]]
    bos = lay["tokens"][lay["bos"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=list(_phi3_merges(path)), unk_token=unk, fuse_unk=True,
                        byte_fallback=True))
    # SentencePiece's add_dummy_prefix + escape_whitespaces; a Metaspace pre-tokenizer would split on spaces,
    # which SentencePiece BPE does not do ("▁▁" etc. are pieces).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, lay["bos"])])
    tok.add_special_tokens([AddedToken(lay["tokens"][i], normalized=False, special=True,
                                       rstrip=lay["tokens"][i] not in PHI3_NO_RSTRIP)
                            for i in (lay["unk"], lay["bos"], lay["eos"])])
    for i, content in sorted(lay["added"].items()):  # ids are contiguous after the model vocab
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True,
                                           rstrip=content not in PHI3_NO_RSTRIP)])
        if tok.token_to_id(content) != i:
            raise ValueError(f"{path}: added token {content!r} got id {tok.token_to_id(content)}, gguf says {i}")
    return tok.to_str(pretty=True)


def _phi3_sentencepiece(path: str) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    lay = _phi3_layout(path)
    m = spm_pb2.ModelProto()
    for piece, score, typ in zip(lay["tokens"], lay["scores"], lay["types"]):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, typ
    ts = m.trainer_spec
    ts.model_type = spm_pb2.TrainerSpec.BPE
    ts.vocab_size = len(lay["tokens"])
    ts.byte_fallback = True
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = lay["unk"], lay["bos"], lay["eos"], -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString(deterministic=True)


@functools.lru_cache(maxsize=2)
def _phi3_files(path: str, with_sentencepiece: bool) -> dict:
    lay = _phi3_layout(path)
    tokens = lay["tokens"]
    ids = (lay["unk"], lay["bos"], lay["eos"]) + tuple(sorted(lay["added"]))
    names = {i: lay["added"].get(i) or tokens[i] for i in ids}
    decoder = {str(i): _added_entry(names[i], True, rstrip=names[i] not in PHI3_NO_RSTRIP) for i in ids}
    eos = "<|endoftext|>"
    config = {
        "add_bos_token": lay["add_bos"],
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": tokens[lay["bos"]],
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": eos,
        "padding_side": "left",
        "sp_model_kwargs": {},
        # The real release says LlamaTokenizer, but transformers 5 then rebuilds the pipeline with a Metaspace
        # pre-tokenizer (31/46 llama.cpp vectors); the generic class uses tokenizer.json as written (46/46).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": tokens[lay["unk"]],
        "use_default_system_prompt": False,
    }
    special = {"bos_token": tokens[lay["bos"]], "eos_token": eos, "pad_token": eos, "unk_token": tokens[lay["unk"]]}
    files = {
        "tokenizer.json": _phi3_tokenizer_json(path).encode("utf-8"),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode("utf-8"),
    }
    if with_sentencepiece:
        files["tokenizer.model"] = _phi3_sentencepiece(path)
    return files


def write_phi3_tokenizer(out_dir, vocab_gguf=PHI3_VOCAB, with_sentencepiece: bool = True) -> Path:
    """Write a Phi-3 (mini) tokenizer: tokenizer.json, tokenizer_config.json, special_tokens_map.json and,
    with ``with_sentencepiece``, tokenizer.model. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in _phi3_files(str(Path(vocab_gguf).resolve()), bool(with_sentencepiece)).items():
        (out / name).write_bytes(blob)
    return out


# --------------------------------------------------------------------------------------- GPT-2 / Phi-1/1.5/2

@functools.lru_cache(maxsize=4)
def _gpt2_files(path: str, codegen_whitespace: bool) -> dict:
    v = _read_gguf_vocab(path)
    if v["model"] != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {v['model']!r}, expected 'gpt2'")
    tokens = v["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in v["merges"]]
    eot = "<|endoftext|>"
    if vocab.get(eot) != 50256:
        raise ValueError(f"{path}: {eot} has id {vocab.get(eot)}, expected 50256")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(eot, normalized=False, special=True)])
    decoder = {"50256": _added_entry(eot, True)}
    if codegen_whitespace:
        for k, ws in enumerate(CODEGEN_WHITESPACE):
            tok.add_tokens([AddedToken(ws, normalized=True, special=False)])
            decoder[str(50257 + k)] = _added_entry(ws, False, normalized=True)
        if tok.token_to_id("\t\t") != 50294:
            raise ValueError(f"whitespace tokens misnumbered: '\\t\\t' -> {tok.token_to_id(chr(9) * 2)}")
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": eot,
        "clean_up_tokenization_spaces": True,
        "eos_token": eot,
        "model_max_length": 2048,
        "return_token_type_ids": False,
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": eot,
    }
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode("utf-8"),
    }


def write_gpt2_tokenizer(out_dir, vocab_gguf=GPT2_VOCAB, codegen_whitespace: bool = True) -> Path:
    """Write a Phi-1/1.5/2 style tokenizer (GPT-2 byte-level BPE; with ``codegen_whitespace`` CodeGen's 38
    whitespace tokens 50257..50294). No chat template (Phi-2 has none). Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in _gpt2_files(str(Path(vocab_gguf).resolve()), bool(codegen_whitespace)).items():
        (out / name).write_bytes(blob)
    return out


def read_vectors(vocab_gguf) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: (text, ids without BOS) per case, from ``<gguf>.inp`` / ``<gguf>.out``."""
    inp = Path(str(vocab_gguf) + ".inp").read_text(encoding="utf-8")
    out = Path(str(vocab_gguf) + ".out").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    if not inp.endswith(sep):
        raise ValueError(f"{vocab_gguf}.inp: expected to end with {sep!r}")
    texts = inp[: -len(sep)].split(sep)
    lines = out.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) != len(texts):
        raise ValueError(f"{vocab_gguf}: {len(texts)} inputs but {len(lines)} output lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]
