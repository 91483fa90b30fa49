"""Format contracts: what an exporter writes and a backend reads, written once per format.

export/<fmt>.py (the writer) and edgephi/backends/<backend>.py (the reader) both import their format's contract
and never each other.  A contract holds names and rules only (file names, config keys, I/O names, the compiled
targets): no graph building and no session driving.  The conventions every format shares are here:

* KV length: ``n_ctx`` is the number of positions a session's cache holds (preallocated where the format allows);
  ``context_length`` is the model's own (``max_position_embeddings``).  A session defaults to
  ``default_n_ctx(context_length)``: a 128k model's full cache would not fit a phone or a laptop.
* Sliding window: ``PhiSpec.effective_sliding_window`` (the query at p sees keys p - W < k <= p); each contract
  says how its format expresses it.
* Masks are additive with ``MASK_VALUE`` where a format builds its own mask: exp(-30000 + score) is 0 in float16
  and float16 holds -30000 exactly, where -inf upsets some compilers (Core ML, QNN).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

MASK_VALUE = -30000.0
DEFAULT_N_CTX = 4096
# The tokenizer files a bundle carries beside its models (copied from the checkpoint when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja")
# Bytes per KV-cache element a session of each format allocates (float32 for ONNX; float16 elsewhere).
KV_BYTES = {"onnx": 4, "web": 4}
# Every format a bundle may hold, with the module of its contract (edgephi.formats.<module>).
FORMATS = {"onnx": "onnx", "gguf": "gguf", "coreml": "coreml", "onnx-npu": "onnx_npu", "web": "onnx_web"}


def default_n_ctx(context_length: int) -> int:
    """The cache a session allocates when none is asked for."""
    return min(int(context_length), DEFAULT_N_CTX)


def check_n_ctx(n_ctx: int | None, context_length: int, who: str) -> int:
    """n_ctx as asked (None: the default), refused with the allowed range when it does not fit the model."""
    if n_ctx is None:
        return default_n_ctx(context_length)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 < n_ctx <= context_length:
        raise ValueError(f"{who}: n_ctx={n_ctx!r}: must be an integer from 1 to the model's context length "
                         f"{context_length}")
    return n_ctx


class FolderConfig:
    """Base of a format's JSON config (a dataclass) kept in the format's folder: ``save`` writes it, ``load`` reads
    it and runs ``check``; a missing or corrupt file is an error naming the file.  Subclasses set CONFIG (the file
    name) and FORMAT."""

    CONFIG: ClassVar[str]
    FORMAT: ClassVar[str]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / self.CONFIG
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    def check(self) -> None:
        """Raise KeyError, TypeError or ValueError where a field read back is unusable."""

    @classmethod
    def load(cls, folder: str | Path):
        path = Path(folder) / cls.CONFIG
        try:
            cfg = cls(**json.loads(path.read_text(encoding="utf-8")))
            cfg.check()
            return cfg
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (the {cls.FORMAT} exporter writes it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt {cls.FORMAT} config ({e.__class__.__name__}: {e})") from None
