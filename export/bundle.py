"""Write one bundle: every requested format, the tokenizer and manifest.json, staged then renamed into place.

The bundle is built in a hidden sibling directory and renamed to its final path only after every format and the
manifest are written, so an interrupted or failed export (Ctrl-C, full disk, bad tensor) never leaves a directory
that looks complete; the staging directory is removed on failure.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgephi import __version__
from edgephi.formats import TOKENIZER_FILES
from edgephi.manifest import FormatEntry, Manifest, sha256_files, tree_size

from . import registry
from .checkpoints import resolve
from .source import Source

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("onnx", "gguf", "coreml")
ProgressFactory = Callable[[str, int], Callable[[int, int], None]]  # (format, total) -> progress(done, total)


def default_output(model: str, bits: int) -> Path:
    base = Path(str(model).rstrip("/")).name or "model"
    return Path(f"{base}-edgephi-{'q4' if bits == 4 else f'{bits}bit'}")


def exportable_formats() -> tuple[str, ...]:
    """The default formats whose exporters and their libraries are installed here."""
    registry.load_all()
    return tuple(f for f in DEFAULT_FORMATS if f in registry.EXPORTERS and not registry.missing_modules(f))


def check_request(formats, bits: int) -> list[str]:
    registry.load_all()
    formats = list(dict.fromkeys(formats))
    for fmt in formats:
        if fmt not in registry.EXPORTERS:
            raise ValueError(f"unknown format {fmt!r}; available: {', '.join(sorted(registry.EXPORTERS))}")
        missing = registry.missing_modules(fmt)
        if missing:
            raise ValueError(f"the {fmt} exporter needs {', '.join(missing)}: pip install 'edgephi[{fmt}]'")
        if bits not in registry.BITS[fmt]:
            raise ValueError(f"--bits {bits} is not available for {fmt}; it takes "
                             f"{', '.join(map(str, registry.BITS[fmt]))}")
    return formats


def export_bundle(model: str, out: str | os.PathLike | None = None, formats=DEFAULT_FORMATS, bits: int = 4,
                  force: bool = False, options: dict[str, dict] | None = None,
                  progress: ProgressFactory | None = None) -> tuple[Path, Manifest]:
    """Export `model` (alias, directory or repo id) into one bundle directory; returns (path, manifest)."""
    formats = check_request(formats, bits)
    ckpt_dir = resolve(model)
    src = Source.open(ckpt_dir)  # the one tensor stream every format reads, checked once
    spec = src.spec
    out = Path(out) if out is not None else default_output(model, bits)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        tok_files = [f for f in TOKENIZER_FILES if (ckpt_dir / f).is_file()]
        for f in tok_files:
            shutil.copy2(ckpt_dir / f, staging / f)
        entries = {}
        for fmt in formats:
            sub = staging / fmt
            sub.mkdir()
            src.tensors.watch(progress(fmt, len(spec.tensor_shapes())) if progress else None)
            t0 = time.perf_counter()
            res = registry.get(fmt)(src, sub, bits=bits, **(options or {}).get(fmt, {}))
            entries[fmt] = FormatEntry(format=fmt, entry=res.entry, files=list(res.files), bits=res.bits,
                                       quant=res.quant, sizes={f: tree_size(staging / f) for f in res.files},
                                       seconds=round(time.perf_counter() - t0, 3), extra=dict(res.extra))
        weights = sorted(p for p in ckpt_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
        source = {"model": str(model), "path": str(ckpt_dir), "sha256": sha256_files(weights)}
        manifest = Manifest(spec=spec, formats=entries, tokenizer_files=tok_files, stop_ids=src.stop_ids,
                            bos_id=src.bos_id, context_length=spec.max_position_embeddings, source=source,
                            edgephi_version=__version__)
        manifest.save(staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, manifest


def _move_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():  # --force: keep the old bundle until the new one is in place
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is None:
        return
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def default_bundle(formats: tuple[str, ...] | None = None) -> Path:
    """The built-in model's bundle, exported once (every default format this machine can export) when missing."""
    from edgephi import default_model

    out = default_model.bundle_dir()
    if not (out / "manifest.json").is_file():
        log.warning("exporting the built-in default model to %s (first use)", out)
        export_bundle(default_model.NAME, out, formats=formats or exportable_formats(), bits=4, force=True)
    return out
