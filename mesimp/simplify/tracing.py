"""Trace a model of plain modules into Torch-Pruning's ``DependencyGraph``.

mesimp's only tracer is Torch-Pruning's (autograd on example inputs). What this module
adds: the leaves with mesimp's own pruners (``nn.LSTM``, attention blocks, HF
``Conv1D``, RMS norms; see ``mesimp.simplify.leaves``), opaque while tracing; eval mode
while tracing (so BatchNorm statistics do not move), restored after; and a one-line
``TracingError`` for inputs that do not run or a graph Torch-Pruning cannot build.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, MesimpError
from mesimp.simplify.attention import AttentionPruner, head_layout
from mesimp.simplify.leaves import Conv1DPruner, NormPruner, is_conv1d, is_rms_norm, opaque_leaves

__all__ = [
    "TracingError",
    "cast_floats",
    "deadline",
    "leaf_pruners",
    "reached_names",
    "run_model",
    "trace",
    "tp",
]

# how long reading one model's groups may take before it counts as a tracer that loops
DEADLINE_S = 120


class TracingError(BadInputError):
    """The model could not be traced on the example inputs, or a layer was not reached."""


def tp() -> Any:
    """``torch_pruning``, with a one-line message if it is missing. It imports timm when
    installed, and timm imports torchvision, which beside the CPU torch wheel needs
    mesimp's shim first (``mesimp.integrations.torchvision_cpu``)."""
    if importlib.util.find_spec("torchvision") is not None:
        from mesimp.integrations.torchvision_cpu import load

        load()
    try:
        import torch_pruning
    except ImportError as e:  # a runtime dependency; a one-line message if it is missing
        raise MesimpError("this needs torch-pruning (pip install 'torch-pruning==1.6.1')") from e
    return torch_pruning


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(*example_inputs)`` (a tensor, a tuple of them, or a dict of keywords)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def leaf_pruners(model: nn.Module) -> dict[type, Any]:
    """mesimp's pruners for the module types of ``model`` that are leaves, by type."""
    pruners: dict[type, Any] = {}
    for m in model.modules():
        t = type(m)
        if t in pruners:
            continue
        if isinstance(m, nn.LSTM):
            from mesimp.simplify.lstm_pruner import LSTMPruner

            pruners[nn.LSTM] = LSTMPruner()
        elif head_layout(m) is not None:
            pruners[t] = AttentionPruner()
        elif is_conv1d(m):
            pruners[t] = Conv1DPruner()
        elif is_rms_norm(m):
            pruners[t] = NormPruner()
    return pruners


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def trace(plain: nn.Module, example_inputs: Any) -> Any:
    """The dependency graph of a model of plain modules (meProp layers swapped back),
    traced in place in eval mode and float32 (Torch-Pruning reads autograd's graph, and
    a float64 ``nn.LSTM`` runs another kernel whose graph it mis-maps); the model's mode
    and dtype are restored (``Module.to`` keeps the module objects the graph holds)."""
    torch_pruning = tp()
    training = plain.training
    dtype = next((p.dtype for p in plain.parameters() if p.is_floating_point()), None)
    if dtype is not None and dtype != torch.float32:
        plain.float()
        example_inputs = cast_floats(example_inputs, torch.float32)
    plain.eval()  # tracing must not move BatchNorm's running statistics
    try:
        try:
            with torch.enable_grad():
                run_model(plain, example_inputs)  # a clear message for inputs that do not fit
        except Exception as e:  # any error of the user's forward: report it in one line
            raise TracingError(
                "the example inputs do not run through the model: "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from None
        pruners = leaf_pruners(plain)
        leaves = [m for m in plain.modules() if type(m) in pruners and not isinstance(m, nn.LSTM)]
        inputs, forward_fn = example_inputs, _forward_fn(example_inputs)
        if isinstance(example_inputs, list):
            inputs = tuple(example_inputs)
        try:
            with torch.enable_grad(), opaque_leaves(leaves), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TP's notes on unwrapped parameters
                return torch_pruning.DependencyGraph().build_dependency(
                    plain,
                    example_inputs=inputs,
                    forward_fn=forward_fn,
                    customized_pruners=pruners or None,
                    verbose=False,
                )
        except Exception as e:  # Torch-Pruning raises many types while tracing
            raise TracingError(
                f"Torch-Pruning could not trace the model: {type(e).__name__}: {_first_line(e)}"
            ) from None
    finally:
        plain.train(training)
        if dtype is not None and dtype != torch.float32:
            plain.to(dtype)


def reached_names(dg: Any) -> set[str]:
    """Names of the modules the trace reached (as named in the traced model, which a
    meProp model shares with its plain copy); empty without a graph."""
    if dg is None:
        return set()
    return {dg._module2name[m] for m in dg.module2node if m in dg._module2name}


def cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """``x`` (a tensor, or dicts / tuples / lists of them) with its floating-point tensors
    in ``dtype``; integer tensors (token ids) and other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(cast_floats(v, dtype) for v in x)
    return x


def _forward_fn(example_inputs: Any) -> Any:
    """How TP calls the model; outputs with a ``logits`` field (Hugging Face) give it."""

    def call(model: nn.Module, x: Any) -> Any:
        out = run_model(model, x)
        if not isinstance(out, (torch.Tensor, tuple, list, dict)) and hasattr(out, "logits"):
            return out.logits  # a ModelOutput dataclass: TP flattens tensors only
        if isinstance(out, dict) and "logits" in out:
            return out["logits"]
        return out

    return call


@contextlib.contextmanager
def deadline(what: str, seconds: float | None = None) -> Iterator[None]:
    """Raise ``TracingError`` if the block runs longer than ``seconds`` (default
    ``DEADLINE_S``, read at the call): Torch-Pruning's
    index mapping can loop for a very long time on some graphs (strided slices
    concatenated on the channel dimension, as in Swin's patch merging). A timer signal,
    so only in the main thread (elsewhere the block runs unbounded)."""
    seconds = DEADLINE_S if seconds is None else seconds
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expired(_signum: int, _frame: Any) -> None:
        raise TracingError(
            f"{what} did not finish in {seconds:g} s: Torch-Pruning's dependency graph "
            "loops on this model (e.g. strided slices concatenated on channels)"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
