"""Exporter registry: one module per format, one decorator each.

An exporter is a function
    export(src: Source, out_dir: Path, *, bits: int, **options) -> FormatResult
that reads the checkpoint through ``src`` (export/source.py: the spec and the tensor stream, opened and checked
once by the bundle writer, which also watches the stream for progress) and writes its files into ``out_dir`` (a
fresh, empty directory inside the bundle being staged; the bundle writer renames the whole bundle into place only
when every format succeeded, so an exporter never needs its own temporary paths).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

EXPORTERS: dict[str, Callable[..., "FormatResult"]] = {}
# which bit widths each format accepts (filled in by register)
BITS: dict[str, tuple[int, ...]] = {}
# the Python modules each format needs to export (checked before a default export picks its formats)
REQUIRES: dict[str, tuple[str, ...]] = {}


@dataclass
class FormatResult:
    format: str
    files: list[str]  # paths relative to out_dir's parent (the bundle root), e.g. "gguf/model-q4_k_m.gguf"
    bits: int
    quant: str  # e.g. "q4_k_m", "int4-b32-sym", "f16"
    entry: str  # the file (or package) a backend opens, relative to the bundle root
    extra: dict[str, Any] = field(default_factory=dict)


def register(name: str, bits: tuple[int, ...], requires: tuple[str, ...] = ()):
    """requires: the Python modules the exporter needs (checked before a default export picks its formats)."""
    def deco(fn):
        EXPORTERS[name] = fn
        BITS[name] = bits
        REQUIRES[name] = requires
        return fn

    return deco


def load_all() -> None:
    """Import every exporter module so that its decorator runs (each imports its heavy deps lazily)."""
    import importlib

    for mod in ("gguf", "onnx", "coreml", "onnx_npu"):
        try:
            importlib.import_module(f"edgephi.export.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"edgephi.export.{mod}":
                raise


def missing_modules(name: str) -> list[str]:
    import importlib.util

    return [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]


def get(name: str) -> Callable[..., FormatResult]:
    load_all()
    if name not in EXPORTERS:
        raise ValueError(f"unknown export format {name!r}; available: {', '.join(sorted(EXPORTERS)) or 'none'}")
    return EXPORTERS[name]


def relpath(path: Path, out_dir: Path) -> str:
    """Bundle-relative name of a file an exporter wrote into out_dir."""
    return str(Path(out_dir.name) / Path(path).relative_to(out_dir))
