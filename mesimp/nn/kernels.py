"""Which meProp path runs: the compiled kernels (``mesimp._C``) or the pure-Python one.

The kernels (``mesimp/csrc/kernels.cpp``, registered as ``torch.ops.mesimp.*``) do the
meProp backward, a whole Linear-ReLU stack as one C++ autograd node, the lazy row-sparse
Adam / Adagrad / SGD step and a whole training step with less dispatch and bookkeeping
than the Python path. The Python path stays: it is the fallback (no compiler, GPU
tensors, dtypes other than float32, ``selection="random"``) and the reference the
kernels are tested against.

Choosing: ``MESIMP_KERNELS=auto|cpp|python`` in the environment (read once, at the first
question), or :func:`set_kernels` from Python. ``auto`` (the default) uses the kernels when
they load; ``cpp`` demands them (an error if they do not load); ``python`` never uses them.

Why build at install time, not on first use: the Makefile installs the exact torch first,
then ``pip install --no-build-isolation -e .`` compiles the one C++ file against it
(~1 min on 2 cores), so the ABI matches and nothing compiles at run time (no compiler
needed on the machine that trains, no cache directory, no first-run stall inside a test
or a training run). A failed build leaves mesimp installed on the Python path.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from mesimp.errors import BadInputError

MODES = ("auto", "cpp", "python")
# the selections kernels.cpp implements (its enum); the others (the reference's heap) run
# on the Python path
SELECTION_CODE = {"unified": 1, "topk": 2, "random": 3}

# the ops this package calls, and the build they need (kernels.cpp's kAbiVersion): an
# older build counts as not built, so a stale extension never receives a code it lacks
_OPS = ("abi_version", "linear_backward", "mlp_forward", "optimizer_step", "mlp_train_step")
ABI = 3

_mode: str | None = None
_loaded: bool | None = None
_load_error: str = ""


def _load() -> bool:
    """Load ``mesimp._C`` once (it registers ``torch.ops.mesimp``); False if it cannot."""
    global _loaded, _load_error
    if _loaded is None:
        spec = importlib.util.find_spec("mesimp._C")
        if spec is None or spec.origin is None:
            _loaded, _load_error = False, "mesimp._C is not built"
        else:
            try:
                torch.ops.load_library(spec.origin)
                _loaded = all(hasattr(torch.ops.mesimp, op) for op in _OPS)
                _loaded = _loaded and torch.ops.mesimp.abi_version() == ABI
                if not _loaded:
                    _load_error = "mesimp._C is out of date: rebuild it (make setup)"
            except (OSError, RuntimeError) as e:
                _loaded, _load_error = False, f"mesimp._C does not load: {e}"
    return _loaded


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


def kernel_name() -> str:
    """``"cpp"`` or ``"python"``: which path float32 CPU tensors take now."""
    return "cpp" if enabled() else "python"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the kernels: on, CPU, float32."""
    if not enabled():
        return False
    return all(t.is_cpu and t.dtype is torch.float32 for t in tensors)
