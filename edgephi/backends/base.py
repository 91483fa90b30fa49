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
