"""What every backend provides: a Session that appends tokens to its KV cache and returns logits.

Backends register with @register_backend; each says why it cannot run on this machine (or None), so that
selection, `edgephi devices` and --verbose all read the same answers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

BACKENDS: dict[str, type["Backend"]] = {}
DEVICES = ("cpu", "npu", "metal", "cuda")


class ContextFullError(ValueError):
    """The tokens do not fit in the context the session was opened with."""


class Session(ABC):
    """A model with a KV cache.  forward() appends tokens at positions n_past..; rewind() drops them."""

    n_ctx: int
    n_past: int = 0
    n_evaluated: int = 0  # tokens evaluated since the session opened (tests count the chat's reuse with it)

    @abstractmethod
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Evaluate ids after the cached ones; float32 logits of the last position (V,), or (T, V) if all_logits."""

    @abstractmethod
    def rewind(self, n: int) -> None:
        """Keep only the first n cached tokens."""

    def reset(self) -> None:
        self.rewind(0)

    def reusable(self, n: int) -> int:
        """The longest prefix <= n that rewind() keeps and continues from exactly: n, except in a ring buffer
        (kv_ring) that has dropped keys position n would see, where it is 0 (evaluate again)."""
        return n

    def check_ids(self, ids: Sequence[int], vocab_size: int | None) -> np.ndarray:
        """ids as int64 (T,), or ValueError: none given, not whole numbers, or outside 0..vocab_size-1 (an id past
        the embedding table would otherwise wrap around or read past it, depending on the backend)."""
        if type(ids) is list and ids and vocab_size is not None and \
                all(type(i) is int and 0 <= i < vocab_size for i in ids):  # a decode step's few ids: checked here
            return np.array(ids, dtype=np.int64)
        arr = np.asarray(ids)
        if arr.size == 0:
            raise ValueError("forward: no token ids given")
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"forward: token ids must be whole numbers, got {arr.dtype} values")
        arr = arr.astype(np.int64).reshape(-1)
        if vocab_size is not None:
            bad = arr[(arr < 0) | (arr >= vocab_size)]
            if bad.size:
                raise ValueError(f"forward: token id {int(bad[0])} is outside the vocabulary (0..{vocab_size - 1})"
                                 + (f"; {bad.size - 1} more" if bad.size > 1 else ""))
        return arr

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextFullError(f"context full: {self.n_past} cached + {n_new} new tokens > context length "
                                   f"{self.n_ctx}")

    def close(self) -> None:  # noqa: B027 - optional
        pass


class Backend(ABC):
    name: ClassVar[str]
    format: ClassVar[str]  # the bundle format it runs: onnx, gguf, coreml
    devices: ClassVar[tuple[str, ...]]  # devices it can drive, best first

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, probe: Any, device: str) -> str | None:
        """None if it can run on `device` here; otherwise why not (one line)."""

    @classmethod
    @abstractmethod
    def open(cls, bundle_dir: Path, manifest: Any, device: str, **options) -> Session:
        """A session on the model file this backend's format entry in the manifest names."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls
