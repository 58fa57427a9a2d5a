"""Which meProp path runs: the compiled kernels (``mesimp._C``) or the pure-Python one.

The kernels (``mesimp/csrc/kernels.cpp``, registered as ``torch.ops.mesimp.*``) do the
meProp backward, a whole chain of Linear layers as one C++ autograd node, the lazy
row-sparse Adam(W) / Adagrad / SGD step and a whole training step with less dispatch and
bookkeeping than the Python path. The Python path stays: it is the fallback (no compiler,
GPU tensors, dtypes other than float32, the reference's heap selection) and the reference
the kernels are tested against.

Choosing: ``MESIMP_KERNELS=auto|cpp|python`` in the environment (read once, at the first
question), or :func:`set_kernels` from Python. ``auto`` (the default) uses the kernels when
they load; ``cpp`` demands them (an error if they do not load); ``python`` never uses them.

Where they come from (the first that loads, see :func:`info`):

1. ``mesimp._C``, compiled at install time where torch was importable then (the
   Makefile's ``pip install --no-build-isolation``): nothing compiles at run time;
2. the per-user cache (``mesimp.nn.build``), keyed by torch's build and the sources;
3. a first-use build into that cache, where a C++ compiler exists and
   ``MESIMP_BUILD_KERNELS`` is not ``0``: ``pip install .`` with build isolation (pip's
   default) cannot compile them, since torch is hidden from ``setup.py`` there
   (``mesimp.nn.build`` says why declaring torch as a build requirement is no cure).

A run that ends on the Python path for want of a build warns once (``RuntimeWarning``),
with the one command that builds them. A library built from other sources (its ABI tag,
read from the file before loading) is skipped, so a stale one never receives a
selection code it does not know.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

import torch

from mesimp.errors import BadInputError

MODES = ("auto", "cpp", "python")
# the selections kernels.cpp implements (its enum); the others (the reference's heap) run
# on the Python path
SELECTION_CODE = {"unified": 1, "topk": 2, "random": 3}

# the ops this package calls, and the build they need (kernels.cpp's kAbiVersion)
_OPS = ("abi_version", "linear_backward", "mlp_forward", "optimizer_step", "mlp_train_step")
ABI = 3

_mode: str | None = None
_loaded: bool | None = None
_load_error: str = ""
_library: str = ""  # the file loaded
_source: str = ""  # "installed", "cache" or "built now"
_warned = False
_log = logging.getLogger("mesimp")


def _try_library(path: str) -> str:
    """Load the library at ``path`` (it registers ``torch.ops.mesimp``); "" on success,
    else why not. A library of another ABI is not loaded at all."""
    from mesimp.nn import build

    try:
        abi = build.abi_of(path)
    except OSError as e:
        return f"{path} cannot be read: {e}"
    if abi != ABI:
        return f"{path} was built from other sources (ABI {abi}, this mesimp needs {ABI})"
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        return f"{path} does not load: {e}"
    if not all(hasattr(torch.ops.mesimp, op) for op in _OPS):
        return f"{path} lacks some of the ops"
    return ""


def _may_build() -> str:
    """ "" where a first-use build may run, else why not."""
    from mesimp.nn import build

    if os.environ.get("MESIMP_BUILD_KERNELS", "1").strip() == "0":
        return "MESIMP_BUILD_KERNELS=0"
    if build.compiler() is None:
        return build.no_compiler()
    if not all((build.csrc() / f).is_file() for f in (*build.SOURCES, *build.HEADERS)):
        return f"the kernel sources are not installed ({build.csrc()})"
    return ""


def _load(allow_build: bool = True) -> bool:
    """Find and load the kernels once (installed, cached, or built now); False if none.
    ``allow_build=False`` never compiles: where only a build could give them, it answers
    False for now and decides nothing (a later call may still build them)."""
    global _loaded, _load_error, _library, _source
    if _loaded is not None:
        return _loaded
    from mesimp.nn import build

    reasons = []
    spec = importlib.util.find_spec("mesimp._C")
    candidates = []
    if spec is not None and spec.origin is not None:
        candidates.append((spec.origin, "installed"))
    else:
        reasons.append("mesimp._C is not built")
    try:
        cached = build.cached_library()
    except OSError as e:  # the sources are not installed
        cached = None
        reasons.append(f"no kernel sources: {e}")
    if cached is not None and cached.is_file():
        candidates.append((str(cached), "cache"))
    for path, source in candidates:
        why = _try_library(path)
        if not why:
            _loaded, _library, _source = True, path, source
            return True
        reasons.append(why)
    why_not = _may_build() if cached is not None else "no kernel sources"
    if not why_not and not allow_build:
        return False
    if not why_not:
        try:
            path = str(build.ensure_built(log=_log.warning))
        except (build.BuildError, OSError) as e:
            reasons.append(f"compiling them failed: {e}")
        else:
            why = _try_library(path)
            if not why:
                _loaded, _library, _source = True, path, "built now"
                return True
            reasons.append(why)
    else:
        reasons.append(f"no first-use build: {why_not}")
    _loaded, _load_error = False, "; ".join(reasons)
    return False


def build_command() -> str:
    """The one command that compiles the kernels for this interpreter's torch."""
    return f"{sys.executable} -m mesimp.nn.build"


def _warn_fallback() -> None:
    """Once per process: meProp runs on the Python path because no build loads."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"mesimp: meProp is running on its pure-Python path (several times slower) because "
        f"the compiled kernels are unavailable: {_load_error}. Build them with: "
        f"{build_command()}",
        RuntimeWarning,
        stacklevel=3,
    )


def info() -> dict:
    """Where the kernels stand: the mode, the path float32 CPU tensors take, the library
    and where it came from, or why there is none (``mesimp info --env``)."""
    from mesimp.nn import build

    on = mode() != "python" and _load(allow_build=False)  # answering starts no build
    error = _load_error or None
    if mode() != "python" and _loaded is None:
        error = "not built yet: the first meProp backward compiles them (~1-2 min, once)"
    out = {
        "mode": mode(),
        "path": "cpp" if on else "python",
        "loaded": bool(_loaded),
        "library": _library or None,
        "source": _source or None,
        "abi": ABI,
        "error": error,
        "cache_dir": str(build.cache_root()),
        "compiler": build.compiler(),
        "build_command": build_command(),
    }
    return out


def available() -> bool:
    """Whether the compiled kernels are built and load with this torch."""
    return _load()


def set_kernels(mode: str) -> None:
    """``auto`` (kernels if built), ``cpp`` (kernels or an error) or ``python``."""
    global _mode
    if mode not in MODES:
        raise BadInputError(f"kernels must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "cpp" and not _load():
        raise BadInputError(f"compiled kernels requested but unavailable: {_load_error}")
    _mode = mode


def mode() -> str:
    """The chosen mode; the first call reads ``MESIMP_KERNELS`` (default ``auto``)."""
    if _mode is None:
        set_kernels(os.environ.get("MESIMP_KERNELS", "auto").strip().lower() or "auto")
    return _mode


def enabled() -> bool:
    """Whether the compiled path is on (the mode allows it and the kernels load)."""
    return mode() != "python" and _load()


def kernel_name(allow_build: bool = True) -> str:
    """``"cpp"`` or ``"python"``: which path float32 CPU tensors take now. With
    ``allow_build=False`` a first-use build is not started to answer (``"python"`` then
    means: none loaded yet)."""
    return "cpp" if mode() != "python" and _load(allow_build) else "python"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the kernels: on, CPU, float32. The first time that
    float32 CPU tensors miss them for want of a build (mode ``auto``), it warns once."""
    if not enabled():
        if not _warned and _mode == "auto" and _loaded is False:
            if all(t.is_cpu and t.dtype is torch.float32 for t in tensors):
                _warn_fallback()
        return False
    return all(t.is_cpu and t.dtype is torch.float32 for t in tensors)
