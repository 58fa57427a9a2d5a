"""Compile the meProp kernels (``mesimp/csrc``) on first use, into a per-user cache.

Why: ``pip install .`` builds a package in an isolated environment that has no torch
(pip's default build isolation), so ``setup.py`` cannot compile the kernels there. Declaring
torch in ``build-system.requires`` would make pip install *a* torch into that environment:
the newest one the index has (with GBs of CUDA packages on PyPI), whose C++ ABI need not
match the torch the package then runs with, and an extension built against one torch
does not load into another. So an install that did not compile them gets them here,
against exactly the torch that is running: compiled by the system's C++ compiler into
``$MESIMP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mesimp``, ``~/.cache/mesimp``), in a
directory keyed by torch's version and build and by a hash of the sources and flags, so
another torch or changed sources build anew and a stale library is never loaded.

``python -m mesimp.nn.build`` builds them ahead of time (what the fallback warning
says to run); ``mesimp.nn.kernels`` builds them automatically on first use where a
compiler exists, unless ``MESIMP_BUILD_KERNELS=0``. No ninja or setuptools needed: the
sources are compiled with the compiler directly, in parallel, with ``setup.py``'s flags.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

# setup.py's flags (tests/test_isa_bits.py checks that the two agree): -O3 and a
# portable ISA (no -march=native; the hot loops carry GCC target_clones), no FMA
# contraction so that every ISA gives the same bits, no errno so that sqrt vectorizes
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
SOURCES = ("kernels.cpp", "lstm_kernels.cpp")
HEADERS = ("select.h",)
LIBRARY = "_C.so"
# the version string the library carries (kernels.cpp's kAbiTag), readable without
# loading it: a library built from other sources is never loaded (its ops would take
# the namespace, and a second library could not register it again)
ABI_TAG = b"MESIMP_KERNELS_ABI="


class BuildError(RuntimeError):
    """The kernels could not be compiled (no compiler, a compiler error)."""


def csrc() -> Path:
    return Path(__file__).resolve().parents[1] / "csrc"


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``c++`` or ``g++`` on the PATH; None if none."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


def no_compiler() -> str:
    cxx = os.environ.get("CXX")
    return f"CXX={cxx} is not a compiler on the PATH" if cxx else "no C++ compiler (install g++)"


def cache_root() -> Path:
    root = os.environ.get("MESIMP_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mesimp"


def build_key(extra: Sequence[str] = ()) -> str:
    """A hash of what the library depends on: torch's version and build, the C++ ABI, the
    machine, the flags and every source byte."""
    h = hashlib.sha256()
    parts = [
        torch.__version__,
        str(torch.version.git_version),
        str(torch._C._GLIBCXX_USE_CXX11_ABI),
    ]
    parts += [platform.machine(), *CFLAGS, *extra]
    h.update("\0".join(parts).encode())
    for name in (*SOURCES, *HEADERS):
        h.update((csrc() / name).read_bytes())
    return h.hexdigest()[:16]


def cached_library(extra: Sequence[str] = ()) -> Path:
    """Where the library for this torch and these sources lives in the cache."""
    return cache_root() / "kernels" / f"torch-{torch.__version__}-{build_key(extra)}" / LIBRARY


def abi_of(path: str | Path) -> int | None:
    """The ABI version a library was built with (its ``ABI_TAG``), read from the file."""
    data = Path(path).read_bytes()
    i = data.find(ABI_TAG)
    if i < 0:
        return None
    digits = data[i + len(ABI_TAG) : i + len(ABI_TAG) + 8].split(b"\0")[0]
    return int(digits) if digits.isdigit() else None


def _flags(extra: Sequence[str]) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [*CFLAGS, *extra, "-std=c++20", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += ["-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    return flags + [f"-I{p}" for p in include_paths()]


def compile_kernels(out: Path, extra: Sequence[str] = (), log: Path | None = None) -> Path:
    """Compile ``mesimp/csrc`` into the shared library ``out`` (written atomically: a
    temporary file renamed into place). The compiler's output goes to ``log``."""
    from torch.utils.cpp_extension import library_paths

    cxx = compiler()
    if cxx is None:
        raise BuildError(no_compiler())
    out.parent.mkdir(parents=True, exist_ok=True)
    log = log or out.with_name("build.log")
    flags = _flags(extra)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp, open(log, "w") as f:
        objs = [Path(tmp) / (Path(s).stem + ".o") for s in SOURCES]
        procs = [
            subprocess.Popen([cxx, *flags, "-c", str(csrc() / s), "-o", str(o)], stdout=f, stderr=f)
            for s, o in zip(SOURCES, objs, strict=True)
        ]
        failed = [p.args[-3] for p in procs if p.wait() != 0]
        if failed:
            raise BuildError(f"compiling {', '.join(failed)} failed (see {log})")
        lib = Path(tmp) / LIBRARY
        libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
        link = [cxx, "-shared", *map(str, objs), "-o", str(lib), *libs]
        if subprocess.run(
            [*link, "-lc10", "-ltorch", "-ltorch_cpu"], stdout=f, stderr=f
        ).returncode:
            raise BuildError(f"linking the kernels failed (see {log})")
        os.replace(lib, out)
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (several processes may start at once: DDP ranks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The cached library for this torch and these sources, compiled first if it is not
    there yet (or ``force``); one process compiles, the others wait for it."""
    out = cached_library()
    with _locked(out.parent.with_name(out.parent.name + ".lock")):
        if out.is_file() and not force:
            return out
        if log:
            log(
                f"mesimp: compiling the meProp kernels for torch {torch.__version__} "
                f"(once; ~1-2 min) into {out.parent}"
            )
        return compile_kernels(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mesimp.nn.build",
        description="Compile mesimp's meProp kernels for the torch installed here, into "
        "the per-user cache that mesimp loads them from when the install did not build them.",
    )
    p.add_argument("--force", action="store_true", help="compile even if already cached")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = ensure_built(args.force, log=lambda m: print(m, file=sys.stderr))
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
