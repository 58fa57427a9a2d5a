"""Run safety for training: RNG snapshots, a one-writer lock, stop signals, finite checks.

Kept apart from the training loop (``mesimp.training.loop``) so each piece can be read and
tested on its own; none of it knows about models or configs.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp.errors import MesimpError
from mesimp.files.checkpoint import NonFiniteError


# --------------------------------------------------------------------------------------
# RNG state as plain types and tensors (loadable with weights_only=True)
# --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU, and CUDA once it is in use), numpy (legacy global) and python
    ``random`` states."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {
        "cuda": cuda,
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One training process per output: an advisory ``flock`` on ``.RUN.pt.lock``.

    Two processes writing the same RUN.pt/RUN.last.pt (say, ``--resume`` while the
    interrupted run is in fact still going, because it ignored SIGINT as background
    jobs do) would interleave their files. The kernel drops the lock when a process
    dies, even by ``kill -9``, so a lock file left behind is harmless; a finished run
    removes it. Best effort: a no-op where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise MesimpError(
            f"{out} is being written by another running 'mesimp train' (it holds {lock}); "
            "stop it first, or choose another -o"
        ) from e
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: no one can grab a stale one
        os.close(fd)


def remove_stale_temp_files(*paths: Path) -> None:
    """Remove the temp files that a killed run (``kill -9`` mid-write) left next to its
    outputs: ``.NAME.XXXXXXXX.tmp``, as ``mesimp.atomic`` names them. The files
    themselves are intact (writes are atomic); this only stops the litter piling up.
    Safe because the run lock is held: no other process is writing these files."""
    for p in paths:
        for tmp in p.parent.glob(f".{glob_escape(p.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


class TrainingInterrupted(MesimpError):
    """SIGINT/SIGTERM stopped training after a complete step; RUN.last.pt holds it.

    ``exit_code`` is the shell's convention, 128 + signal number (130, 143).
    """

    def __init__(self, message: str, signum: int, resume_path: Path) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.resume_path = resume_path


class TrainingDiverged(NonFiniteError):
    """The loss or a gradient became NaN/Inf; nothing from that step on was saved."""


# --------------------------------------------------------------------------------------
# signals and finite checks
# --------------------------------------------------------------------------------------
class StopSignals:
    """Records SIGINT/SIGTERM instead of dying, so the loop can stop after a step.

    Installed only for the duration of ``train()`` and only in the main thread; a
    signal that was ignored (``nohup``, a background job) stays ignored. A second
    signal stops at once with ``KeyboardInterrupt`` (RUN.last.pt keeps its previous
    content: writes are atomic).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is None:
                    continue
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


def nonfinite_grad(named: list[tuple[str, nn.Parameter]]) -> str | None:
    """Name of the first parameter whose gradient holds NaN/Inf, else None.

    One ``sum()`` per gradient and one sync (row-sparse gradients only sum their k
    rows). A non-finite sum is confirmed exactly, since huge but finite values could
    overflow it.
    """
    grads = [
        (n, p.grad._values() if p.grad.is_sparse else p.grad)
        for n, p in named
        if p.grad is not None
    ]
    if not grads or bool(torch.isfinite(torch.stack([g.sum() for _, g in grads])).all()):
        return None
    for n, g in grads:
        if not bool(torch.isfinite(g).all()):
            return n
    return None
