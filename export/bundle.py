"""Write one bundle: every requested format, the tokenizer and manifest.json, staged then renamed into place.

The bundle is built in a hidden sibling directory and renamed to its final path only after every format and the
manifest are written, so an interrupted or failed export (Ctrl-C, full disk, bad tensor) never leaves a directory
that looks complete; the staging directory is removed on failure.  export/staging.py holds the rules around the
output path: --force replaces only a bundle (or an empty directory), one export per path at a time (a lock file
beside it), a killed export's leftovers are cleaned by the next, and errors name the final paths.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgephi import __version__
from edgephi.manifest import FormatEntry, Manifest, sha256_files, sha256_path, tree_size

from . import registry, staging
from .checkpoints import resolve
from .source import Source
from .tokenizer_files import write_tokenizer_files

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
    if not formats:
        raise ValueError(f"no format to export; choose from {', '.join(sorted(registry.EXPORTERS))}")
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


def export_bundle(model: str, out: str | os.PathLike | None = None, formats=None, bits: int = 4,
                  force: bool = False, options: dict[str, dict] | None = None,
                  progress: ProgressFactory | None = None) -> tuple[Path, Manifest]:
    """Export `model` (alias, directory or repo id) into one bundle directory; returns (path, manifest).

    formats: None = DEFAULT_FORMATS but those that cannot hold this model (with a warning); a format asked for by
    name that cannot hold it is refused before anything is written."""
    explicit = formats is not None
    formats = check_request(formats if explicit else DEFAULT_FORMATS, bits)
    for fmt in options or {}:
        if fmt not in formats:
            raise ValueError(f"options for {fmt} given, but {fmt} is not among the formats exported "
                             f"({', '.join(formats)})")
    ckpt_dir = resolve(model)
    out = Path(out) if out is not None else default_output(model, bits)
    staging.check_name(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"{out}: already exists; pass --force to replace it")
    src = Source.open(ckpt_dir)  # the one tensor stream every format reads, checked once
    formats = _formats_for(src.spec, formats, explicit)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the libraries' own log lines (import-time warnings, version notes) only with --verbose
    with staging.locked(out), staging.Interrupts() as interrupts, registry.quiet_libraries("coremltools", "gguf"):
        staging.clean_stale(out)  # what a killed export to out left (a previous bundle it was replacing goes back)
        if out.exists() or out.is_symlink():  # again, under the lock: another export may have just finished
            if not force:
                raise FileExistsError(f"{out}: already exists; pass --force to replace it")
            staging.check_replaceable(out, ckpt_dir)
        return _write(src, ckpt_dir, model, out, formats, bits, options, progress, interrupts)


def _formats_for(spec, formats: list[str], explicit: bool) -> list[str]:
    """The formats that can hold this model; one named explicitly that cannot is an error."""
    refused = {f: why for f in formats if (why := registry.refusal(f, spec))}
    if refused and explicit:
        raise NotImplementedError("; ".join(f"{f}: {why}" for f, why in refused.items()))
    for f, why in refused.items():
        log.warning("leaving out %s: %s", f, why)
    kept = [f for f in formats if f not in refused]
    if not kept:
        raise NotImplementedError(f"no default format can hold this model ({'; '.join(refused.values())})")
    return kept


def _write(src: Source, ckpt_dir: Path, model: str, out: Path, formats, bits, options, progress,
           interrupts: staging.Interrupts) -> tuple[Path, Manifest]:
    spec = src.spec
    stage = writing = staging.sibling(out, "partial", os.getpid())
    try:
        stage.mkdir()
        tok_files = [p.name for p in write_tokenizer_files(src, stage, extra=("config.json",))]
        entries = {}
        for fmt in formats:
            interrupts.check()
            staging.import_requirements(registry.REQUIRES.get(fmt, ()), interrupts)  # signals held: see there
            sub = writing = stage / fmt
            sub.mkdir()
            src.tensors.watch(progress(fmt, len(spec.tensor_shapes())) if progress else None)
            t0 = time.perf_counter()
            res = registry.get(fmt)(src, sub, bits=bits, **(options or {}).get(fmt, {}))
            entries[fmt] = FormatEntry(format=fmt, entry=res.entry, files=list(res.files), bits=res.bits,
                                       quant=res.quant, sizes={f: tree_size(stage / f) for f in res.files},
                                       seconds=round(time.perf_counter() - t0, 3), extra=dict(res.extra),
                                       sha256={f: sha256_path(stage / f) for f in res.files})
        weights = sorted(p for p in ckpt_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
        source = {"model": str(model), "path": str(ckpt_dir), "sha256": sha256_files(weights)}
        manifest = Manifest(spec=spec, formats=entries, tokenizer_files=tok_files, stop_ids=src.stop_ids,
                            bos_id=src.bos_id, context_length=spec.max_position_embeddings, source=source,
                            edgephi_version=__version__)
        manifest.save(stage)
        interrupts.check()  # a signal that a library swallowed still stops the export here
        _move_into_place(stage, out)
    except BaseException as e:
        full = not isinstance(e, (OSError, KeyboardInterrupt)) and staging.no_space(out.parent)
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a write through a file object names no file
            e.filename = str(writing)
        staging.name_user_paths(e, stage, out)
        if full:  # a C library (llama.cpp's quantizer) that ran out of space reports it in its own words
            err = OSError(errno.ENOSPC, f"No space left on device ({e})", str(out))
            err.add_note(f"nothing was kept: {out} is as it was before the export")
            raise err from e
        if isinstance(e, Exception):
            e.add_note(f"nothing was kept: {out} is as it was before the export")
        raise
    return out, manifest


def _move_into_place(stage: Path, out: Path) -> None:
    old = staging.sibling(out, "old", os.getpid())
    replacing = out.exists() or out.is_symlink()  # --force: keep the old bundle until the new one is in place
    try:
        if replacing:
            os.replace(out, old)
        os.replace(stage, out)
    except BaseException:  # a failed rename, or Ctrl-C between the two: the old bundle goes back
        if (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
            os.replace(old, out)
        raise
    if replacing:
        staging.remove(old)


def default_bundle(formats: tuple[str, ...] | None = None) -> Path:
    """The built-in model's bundle, exported once (every default format this machine can export) when missing."""
    from edgephi import default_model

    out = default_model.bundle_dir()
    if not (out / "manifest.json").is_file():
        log.warning("exporting the built-in default model to %s (first use)", out)
        export_bundle(default_model.NAME, out, formats=formats or exportable_formats(), bits=4, force=True)
    return out
