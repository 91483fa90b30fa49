"""Check an APK's (or AAR's) native libraries for Android's 16 KB page size: every ELF PT_LOAD segment aligned to
at least 16 KB, and, in an APK, every uncompressed .so starting at a 16 KB offset in the zip (so it can be mapped
in place).  Usage: python3 check_16k.py APP.apk|LIB.aar ...   (exit 1 when a library fails; needs no Android SDK)
"""
from __future__ import annotations

import struct
import sys
import zipfile

PAGE = 16384
PT_LOAD = 1


def load_alignments(elf: bytes) -> list[int]:
    """p_align of every PT_LOAD segment of a 32- or 64-bit little-endian ELF."""
    if elf[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    is64 = elf[4] == 2
    if is64:
        phoff, = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    else:
        phoff, = struct.unpack_from("<I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x2A)
    out = []
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", elf, off)
        if p_type == PT_LOAD:
            out.append(struct.unpack_from("<Q", elf, off + 0x30)[0] if is64 else struct.unpack_from("<I", elf, off + 0x1C)[0])
    return out


def data_offset(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the zip (after its local header)."""
    z.fp.seek(info.header_offset)
    head = z.fp.read(30)
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    return info.header_offset + 30 + name_len + extra_len


def check(path: str) -> list[str]:
    problems, n = [], 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".so"):
                continue
            n += 1
            aligns = load_alignments(z.read(info))
            bad = [a for a in aligns if a < PAGE]
            if bad:
                problems.append(f"{path}!{info.filename}: LOAD segments aligned to {min(bad)} bytes (< {PAGE})")
            if path.endswith(".apk") and info.compress_type == zipfile.ZIP_STORED and data_offset(z, info) % PAGE:
                problems.append(f"{path}!{info.filename}: stored at offset {data_offset(z, info)}, not 16 KB-aligned")
            if path.endswith(".apk") and info.compress_type != zipfile.ZIP_STORED:
                problems.append(f"{path}!{info.filename}: compressed (useLegacyPackaging = false stores it uncompressed)")
    print(f"{path}: {n} native libraries, {len(problems)} problem(s)")
    return problems


def main(argv: list[str]) -> int:
    problems = [p for a in argv for p in check(a)]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
