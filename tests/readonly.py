"""A folder made read-only for a test: a read-only bind mount where this process may mount (root in CI and on the
dev machines), else its write bits removed (which binds every user but root).  Either way tree_hash() tells
whether anything under it changed."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from pathlib import Path


def tree_hash(root: Path) -> str:
    """sha256 over every path, mode-independent, and file content under root."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _mount_ro(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0:
        return True
    if ok:
        subprocess.run(["umount", str(path)], capture_output=True)
    return False


@contextlib.contextmanager
def read_only(path: Path):
    """Yield True when writes under path are refused for this process (mount), False when only write bits are off."""
    path = Path(path)
    if _mount_ro(path):
        try:
            yield True
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p, m in modes.items():
        p.chmod(m & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield os.geteuid() != 0
    finally:
        for p, m in sorted(modes.items(), reverse=True):
            p.chmod(m)
