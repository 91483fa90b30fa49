"""Exporter registry: one module per format, one decorator each.

An exporter is a function
    export(src: Source, out_dir: Path, *, bits: int, **options) -> FormatResult
that reads the checkpoint through ``src`` (export/source.py: the spec and the tensor stream, opened and checked
once by the bundle writer, which also watches the stream for progress) and writes its files into ``out_dir`` (a
fresh, empty directory inside the bundle being staged; the bundle writer renames the whole bundle into place only
when every format succeeded, so an exporter never needs its own temporary paths).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

EXPORTERS: dict[str, Callable[..., "FormatResult"]] = {}
# which bit widths each format accepts (filled in by register)
BITS: dict[str, tuple[int, ...]] = {}
# the Python modules each format needs to export (checked before a default export picks its formats)
REQUIRES: dict[str, tuple[str, ...]] = {}
# why each format cannot hold a given model (filled in by register)
REFUSES: dict[str, Callable[[Any], str | None]] = {}


@dataclass
class FormatResult:
    format: str
    files: list[str]  # paths relative to out_dir's parent (the bundle root), e.g. "gguf/model-q4_k_m.gguf"
    bits: int
    quant: str  # e.g. "q4_k_m", "int4-b32-sym", "f16"
    entry: str  # the file (or package) a backend opens, relative to the bundle root
    extra: dict[str, Any] = field(default_factory=dict)


def register(name: str, bits: tuple[int, ...], requires: tuple[str, ...] = (),
             refuses: Callable[[Any], str | None] | None = None):
    """requires: the Python modules the exporter needs (checked before a default export picks its formats);
    refuses(spec): why the format cannot hold this model (an op its lowering lacks, no llama.cpp graph), or None."""
    def deco(fn):
        EXPORTERS[name] = fn
        BITS[name] = bits
        REQUIRES[name] = requires
        REFUSES[name] = refuses or (lambda spec: None)
        return fn

    return deco


def load_all() -> None:
    """Import every exporter module so that its decorator runs (each imports its heavy deps lazily)."""
    import importlib

    for mod in ("gguf", "onnx", "coreml", "onnx_npu", "onnx_web"):
        try:
            importlib.import_module(f"edgephi.export.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"edgephi.export.{mod}":
                raise


def missing_modules(name: str) -> list[str]:
    import importlib.util

    return [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]


def refusal(name: str, spec) -> str | None:
    load_all()
    return REFUSES[name](spec) if name in REFUSES else None


def lowering_refuses(fmt: str, lowering: type):
    """refuses() for a format built by a lowering: the ops the model's architecture needs that it lacks."""
    def refuses(spec) -> str | None:
        from edgephi import arch

        missing = arch.missing_ops(lowering, spec)
        if missing:
            return (f"{arch.get(spec.model_type).description} needs {', '.join(missing)}, which the {fmt} export "
                    "cannot express yet")
        return None

    return refuses


def get(name: str) -> Callable[..., FormatResult]:
    load_all()
    if name not in EXPORTERS:
        raise ValueError(f"unknown export format {name!r}; available: {', '.join(sorted(EXPORTERS)) or 'none'}")
    return EXPORTERS[name]


def relpath(path: Path, out_dir: Path) -> str:
    """Bundle-relative name of a file an exporter wrote into out_dir."""
    return str(Path(out_dir.name) / Path(path).relative_to(out_dir))


@contextlib.contextmanager
def quiet_libraries(*loggers: str):
    """The libraries' own log lines (import-time warnings, version notes) only with --verbose: while exporting,
    the named loggers stay at ERROR unless edgephi logs at INFO."""
    if logging.getLogger("edgephi").isEnabledFor(logging.INFO):
        yield
        return
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
