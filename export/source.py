"""What every exporter reads: a checkpoint opened and checked once (the tensor stream), its spec, and the
special token ids the formats record (one answer for the manifest, genai_config.json, npu_config.json and GGUF).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgephi import arch
from edgephi.formats.gguf import EOG_TEXTS
from edgephi.spec import PhiSpec
from edgephi.tokenizer import Tokenizer
from edgephi.weights import Checkpoint


@dataclass
class Source:
    directory: Path
    spec: PhiSpec
    tensors: Checkpoint  # opened and checked against spec
    bos_id: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # every id that ends a generation, sorted
    pad_id: int | None = None
    tokenizer: Tokenizer | None = None  # the checkpoint's, when it has one

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Source":
        """Parse config.json, open the safetensors and check every tensor the spec needs (layer count and shapes
        included), and that the tokenizer fits the model's vocabulary."""
        directory = Path(directory)
        spec = PhiSpec.from_hf_config(directory)
        tensors = Checkpoint(directory)
        tensors.check(spec)
        order = arch.get(spec.model_type).row_order(spec)
        src = cls(directory, spec, RowOrdered(tensors, order) if order else tensors)
        src._special_ids()
        return src

    def _special_ids(self) -> None:
        """From the tokenizer when the checkpoint has one (its stop ids include generation_config.json's eos and
        the chat turn ends), else from config.json."""
        spec = self.spec
        try:
            tok = Tokenizer.from_dir(self.directory)
        except FileNotFoundError:
            tok = None
        self.tokenizer = tok
        if tok is not None:
            if tok.vocab_size > spec.vocab_size:  # ids past the embedding table would fail only at run time
                raise ValueError(f"{self.directory}: the tokenizer ({tok.backend}) has {tok.vocab_size} tokens but "
                                 f"config.json's vocab_size is {spec.vocab_size}; it must be at most vocab_size")
            self.bos_id = tok.bos_id if tok.bos_id is not None else spec.bos_token_id
            # llama.cpp also stops on these tokens by their text: every format stops on the same set
            eog = {tok.token_to_id(t) for t in EOG_TEXTS} - {None}
            self.stop_ids = sorted(tok.stop_ids | set(spec.eos_token_id) | {i for i in eog if i < spec.vocab_size})
        else:
            self.bos_id, self.stop_ids = spec.bos_token_id, sorted(set(spec.eos_token_id))
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else (
            self.stop_ids[0] if self.stop_ids else None)

    @property
    def eos_ids(self) -> list[int]:
        """The stop ids with config.json's eos first (formats that keep one eos id take the first)."""
        first = [i for i in self.spec.eos_token_id if i in self.stop_ids]
        return list(dict.fromkeys(first + self.stop_ids))


class RowOrdered:
    """A checkpoint whose named tensors are read with their rows reordered (Architecture.row_order: row i of what
    read() returns is stored row order[i]); everything else is the Checkpoint's own."""

    def __init__(self, ckpt: Checkpoint, order: dict):
        self.ckpt, self.order = ckpt, order

    def __getattr__(self, name: str):
        return getattr(self.ckpt, name)

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        arr = self.ckpt.read(name, dtype)
        return arr if name not in self.order else arr[self.order[name]]

    def read_rows(self, name: str, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        if name not in self.order:
            return self.ckpt.read_rows(name, start, stop, dtype)
        rows = self.order[name][start:stop]
        lo = int(rows.min()) if len(rows) else 0  # one positioned read of the stored rows' span
        span = self.ckpt.read_rows(name, lo, int(rows.max()) + 1 if len(rows) else 0, dtype)
        return span[rows - lo]

    def read_blocks(self, name: str, *args, **kwargs):
        if name in self.order:
            raise NotImplementedError(f"{name}: stored values in order cannot be streamed with its rows reordered")
        return self.ckpt.read_blocks(name, *args, **kwargs)
