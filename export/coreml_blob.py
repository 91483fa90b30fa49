"""Fill a saved .mlpackage's weight blob from the checkpoint, one block of rows at a time.

The exporter builds and saves the program with zero-strided placeholder constants (coreml_layers.Weights with
deferred=True), so coremltools never holds the weights: it lays out ``weights/weight.bin`` with every blob at its
final size and records each constant's offset in the program.  This module then reads those offsets back from the
saved program and writes the real bytes in place, quantizing ``ROWS`` rows of a tensor at a time.  Peak memory is
one block of rows, not the model.

Blob storage format (coremltools' MIL storage, version 2): a 64-byte file header, then per blob a 64-byte
metadata record at the offset the program names -- uint32 sentinel 0xDEADBEEF, uint32 data type, uint64 size in
bytes, uint64 offset of the data, uint64 padding bits -- and the data.  int4 values are packed two per byte, the
first in the low nibble; fp16 is stored little-endian.  Every record is checked (sentinel, type, size) before
anything is written, and the tests compare a filled package byte for byte with one coremltools wrote itself.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .coreml_quant import BLOCK, quantize_int4

SENTINEL = 0xDEADBEEF
RECORD = struct.Struct("<IIQQQ")  # sentinel, data type, size in bytes, data offset, padding bits
DTYPE_CODES = {"q": 8, "scale": 1, "f16": 1}  # MIL storage data types: 8 = int4, 1 = fp16
ROWS = 2048  # rows per block: 2048 x 3072 floats is 24 MiB


class BlobError(RuntimeError):
    """The saved package does not look like what coremltools was asked to write."""


def _coreml_dir(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML"


def blob_offsets(package: Path) -> dict[str, tuple[str, int]]:
    """Every value stored in a blob -> (weight file name, offset of its metadata record).

    Keys: a const op's name, or ``op/argument`` for a value stored inline as an op's argument (coremltools
    saves the data and scale of constexpr ops that way, under the op's output name).
    """
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((_coreml_dir(package) / "model.mlmodel").read_bytes())
    found: dict[str, tuple[str, int]] = {}

    def walk(block):
        for op in block.operations:
            for arg, binding in op.inputs.items():
                for a in binding.arguments:
                    if a.HasField("value") and a.value.HasField("blobFileValue"):
                        found[f"{op.outputs[0].name}/{arg}"] = (a.value.blobFileValue.fileName,
                                                                 a.value.blobFileValue.offset)
            if op.type == "const":
                val = op.attributes["val"]
                if val.HasField("blobFileValue"):
                    name = op.attributes["name"].immediateValue.tensor.strings.values[0]
                    found[name] = (val.blobFileValue.fileName, val.blobFileValue.offset)
            for inner in op.blocks:
                walk(inner)

    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            walk(blk)
    return found


def pack_int4(q: np.ndarray) -> bytes:
    """int8 values in [-8, 7], an even count, row-major -> two per byte, the first in the low nibble."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def fill(package: str | Path, weights) -> int:
    """Write every placeholder of weights.pending into package's blob; returns the bytes written."""
    package = Path(package)
    if not weights.pending:
        return 0
    offsets = blob_offsets(package)
    missing = sorted(set(weights.pending) - set(offsets))
    if missing:
        raise BlobError(f"{package}: the saved program has no stored constant for {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    # group the constants by checkpoint tensor: one quantization pass serves its data and its scales
    by_tensor: dict[str, dict[str, str]] = {}
    for cname, (tensor, kind) in weights.pending.items():
        by_tensor.setdefault(tensor, {})[kind] = cname
    files: dict[str, object] = {}
    written = 0
    try:
        for tensor, consts in by_tensor.items():
            shape = tuple(weights.ckpt.info(tensor).shape)
            targets = {}
            for kind, cname in consts.items():
                fname, offset = offsets[cname]
                if fname not in files:
                    files[fname] = open(_coreml_dir(package) / "weights" / Path(fname).name, "r+b")
                f = files[fname]
                targets[kind] = (f, _data_offset(f, package, cname, offset, kind, _expected_size(kind, shape)))
            for start in range(0, shape[0], ROWS):
                stop = min(start + ROWS, shape[0])
                rows = weights.ckpt.read_rows(tensor, start, stop)
                if "f16" in targets:
                    written += _put(targets["f16"], start * shape[1] * 2, rows.astype(np.float16).tobytes())
                else:
                    q, scale = quantize_int4(rows)
                    written += _put(targets["q"], start * shape[1] // 2, pack_int4(q))
                    written += _put(targets["scale"], start * (shape[1] // BLOCK) * 2, scale.tobytes())
    finally:
        for f in files.values():
            f.close()
    return written


def _expected_size(kind: str, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    return {"q": n // 2, "scale": n // BLOCK * 2, "f16": n * 2}[kind]


def _data_offset(f, package: Path, cname: str, offset: int, kind: str, size: int) -> int:
    f.seek(offset)
    raw = f.read(RECORD.size)
    if len(raw) != RECORD.size:
        raise BlobError(f"{package}: weight blob ends before the record of {cname} at offset {offset}")
    sentinel, dtype, nbytes, data_offset, _ = RECORD.unpack(raw)
    if sentinel != SENTINEL or dtype != DTYPE_CODES[kind] or nbytes != size:
        raise BlobError(f"{package}: blob record of {cname} at offset {offset} is not the expected "
                        f"{kind} of {size} bytes (sentinel {sentinel:#x}, type {dtype}, {nbytes} bytes)")
    return data_offset


def _put(target, pos: int, data: bytes) -> int:
    f, base = target
    f.seek(base + pos)
    f.write(data)
    return len(data)
