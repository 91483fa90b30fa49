"""edgephi: run Microsoft's Phi small language models on the devices people own.

The runtime never imports torch; the heavy optional parts (llama-cpp-python, coremltools) load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .spec import PhiSpec  # noqa: E402  (light: stdlib only)

__all__ = ["PhiSpec", "__version__", "load"]


def load(path=None, device: str = "auto", format: str | None = None, **kwargs):
    """Load an exported bundle (default: the built-in model) on the best backend this device has."""
    from .api import load as _load

    return _load(path, device=device, format=format, **kwargs)
