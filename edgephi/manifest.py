"""manifest.json: what a bundle holds (formats, files, sizes and sha256, spec, quantization, stop ids, source checksum).

A manifest is untrusted input: Manifest.load type-checks every field (BundleError naming the file, the field and
the value) and compares every format file's size with the one recorded at export (stat only), so a truncated or
half-copied bundle is refused before a backend opens it; Manifest.verify recomputes the sha256 of every format
file on demand (`edgephi info --verify`, `edgephi check`), which catches a zeroed file or one swapped in from
another export.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .spec import PhiSpec

MANIFEST = "manifest.json"
SCHEMA = 1


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or has a corrupt manifest."""


@dataclass
class FormatEntry:
    format: str
    entry: str  # bundle-relative path a backend opens
    files: list[str]
    bits: int
    quant: str
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256_path(file), checked by Manifest.verify

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


@dataclass
class Manifest:
    spec: PhiSpec
    formats: dict[str, FormatEntry]
    tokenizer_files: list[str]
    stop_ids: list[int]
    bos_id: int | None
    context_length: int
    source: dict[str, Any]
    edgephi_version: str
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema: int = SCHEMA

    def to_json(self) -> str:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return json.dumps(d, indent=2, sort_keys=False)

    def save(self, bundle_dir: Path) -> Path:
        """Write atomically: a reader never sees half a manifest."""
        path = Path(bundle_dir) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def bits_per_weight(self, fmt: str) -> float:
        return 8 * self.formats[fmt].nbytes / max(1, self.spec.n_params)

    def memory_bytes(self, fmt: str, n_ctx: int | None = None) -> int:
        """What running `fmt` takes in memory: its files (the weights) plus the KV cache of n_ctx positions
        (default: what a session allocates when none is asked for)."""
        from .formats import KV_BYTES, default_n_ctx

        s = self.spec
        n_ctx = n_ctx or default_n_ctx(self.context_length)
        kv = 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * n_ctx * KV_BYTES.get(fmt, 2)
        return self.formats[fmt].nbytes + kv

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike) -> "Manifest":
        """Read and check manifest.json: every field's type, every listed file present with its recorded size."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST
        if not bundle_dir.is_dir():
            raise FileNotFoundError(f"{bundle_dir}: bundle directory not found (make one with `edgephi export MODEL -o "
                                    f"{bundle_dir}`)")
        if not path.is_file():
            raise BundleError(f"{path}: missing; {bundle_dir} is not a complete edgephi bundle "
                              "(an interrupted export leaves none)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise BundleError(f"{path}: corrupt manifest (not JSON: {e.__class__.__name__}: {e})") from None
        m = _from_json(d, path)
        m.check_files(bundle_dir)
        return m

    def check_files(self, bundle_dir: str | os.PathLike) -> None:
        """Every file the manifest lists exists, and each format file has the size recorded at export (stat only)."""
        bundle_dir = Path(bundle_dir)
        for f in self.tokenizer_files:
            if not (bundle_dir / f).is_file():
                raise BundleError(f"{bundle_dir / f}: tokenizer file listed in {MANIFEST} but missing")
        for entry in self.formats.values():
            for f in entry.files:
                p = bundle_dir / f
                if not p.exists():
                    raise BundleError(f"{p}: listed in {MANIFEST} but missing")
                if f in entry.sizes and (found := tree_size(p)) != entry.sizes[f]:
                    raise BundleError(f"{p}: {found} bytes, {MANIFEST} recorded {entry.sizes[f]}: the file was "
                                      "truncated or replaced after export; re-export or copy the bundle again")

    def verify(self, bundle_dir: str | os.PathLike) -> int:
        """Recompute the sha256 of every format file; BundleError on a mismatch. Returns how many were checked."""
        bundle_dir, n = Path(bundle_dir), 0
        for entry in self.formats.values():
            for f in entry.files:
                p, want = bundle_dir / f, entry.sha256.get(f)
                if want is None:
                    raise BundleError(f"{p}: no sha256 recorded in {MANIFEST} (exported by an edgephi that did "
                                      "not record hashes); re-export the bundle to verify it")
                got = sha256_path(p)
                if got != want:
                    raise BundleError(f"{p}: sha256 {got} differs from {want} recorded in {MANIFEST}: the file is "
                                      "corrupt or comes from another export")
                n += 1
        return n


def sha256_files(paths: list[Path], chunk: int = 1 << 22) -> dict[str, str]:
    """sha256 of each file, read in chunks (constant memory)."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
        raise BundleError(f"{path}: not a regular file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file's bytes; of a directory (a Core ML package), of the sorted "relative path, file sha256"
    lines of every file under it (names and contents both count)."""
    path = Path(path)
    if not path.is_dir():
        return _sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()}\0{_sha256_file(p)}\n"
             for p in sorted(path.rglob("*")) if not p.is_dir()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---- manifest.json's fields, type-checked ---------------------------------------------------------------------
_REQUIRED = object()
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_relpath(v) -> bool:
    """A bundle-relative path that stays inside the bundle."""
    return (isinstance(v, str) and v != "" and v.isprintable() and "\\" not in v and not v.startswith("/")
            and ".." not in v.split("/") and len(v) < 1024 and all(len(part) < 256 for part in v.split("/")))


def _is_map(values) -> Any:
    return lambda v: isinstance(v, dict) and all(values(x) for x in v.values())


_FORMAT_FIELDS: dict[str, tuple[Any, str, Any]] = {  # field -> (check, what is allowed, default or factory)
    "format": (lambda v: isinstance(v, str), "a string", _REQUIRED),
    "entry": (_is_relpath, "a path inside the bundle", _REQUIRED),
    "files": (lambda v: isinstance(v, list) and v != [] and all(_is_relpath(f) for f in v),
              "a non-empty list of paths inside the bundle", _REQUIRED),
    "bits": (lambda v: _is_int(v) and 1 <= v <= 64, "an integer in 1..64", _REQUIRED),
    "quant": (lambda v: isinstance(v, str), "a string", _REQUIRED),
    "sizes": (_is_map(lambda x: _is_int(x) and x >= 0), "an object {file: size in bytes}", dict),
    "seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", 0.0),
    "extra": (lambda v: isinstance(v, dict), "an object", dict),
    "sha256": (_is_map(lambda x: isinstance(x, str) and _HEX64.fullmatch(x) is not None),
               "an object {file: 64 lowercase hex digits}", dict),
}


def _get(d: dict, key: str, check, allowed: str, where: str, default=_REQUIRED):
    if key not in d:
        if default is _REQUIRED:
            raise BundleError(f"{where}: missing field {key!r}")
        return default() if default is dict else default
    if not check(d[key]):
        raise BundleError(f"{where}: field {key!r} is {d[key]!r:.80}; it must be {allowed}")
    return d[key]


def _format_entry(name: str, v, path: Path) -> FormatEntry:
    where = f"{path}: formats[{name!r:.40}]"
    if not isinstance(v, dict):
        raise BundleError(f"{where} is {v!r:.80}; it must be an object")
    unknown = sorted(set(v) - set(_FORMAT_FIELDS))
    if unknown:
        raise BundleError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))[:200]}; "
                          f"known: {', '.join(_FORMAT_FIELDS)}")
    e = FormatEntry(**{k: _get(v, k, check, allowed, where, default)
                       for k, (check, allowed, default) in _FORMAT_FIELDS.items()})
    if e.format != name:
        raise BundleError(f"{where}: field 'format' is {e.format!r:.80}; it must be the key, {name!r}")
    if not any(e.entry == f or e.entry.startswith(f.rstrip("/") + "/") for f in e.files):
        raise BundleError(f"{where}: entry {e.entry!r} is not one of its files (or inside one)")
    for key in ("sizes", "sha256"):
        stray = sorted(set(getattr(e, key)) - set(e.files))
        if stray:
            raise BundleError(f"{where}: {key} names {stray[0]!r:.80}, which is not in its files")
    return e


def _from_json(d, path: Path) -> Manifest:
    if not isinstance(d, dict):
        raise BundleError(f"{path}: corrupt manifest (a JSON {type(d).__name__}, not an object)")
    if not _is_int(d.get("schema")) or d["schema"] != SCHEMA:
        raise BundleError(f"{path}: schema {d.get('schema')!r:.40}; this edgephi reads schema {SCHEMA}")
    try:
        spec = PhiSpec.from_dict(_get(d, "spec", lambda v: isinstance(v, dict), "an object", str(path)))
    except BundleError:
        raise
    except ValueError as e:
        raise BundleError(f"{path}: corrupt manifest: field 'spec': {e}") from None
    formats = _get(d, "formats", lambda v: isinstance(v, dict) and v != {}, "an object naming at least one format",
                   str(path))
    is_id = lambda v: _is_int(v) and 0 <= v < spec.vocab_size  # noqa: E731
    where = str(path)
    return Manifest(
        spec=spec, formats={k: _format_entry(k, v, path) for k, v in formats.items()},
        tokenizer_files=_get(d, "tokenizer_files", lambda v: isinstance(v, list) and all(map(_is_relpath, v)),
                             "a list of paths inside the bundle", where),
        stop_ids=_get(d, "stop_ids", lambda v: isinstance(v, list) and all(map(is_id, v)),
                      f"a list of token ids in 0..{spec.vocab_size - 1}", where),
        bos_id=_get(d, "bos_id", lambda v: v is None or is_id(v), f"null or a token id in 0..{spec.vocab_size - 1}",
                    where, None),
        context_length=_get(d, "context_length", lambda v: _is_int(v) and 0 < v <= spec.max_position_embeddings,
                            f"an integer in 1..{spec.max_position_embeddings} (the model's)", where),
        source=_get(d, "source", lambda v: isinstance(v, dict), "an object", where),
        edgephi_version=_get(d, "edgephi_version", lambda v: isinstance(v, str), "a string", where),
        created=_get(d, "created", lambda v: isinstance(v, str), "a string", where, ""),
        schema=SCHEMA)
