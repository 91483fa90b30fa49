"""Stream tensors out of a Hugging Face checkpoint, one at a time.

Only safetensors are read (pickle checkpoints are refused, never unpickled).  Each tensor is read with one
positioned read of exactly its bytes, so the reader's resident memory is one tensor: a memory map would keep
every page it touched counted in the process's RSS until unmapped, which defeats "peak memory ≈ one tensor".
Headers are parsed and checked by edgephi/safetensors_header.py; every value read is checked to be finite.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Mapping

import numpy as np

from .safetensors_header import (  # noqa: F401  (re-exported: the checkpoint's public names)
    _DTYPES, MAX_HEADER_BYTES, CheckpointError, TensorInfo, bf16_to_f32, check_finite, read_header,
    regular_file_size)

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickles)}); edgephi never unpickles files "
            "(they can run arbitrary code). Convert them to safetensors first, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no model.safetensors, {INDEX_FILE} or *.safetensors file")


class Checkpoint:
    """The tensors of a checkpoint directory, indexed by name, read on demand: the one tensor stream.

    The bundle writer opens and checks a checkpoint once and every exporter reads through the same object;
    watch(progress) reports progress(done, total) as distinct tensors of the checked spec are read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._progress: Callable[[int, int], None] | None = None
        self._seen: set[str] = set()
        self._expected: frozenset[str] = frozenset()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: checkpoint directory not found")
        self.tensors: dict[str, TensorInfo] = {}
        index = self.directory / INDEX_FILE
        if index.is_file():
            self._read_index(index)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                _refuse_pickles(self.directory)
            for f in files:
                self._add(read_header(f))

    def _read_index(self, index: Path) -> None:
        regular_file_size(index, "shard index")
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise CheckpointError(f"{index}: corrupt shard index ({e.__class__.__name__}: {e})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map={weight_map!r:.80}; it must be an object "
                                  "{tensor name: shard file name}")
        for shard in sorted(set(weight_map.values())):
            self._add(read_header(self._shard_path(index, shard)))
        for name, shard in weight_map.items():
            if name not in self.tensors or self.tensors[name].file != self.directory / shard:
                raise CheckpointError(f"{self.directory / shard}: tensor {name!r} is listed in {index.name} "
                                      f"but not stored in that shard")

    def _shard_path(self, index: Path, shard: str) -> Path:
        """A shard named by the index: a relative path inside the checkpoint directory, never outside it."""
        rel = PurePosixPath(shard)
        if not shard.isprintable() or "\\" in shard or rel.is_absolute() or ".." in rel.parts or not rel.name:
            raise CheckpointError(f"{index}: weight_map names shard {shard!r:.80}; shards must be files inside "
                                  f"{self.directory} (a relative path without '..')")
        path = self.directory / shard
        try:
            os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: shard listed in {index.name} is missing") from None
        except OSError as e:  # a name too long, a loop of links
            raise CheckpointError(f"{index}: shard {shard!r:.80}: {e.strerror}") from None
        return path

    def _add(self, infos: Mapping[str, TensorInfo]) -> None:
        for name, info in infos.items():
            if name in self.tensors:
                raise CheckpointError(f"{info.file}: tensor {name!r} is also in {self.tensors[name].file.name}")
            self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.directory}: no tensor {name!r} in the checkpoint") from None

    def watch(self, progress: Callable[[int, int], None] | None) -> None:
        """Report progress(done, total) from now on (None: stop), counting each tensor of the spec once."""
        self._progress, self._seen = progress, set()

    def _note(self, name: str) -> None:
        if name not in self._seen and name in self._expected:
            self._seen.add(name)
            if self._progress is not None:
                self._progress(len(self._seen), len(self._expected))

    def read(self, name: str, dtype: np.dtype | str | None = np.float32) -> np.ndarray:
        """One tensor, read from disk now (bf16 widened exactly; dtype=None keeps F32/F16 as stored)."""
        info = self.info(name)
        arr = self._read_span(info, 0, info.nbytes, info.shape, dtype)
        self._note(name)
        return arr

    def read_blocks(self, name: str, max_bytes: int = 8 << 20) -> Iterator[np.ndarray]:
        """A tensor's stored values in order, as flat arrays of at most max_bytes (BF16 as raw uint16 bits).

        Each block is a fresh view of one reused buffer: a writer converts and writes it before the next one."""
        info = self.info(name)
        np_dtype, itemsize = _DTYPES[info.dtype]
        buf = bytearray(max(itemsize, max_bytes - max_bytes % itemsize))
        view = memoryview(buf)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            left = info.nbytes
            while left:
                n = min(left, len(buf))
                if f.readinto(view[:n]) != n:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
                block = np.frombuffer(buf, dtype=np_dtype, count=n // itemsize)
                check_finite(block, info)
                yield block
                left -= n
        self._note(name)

    def read_rows(self, name: str, start: int, stop: int, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """Rows start..stop-1 of a tensor (along its first axis), read with one positioned read."""
        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{name}: rows {start}:{stop} out of range for shape {list(info.shape)}")
        row_bytes = info.nbytes // rows if rows else 0
        arr = self._read_span(info, start * row_bytes, (stop - start) * row_bytes,
                              (stop - start,) + tuple(info.shape[1:]), dtype)
        if stop == rows:
            self._note(name)
        return arr

    @staticmethod
    def _read_span(info: TensorInfo, skip: int, nbytes: int, shape: tuple[int, ...],
                   dtype: np.dtype | str | None) -> np.ndarray:
        """nbytes of a tensor's data from byte `skip` on, as an array of `shape` (a fresh, writeable array)."""
        np_dtype, _ = _DTYPES[info.dtype]
        with open(info.file, "rb") as f:
            f.seek(info.offset + skip)
            buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        check_finite(arr, info)
        if info.dtype == "BF16":
            arr = bf16_to_f32(arr)
        if dtype is not None and arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)
        elif not arr.flags.writeable:
            arr = arr.copy()
        return arr

    def check(self, spec) -> None:
        """Every tensor the spec needs is present with the shape config.json implies (layers counted first)."""
        self._check_layers(spec)
        expected = spec.tensor_shapes()
        self._expected = frozenset(expected)
        for name, shape in expected.items():
            if name not in self.tensors:
                raise CheckpointError(f"{self.directory}: tensor {name!r} is missing (config.json says "
                                      f"{spec.model_type} with {spec.num_hidden_layers} layers)")
            info = self.tensors[name]
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"config.json implies {list(shape)}")

    def _check_layers(self, spec) -> None:
        """config.json's num_hidden_layers against the layers the files hold (model.layers.N.*), before any
        per-layer table is built from that number: no layer is dropped, none is invented."""
        layers: dict[int, str] = {}
        for name in self.tensors:
            m = _LAYER.match(name)
            if m:
                layers.setdefault(int(m.group(1)), name)
        n = spec.num_hidden_layers
        extra = sorted(i for i in layers if i >= n)
        if extra:
            raise CheckpointError(f"{self.directory}: config.json says num_hidden_layers={n}, but the checkpoint "
                                  f"has tensors of layer {extra[0]} ({layers[extra[0]]!r}); "
                                  f"{max(layers) + 1} layers are stored")
        if len(layers) != n:
            missing = next(i for i in range(n) if i not in layers)
            raise CheckpointError(f"{self.directory}: config.json says num_hidden_layers={n}, the checkpoint "
                                  f"holds {len(layers)} layers (no tensor model.layers.{missing}.*)")

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def iter_tensors(directory: str | os.PathLike, names: list[str] | None = None,
                 dtype: np.dtype | str | None = np.float32) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, thunk) for each tensor, in file order; calling the thunk reads that tensor only."""
    ckpt = Checkpoint(directory)
    order = names if names is not None else sorted(ckpt.tensors, key=lambda n: (str(ckpt.tensors[n].file),
                                                                                ckpt.tensors[n].offset))
    for name in order:
        yield name, (lambda n=name: ckpt.read(n, dtype))


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (as torch's .to(torch.bfloat16) does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


_WRITE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def save_safetensors(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]],
                     make: Callable[[str], np.ndarray], dtype: str = "F32",
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a .safetensors file tensor by tensor: make(name) is called once per tensor, in order.

    The header is computed from the shapes first, so only one tensor is in memory at a time; the file is
    written to a temporary name and renamed into place.
    """
    if dtype not in _WRITE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(_WRITE_DTYPES)}")
    itemsize = _DTYPES[dtype][1]
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            arr = np.asarray(make(name), dtype=np.float32)
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} made with shape {arr.shape}, header says {tuple(shape)}")
            data = f32_to_bf16_bits(arr) if dtype == "BF16" else arr.astype(_WRITE_DTYPES[dtype])
            f.write(np.ascontiguousarray(data).tobytes())
    os.replace(tmp, path)
    return path
