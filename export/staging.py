"""The safety rules around a bundle's output path: what --force may replace, one export per path at a time,
what killed exports left behind, signals a library swallows, and error messages that name the user's paths.

Beside an output directory OUT the bundle writer uses (names shortened when OUT's is long):
    .OUT.lock          held (flock) for the whole export, removed after it
    .OUT.partial-PID   the bundle being written, renamed to OUT when complete
    .OUT.old-PID       the bundle --force replaces, removed once the new one is in place
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; exports to one path are not serialized there
    fcntl = None

log = logging.getLogger(__name__)

SIBLING = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
_MAX_STEM = 160  # bytes: ".STEM.partial-PID" stays far below the usual 255-byte limit on a name
REPLACEABLE = "--force only replaces an edgephi bundle (a directory holding edgephi's manifest.json) or an empty " \
              "directory"


# ---- names ----------------------------------------------------------------------------------------------------
def stem(out: Path) -> str:
    """OUT's name as used in the sibling names: itself, or a prefix plus a hash when it is long."""
    name = out.name
    if len(os.fsencode(name)) <= _MAX_STEM:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    prefix = name
    while len(os.fsencode(prefix)) > _MAX_STEM - 17:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.parent / (f".{stem(out)}.{kind}" + (f"-{pid}" if pid is not None else ""))


def check_name(out: Path) -> None:
    """Refuse an output name the filesystem cannot hold, before anything is written."""
    n = len(os.fsencode(out.name))
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"{out}: not a usable bundle directory name")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.is_dir()), Path("."))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if n > limit:
        raise ValueError(f"{out}: the output name is {n} bytes long; this filesystem allows at most {limit}")


# ---- what --force may replace ------------------------------------------------------------------------------------
def _is_edgephi_manifest(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "edgephi_version" in d and "formats" in d


def check_replaceable(out: Path, checkpoint: Path) -> None:
    """Raise FileExistsError unless --force may replace `out`: never the checkpoint or a folder holding it; only a
    bundle (edgephi's manifest.json), an empty directory, or a staging directory of ours."""
    real, ckpt = out.resolve(), Path(checkpoint).resolve()
    if real == ckpt or real in ckpt.parents:
        raise FileExistsError(f"{out}: it is the checkpoint being exported, or holds it; --force will not delete it"
                              " (choose another -o)")
    if not out.is_dir():
        why = "a file, not a bundle directory"
    elif SIBLING.match(out.name) or not any(out.iterdir()):
        return
    elif (out / "manifest.json").is_file():
        if _is_edgephi_manifest(out / "manifest.json"):
            return
        why = "its manifest.json is not an edgephi manifest"
    else:
        why = "not an edgephi bundle (no manifest.json)"
    raise FileExistsError(f"{out}: {why}; {REPLACEABLE}: remove it yourself or choose another -o")


# ---- one export per output path ----------------------------------------------------------------------------------
@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold .OUT.lock for the block: a second export to the same path waits here, then sees the first's bundle."""
    if fcntl is None:
        yield
        return
    path = sibling(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot write beside {out} ({e.strerror})", str(out.parent)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s: another export to it is running; waiting for it to finish", out)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the previous holder removed that file after we opened it: lock the current one
    try:
        yield
    finally:
        try:
            os.unlink(path)  # before unlocking: a waiter then sees its file is gone and takes a fresh one
        except OSError:
            pass
        os.close(fd)


# ---- what killed exports left ------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call that could not clean up; we hold the lock now
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send a Ctrl-C there: leftovers stay (and are named in the log)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(out: Path) -> None:
    """Remove the staging directories of dead exports to `out` (SIGKILL, power cut); a dead export's .OUT.old-PID is
    the previous bundle: moved back when `out` is missing, else removed.  Call with the lock held."""
    if not out.parent.is_dir():
        return
    mine = stem(out)
    for p in sorted(out.parent.iterdir()):
        m = SIBLING.match(p.name)
        if m is None or m["stem"] != mine or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (out.exists() or out.is_symlink()):
            log.warning("%s: putting back the previous bundle (%s), left by an export that was killed", out, p.name)
            os.replace(p, out)
            continue
        log.warning("removing %s, left by an export that was killed", p)
        remove(p)


# ---- signals -----------------------------------------------------------------------------------------------------
class Interrupts:
    """SIGINT/SIGTERM during an export.  A library may swallow the KeyboardInterrupt a signal raises (coremltools
    imports torch, sympy and more inside bare `except:`), so each signal is also recorded and raised again by
    check(); inside held() signals are only recorded, and raised when the block ends.  Handlers are wrapped only
    where Python handles the signal (default_int_handler or a caller's, such as the CLI's), in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._old: dict[int, object] = {}
        self._held = False

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                h = signal.getsignal(s)
                if callable(h):
                    self._old[s] = h
                    signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        self.pending.append(signum)
        if not self._held:
            self._old[signum](signum, frame)

    def check(self) -> None:
        """Raise the interrupt a signal asked for, if one came (again, if a library swallowed it)."""
        if self.pending:
            s = self.pending[0]
            self._old[s](s, None)  # raises KeyboardInterrupt (the CLI's handler also records which signal)
            self.pending.clear()  # a caller's handler that chose not to raise

    @contextmanager
    def held(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False
        self.check()


def import_requirements(modules, interrupts: Interrupts) -> None:
    """Import the exporters' libraries up front with signals held: coremltools swallows a Ctrl-C during its import
    (and says at import what the exporters keep quiet)."""
    from .registry import quiet_libraries

    with interrupts.held(), quiet_libraries(*modules):
        for m in modules:
            importlib.import_module(m)


# ---- messages --------------------------------------------------------------------------------------------------
_TEMP = re.compile(r"^\..*\.tmp(\.\w+)?$|\.tmp$|^tmp")


def _final(out: Path, rel: str) -> str:
    parts = [p for p in rel.split("/") if p]
    for i, p in enumerate(parts):
        if _TEMP.search(p):  # a temporary file of an exporter: name the folder it was being written in
            parts = parts[:i]
            break
    return str(out.joinpath(*parts))


def name_user_paths(e: BaseException, staging: Path, out: Path) -> None:
    """Rewrite paths inside the (removed) staging directory in an error to the bundle's final paths."""
    prefix = str(staging)
    pattern = re.compile(re.escape(prefix) + r"((?:/[^/\s'\":,;()\[\]]+)*)")

    def fix(s):
        if not isinstance(s, str) or prefix not in s:
            return s
        return pattern.sub(lambda m: _final(out, m.group(1)), s)

    if isinstance(e, OSError):
        e.filename, e.filename2 = fix(e.filename), fix(e.filename2)
    try:
        e.args = tuple(fix(a) for a in e.args)
    except (AttributeError, TypeError):
        pass


def no_space(path: Path) -> bool:
    """Whether the filesystem holding `path` is (nearly) full: an exporter's C library may not say ENOSPC."""
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False

