"""manifest.json: what a bundle holds (formats, files, sizes, spec, quantization, stop ids, source checksum)."""
from __future__ import annotations

import hashlib
import json
import os
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

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike) -> "Manifest":
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
            if d.get("schema") != SCHEMA:
                raise BundleError(f"{path}: schema {d.get('schema')!r}; this edgephi reads schema {SCHEMA}")
            formats = {k: FormatEntry(**v) for k, v in d["formats"].items()}
            m = cls(spec=PhiSpec.from_dict(d["spec"]), formats=formats, tokenizer_files=list(d["tokenizer_files"]),
                    stop_ids=[int(i) for i in d["stop_ids"]], bos_id=d.get("bos_id"),
                    context_length=int(d["context_length"]), source=dict(d["source"]),
                    edgephi_version=str(d["edgephi_version"]), created=d.get("created", ""), schema=d["schema"])
        except BundleError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: corrupt manifest (not JSON: {e})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: corrupt manifest ({e.__class__.__name__}: {e})") from None
        for entry in m.formats.values():
            for f in entry.files:
                if not (bundle_dir / f).exists():
                    raise BundleError(f"{bundle_dir / f}: listed in {MANIFEST} but missing")
        return m


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
