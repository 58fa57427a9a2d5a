"""Atomic file writes: a temp file in the same directory, fsync, then rename.

A reader (or a crash) sees either the old file or the complete new one, never a
half-written file. Every file mesimp writes goes through here.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mesimp.errors import BadInputError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before hours of training) if ``path`` cannot be written.

    Creates missing parent directories, then proves writability by creating and
    removing a temp file there (``os.access`` says yes to root on read-only mounts).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise BadInputError(f"output path {p} is a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInputError(f"cannot write {p}: {e.strerror or e}") from e
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename over ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    dest = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, _file_mode(dest))
        finally:
            os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _file_mode(dest: Path) -> int:
    """The mode a plain ``open(dest, "w")`` would leave: the replaced file's own, else
    0o666 less the umask. ``mkstemp`` creates 0o600 files, and the rename would keep
    that: checkpoints and ONNX files unreadable to the group that serves them."""
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status, which reads it without
    changing it; elsewhere it is set and put back at once (another thread creating a file
    in that instant would see 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not all platforms allow opening a directory.
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
