"""Loader for IDX files, the format of MNIST, Fashion-MNIST and KMNIST (raw or ``.gz``).

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32
per dimension, then the big-endian payload. The header is checked against the payload
size *before* anything is allocated, so a corrupt or hostile header (or a gzip bomb)
fails fast with :class:`~mesimp.errors.DataError` instead of exhausting memory.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mesimp.errors import DataError

# IDX dtype code -> big-endian numpy dtype.
DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
MAX_NDIM = 4
# Largest payload accepted by default (4 GiB): far above any MNIST-like file, far below
# what a forged header can claim.
DEFAULT_MAX_BYTES = 1 << 32
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def load_idx(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected by content) into a numpy array.

    The result is native-endian and C-contiguous. ``max_bytes`` caps the payload so a
    forged header or a gzip bomb cannot exhaust memory. Every problem raises ``DataError``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"IDX file not found: {p}; check the path or re-download the dataset")
    try:
        with open(p, "rb") as raw:
            is_gz = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if not is_gz:
                return _parse(raw, p, os.fstat(raw.fileno()).st_size, max_bytes)
            try:
                with gzip.GzipFile(fileobj=raw) as f:
                    return _parse(f, p, None, max_bytes)
            except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
                raise DataError(
                    f"{p}: corrupt or truncated gzip ({_one_line(e)}); re-download the file"
                ) from e
    except OSError as e:
        raise DataError(f"cannot read IDX file {p}: {_one_line(e)}") from e


def _parse(f: BinaryIO, p: Path, size: int | None, max_bytes: int) -> np.ndarray:
    """Parse header and payload from ``f``; ``size`` is the file size for raw files."""
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{p}: {len(head)} bytes is too short for an IDX header; re-download it")
    if head[0] or head[1] or head[2] not in DTYPES:
        raise DataError(
            f"{p}: not an IDX file (magic 0x{head.hex()}; expected 0x0000, a dtype code in "
            f"{{08,09,0b,0c,0d,0e}} and ndim)"
        )
    ndim = head[3]
    if not 1 <= ndim <= MAX_NDIM:
        raise DataError(f"{p}: IDX header has ndim={ndim}; only 1 to {MAX_NDIM} are supported")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{p}: IDX header is cut short (ndim={ndim}); re-download the file")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    dtype = np.dtype(DTYPES[head[2]])
    expected = math.prod(dims) * dtype.itemsize  # Python int: cannot overflow
    claim = f"header claims shape {dims} of {dtype.name} = {expected} bytes"

    if size is not None:  # raw: the file size is known, so compare before reading anything
        _check_size(p, claim, expected, size - 4 - 4 * ndim, exact=True)
    if expected > max_bytes:
        raise DataError(
            f"{p}: {claim}, over the {max_bytes}-byte limit; corrupt file (or raise max_bytes)"
        )
    if size is not None:
        buf = bytearray(expected)
        got = f.readinto(buf)
        _check_size(p, claim, expected, got, exact=True)
    else:  # gzip: read at most expected+1 bytes, in chunks, to spot both short and long data
        buf = _read_bounded(f, expected + 1)
        _check_size(p, claim, expected, len(buf), exact=False)

    try:
        arr = np.frombuffer(buf, dtype=dtype).reshape(dims)
    except ValueError as e:  # e.g. an empty array whose other dims overflow numpy's sizes
        raise DataError(f"{p}: {claim}, a shape numpy cannot hold ({_one_line(e)})") from e
    return np.ascontiguousarray(arr.astype(dtype.newbyteorder("="), copy=False))


def _check_size(p: Path, claim: str, expected: int, actual: int, *, exact: bool) -> None:
    """Raise unless ``actual == expected``; ``exact`` says whether ``actual`` is a true count."""
    if actual < expected:
        raise DataError(
            f"{p}: {claim} but only {max(actual, 0)} follow; the file is truncated, re-download it"
        )
    if actual > expected:
        n = actual - expected
        extra = (f"{n} trailing byte" + "s" * (n != 1)) if exact else "trailing bytes"
        raise DataError(f"{p}: {claim} but the payload has {extra}; the header or file is corrupt")


def _read_bounded(f: BinaryIO, limit: int) -> bytearray:
    """Read up to ``limit`` bytes in chunks, so memory grows with the data actually present."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = f.read(min(_CHUNK, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
