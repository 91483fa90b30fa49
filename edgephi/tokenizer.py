"""Tokenizer for exported bundles and Hugging Face checkpoints: tokenizer.json (``tokenizers``) or tokenizer.model
(``sentencepiece``), special / added tokens, stop ids, chat template (sandboxed Jinja) and an exact incremental
detokenizer. Runtime module: no torch, no transformers.

Both backends encode and decode alike: added tokens (``<|user|>``…) are split out of the text first and each
remaining segment is encoded on its own (as ``tokenizers`` does), and decoding follows the Llama/Phi-3
tokenizer.json decoder chain (Replace "▁"→" ", ByteFallback, Fuse, Strip one leading space).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .chat_template import PHI3_CHAT_TEMPLATE, render
from .reasoning import CLOSE as _THINK_CLOSE, OPEN as _THINK_OPEN

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
BACKENDS = ("tokenizers", "sentencepiece")
# Tokens that end a turn in Phi-3 chat releases (eos differs between releases: 32000, 32007; some emit 32001).
CHAT_STOP_TOKENS = ("<|endoftext|>", "<|end|>", "<|assistant|>")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def spm_decode(pieces: list[str]) -> str:
    """The Llama/Phi-3 decoder chain on pieces: "▁"→" ", runs of <0xNN> pieces to UTF-8 (one U+FFFD per byte
    when a run is not valid UTF-8, like tokenizers' ByteFallback), join, strip one leading space."""
    out: list[str] = []
    run = bytearray()
    n_run = 0
    for piece in pieces:
        m = _BYTE_PIECE.match(piece)
        if m:
            run.append(int(m.group(1), 16))
            n_run += 1
            continue
        if n_run:
            out.append(_bytes_text(run, n_run))
            run, n_run = bytearray(), 0
        out.append(piece.replace(_SPM_SPACE, " "))
    if n_run:
        out.append(_bytes_text(run, n_run))
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text


def _bytes_text(run: bytearray, n: int) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * n


class _HFBackend:
    name = "tokenizers"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
            self.tok = _Tok.from_str(text)
        except Exception as e:  # JSON/Unicode errors, and tokenizers raises a plain Exception for a bad model
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        self.special = frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)


class _SPBackend:
    """sentencepiece for the model pieces; added tokens (from tokenizer_config.json) handled here."""

    name = "sentencepiece"

    def __init__(self, path: Path, added: dict[int, tuple[str, bool]],
                 strip: dict[str, tuple[bool, bool]] | None = None):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from e
        n = self.sp.get_piece_size()
        self.added = {i: c for i, (c, _) in added.items()}
        self.added_ids = {c: i for i, c in self.added.items()}
        self.special = frozenset({i for i, (_, s) in added.items() if s}
                                 | {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)})
        self.vocab_size = max([n] + [i + 1 for i in self.added])
        self.strip = strip or {}  # content -> (lstrip, rstrip): whitespace an added token swallows on each side
        alts = sorted(self.added_ids, key=lambda c: (-len(c), c))
        self.split_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def encode(self, text: str) -> list[int]:
        if self.split_re is None:
            return self.sp.encode(text)
        parts = self.split_re.split(text)  # text, token, text, token, ..., text
        ids: list[int] = []
        for k, seg in enumerate(parts):
            if k % 2:
                ids.append(self.added_ids[seg])
                continue
            if k > 0 and self.strip.get(parts[k - 1], (False, False))[1]:
                seg = seg.lstrip()  # the token before takes the whitespace after it (rstrip)
            if k + 1 < len(parts) and self.strip.get(parts[k + 1], (False, False))[0]:
                seg = seg.rstrip()  # the token after takes the whitespace before it (lstrip)
            if seg:
                ids.extend(self.sp.encode(seg))
        return ids

    def decode(self, ids, skip_special_tokens: bool) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special:
                continue
            piece = self.id_to_token(i)
            if piece is None:
                raise ValueError(f"token id {i} out of range: vocab_size is {self.vocab_size}")
            pieces.append(piece)
        return spm_decode(pieces)

    def id_to_token(self, i: int) -> str | None:
        if i in self.added:
            return self.added[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    def token_to_id(self, s: str) -> int | None:
        if s in self.added_ids:
            return self.added_ids[s]
        i = self.sp.piece_to_id(s)
        return None if self.sp.is_unknown(i) and s != self.sp.id_to_piece(i) else i


class Tokenizer:
    """Encode / decode / chat template for one tokenizer directory. Build with :meth:`from_dir`."""

    def __init__(self, backend, config: dict, generation_config: dict, path: Path):
        self._b = backend
        self._one: dict[tuple[int, bool], str] = {}  # decode_one's remembered pieces
        self._byte_ids: dict[int, bool] = {}  # is_byte_token's answers
        self.path = path
        self.config = config
        self.backend = backend.name
        self.vocab_size: int = backend.vocab_size
        self.special_ids: frozenset[int] = backend.special
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_id = self._id_or_none(self.bos_token)
        gen_eos = generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if any(not isinstance(i, int) for i in gen_eos):
            raise ValueError(f"{path}/generation_config.json: eos_token_id must be an int or a list of ints, "
                             f"got {generation_config.get('eos_token_id')!r}")
        self.eos_id = self._id_or_none(self.eos_token)
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        chat_stops = {self.token_to_id(t) for t in CHAT_STOP_TOKENS}
        self.stop_ids: frozenset[int] = frozenset(
            i for i in set(gen_eos) | {self.eos_id} | chat_stops if i is not None)
        add_bos = config.get("add_bos_token")
        if add_bos is None and backend.name == "tokenizers" and self.bos_id is not None:
            # no flag: follow tokenizer.json's post-processor
            add_bos = backend.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos_token = bool(add_bos) and self.bos_id is not None
        self.add_eos_token = bool(config.get("add_eos_token")) and self.eos_id is not None
        self.chat_template = _find_template(config, path)
        # <think> / </think> as special tokens: decoded even where special tokens are skipped (edgephi/reasoning.py)
        self.reasoning_ids: frozenset[int] = frozenset(
            i for i in map(self.token_to_id, (_THINK_OPEN, _THINK_CLOSE)) if i is not None and i in self.special_ids)

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path, prefer: str | None = None) -> "Tokenizer":
        """Load from a directory holding tokenizer.json and/or tokenizer.model (+ tokenizer_config.json,
        generation_config.json). ``prefer``: None (tokenizer.json first), "tokenizers" or "sentencepiece"."""
        path = Path(path)
        if prefer not in (None,) + BACKENDS:
            raise ValueError(f"prefer={prefer!r}: expected one of {(None,) + BACKENDS}")
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory (looked for {', '.join(TOKENIZER_FILES)})")
        wanted = {"tokenizers": ("tokenizer.json",), "sentencepiece": ("tokenizer.model",)}.get(prefer,
                                                                                              TOKENIZER_FILES)
        found = [name for name in wanted if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer file (looked for {', '.join(wanted)})")
        cfg_path, gen_path = path / "tokenizer_config.json", path / "generation_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        if found[0] == "tokenizer.json":
            backend = _HFBackend(path / "tokenizer.json")
        else:
            backend = _SPBackend(path / "tokenizer.model", _added_tokens(config, path), _strip_flags(config))
        log.debug("tokenizer %s: %s backend, vocab %d", path, backend.name, backend.vocab_size)
        return cls(backend, config, gen, path)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    # ------------------------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|user|>``) become their ids. With
        ``add_special_tokens`` BOS (EOS) is added when tokenizer_config.json says add_bos_token (add_eos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8, decoded with surrogateescape
            raise ValueError(f"text is not valid UTF-8 (U+{ord(text[e.start]):04X} at character {e.start})") from None
        ids = list(self._b.encode(text))
        if add_special_tokens:
            ids = [self.bos_id] * self.add_bos_token + ids + [self.eos_id] * self.add_eos_token
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._b.decode([int(i) for i in ids], skip_special_tokens)

    def decode_one(self, i: int, skip_special_tokens: bool = False) -> str:
        """decode([i]), remembered per id (the streaming detokenizer's window is one token after each emit)."""
        key = (i, skip_special_tokens)
        if key not in self._one:
            self._one[key] = self.decode([i], skip_special_tokens)
        return self._one[key]

    def id_to_token(self, i: int) -> str | None:
        return self._b.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self._b.token_to_id(s)

    def is_byte_token(self, i: int) -> bool:
        """True for a byte-fallback piece (``<0xE2>``); remembered per id (asked once per generated token)."""
        if i not in self._byte_ids:
            piece = self.id_to_token(i)
            self._byte_ids[i] = piece is not None and _BYTE_PIECE.match(piece) is not None
        return self._byte_ids[i]

    def detokenizer(self, skip_special_tokens: bool = False):
        """A StreamingDetokenizer (edgephi/detokenize.py): incremental decoding for streamed tokens."""
        from .detokenize import StreamingDetokenizer

        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ chat
    @property
    def effective_chat_template(self) -> str:
        """The checkpoint's chat template, or Phi-3's published one when it ships none (bundles carry it)."""
        return self.chat_template or PHI3_CHAT_TEMPLATE

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, **kwargs) -> str | list[int]:
        """transformers' ``apply_chat_template``: the conversation rendered with the chat template, as token ids
        (``tokenize=True``) or text.  Token ids are the text encoded without adding special tokens: the template
        writes the BOS itself when the model wants one (``{{ bos_token }}``), exactly as transformers does.
        ``continue_final_message`` cuts the text after the last message's content (to let the model continue it)."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt are mutually exclusive")
        text = render(self.effective_chat_template, conversation, where=f"{self.path}: chat template",
                      tools=tools, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        if continue_final_message:
            final = conversation[-1]["content"].strip() if conversation else ""
            if not final or final not in text:
                raise ValueError("continue_final_message: the final message does not appear in the rendered chat")
            text = text[: text.rindex(final) + len(final)]
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, backend={self.backend!r}, vocab_size={self.vocab_size})"


def _added_tokens(config: dict, path: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer_config.json's added_tokens_decoder and added_tokens.json."""
    added: dict[int, tuple[str, bool]] = {}
    extra = path / "added_tokens.json"
    if extra.is_file():
        tokens = _read_json(extra)
        if not isinstance(tokens, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in tokens.values()):
            raise ValueError(f"{extra}: expected {{token: id}} with non-negative integer ids, got {tokens!r:.80}")
        for content, i in tokens.items():
            added[i] = (content, True)
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ValueError(f"{path}/tokenizer_config.json: added_tokens_decoder is a {type(decoder).__name__}; "
                         "expected an object {id: {'content': str, 'special': bool, ...}}")
    for key, entry in decoder.items():
        content = _token_str(entry)
        if content is None or not isinstance(entry, dict) or not (key.isascii() and key.isdigit()):
            raise ValueError(f"{path}/tokenizer_config.json: added_tokens_decoder[{key!r:.40}] is not "
                             f"{{id: {{'content': str, ...}}}}")
        added[int(key)] = (content, bool(entry.get("special", True)))
    return added


def _strip_flags(config: dict) -> dict[str, tuple[bool, bool]]:
    """content -> (lstrip, rstrip) of the added tokens that swallow whitespace (tokenizer_config.json)."""
    decoder = config.get("added_tokens_decoder")
    entries = decoder.values() if isinstance(decoder, dict) else []
    return {e["content"]: (bool(e.get("lstrip")), bool(e.get("rstrip"))) for e in entries
            if isinstance(e, dict) and isinstance(e.get("content"), str) and (e.get("lstrip") or e.get("rstrip"))}


def _find_template(config: dict, path: Path) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is None and (path / "chat_template.jinja").is_file():
        tpl = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if tpl is not None and not isinstance(tpl, str):
        raise ValueError(f"{path}/tokenizer_config.json: chat_template must be a string, got {type(tpl).__name__}")
    return tpl
