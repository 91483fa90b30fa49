"""What every exporter reads: a checkpoint opened and checked once (the tensor stream), its spec, and the
special token ids the formats record (one answer for the manifest, genai_config.json, npu_config.json and GGUF).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Source":
        """Parse config.json, open the safetensors and check every tensor the spec needs (shapes included)."""
        directory = Path(directory)
        spec = PhiSpec.from_hf_config(directory)
        tensors = Checkpoint(directory)
        tensors.check(spec)
        src = cls(directory, spec, tensors)
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
        if tok is not None:
            self.bos_id = tok.bos_id if tok.bos_id is not None else spec.bos_token_id
            self.stop_ids = sorted(tok.stop_ids | set(spec.eos_token_id))
        else:
            self.bos_id, self.stop_ids = spec.bos_token_id, sorted(set(spec.eos_token_id))
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else (
            self.stop_ids[0] if self.stop_ids else None)

    @property
    def eos_ids(self) -> list[int]:
        """The stop ids with config.json's eos first (formats that keep one eos id take the first)."""
        first = [i for i in self.spec.eos_token_id if i in self.stop_ids]
        return list(dict.fromkeys(first + self.stop_ids))
