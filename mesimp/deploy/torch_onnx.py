"""The one call to ``torch.onnx.export``, with its output silenced.

Exporter choice (measured with torch 2.13, onnxscript 0.7, MLP 784-500-500-10)
    Both exporters give the same graph for the MLP (``Gemm, Relu, Gemm, Relu, Gemm``,
    dynamic ``batch``) and both emit one ``LSTM`` node for ``nn.LSTM``. We use the
    ``torch.export``-based exporter (``dynamo=True``, ``external_data=False``):

    * it has been torch.onnx's default and supported path since PyTorch 2.9; the
      TorchScript exporter is deprecated and warns that it will be removed;
    * ``external_data=False`` gives the single file we want.

    Its costs: about 4 s for the first export in a process (0.9 s after), against
    0.1 s for the TorchScript exporter, and chattier logging, which ``quiet``
    silences. The exporter call lives in one function, ``torch_to_onnx``, which also
    runs the TorchScript exporter (``exporter="torchscript"``); the LSTM families use it
    (``mesimp.deploy.export_lstm`` says why).

``quiet`` is also what keeps onnxruntime's quantizer (``mesimp.deploy.quantize``) from
printing: exporters and quantizers log progress, warn about harmless things and, on
failure, dump whole graphs to the process's file descriptors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.deploy.ort_errors import one_line
from mesimp.errors import BadInputError, MesimpError

__all__ = ["EXPORTERS", "ExportError", "quiet", "torch_to_onnx"]

EXPORTERS = ("dynamo", "torchscript")

# Loggers that print progress or harmless warnings during export/quantization.
_CHATTY_LOGGERS = (
    "",  # onnxruntime.quantization calls logging.warning() on the root logger
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch._export",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
    "onnxruntime",
)


class ExportError(MesimpError):
    """The exporter or the quantizer failed on a model (a runtime failure, exit code 1)."""


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence warnings, chatty loggers and stray prints; yields what was printed.

    Python-level output goes to the yielded buffer; output written straight to file
    descriptors 1 and 2 by C++ code (the TorchScript exporter dumps its whole IR graph
    there on failure) goes to a discarded temp file. Exceptions pass through untouched,
    so real errors still surface (as one line, from the caller).
    """
    buf = io.StringIO()
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _CHATTY_LOGGERS)]
    with contextlib.ExitStack() as stack:
        try:
            for lg, _ in saved:
                lg.setLevel(logging.ERROR)
            stack.enter_context(_fds_to_tempfile())
            stack.enter_context(warnings.catch_warnings())
            stack.enter_context(contextlib.redirect_stdout(buf))
            stack.enter_context(contextlib.redirect_stderr(buf))
            warnings.simplefilter("ignore")
            yield buf
        finally:
            for lg, level in saved:
                lg.setLevel(level)


@contextlib.contextmanager
def _fds_to_tempfile() -> Iterator[None]:
    """Point OS-level stdout/stderr at a temp file for the duration (restored after)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # no such descriptor (e.g. a daemon): nothing to silence
                    continue
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def torch_to_onnx(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    opset: int,
    dynamic_axes: dict[str, dict[int, str]],
    input_names: list[str],
    output_names: list[str],
    exporter: str = "dynamo",
) -> None:
    """The one place that calls ``torch.onnx.export``; writes a single ONNX file.

    ``dynamic_axes`` maps every input and output name to ``{axis: dim_name}``, the
    TorchScript exporter's format; for the dynamo exporter it is translated to
    ``dynamic_shapes`` (inputs only; output shapes follow). Logging and warnings are
    silenced; failures raise ``ExportError`` with the exporter's first line.
    """
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    kwargs: dict[str, Any] = {
        "input_names": input_names,
        "output_names": output_names,
        "opset_version": opset,
    }
    if exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}
        shapes = tuple(
            {
                axis: dims.setdefault(name, torch.export.Dim(name))
                for axis, name in dynamic_axes.get(inp, {}).items()
            }
            or None
            for inp in input_names
        )
        kwargs.update(
            dynamo=True,
            external_data=False,
            dynamic_shapes=shapes,
            verbose=False,
            optimize=True,
            report=False,
        )
    else:
        kwargs.update(dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=True)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(model, example, str(path), **kwargs)
    except Exception as e:  # the exporters raise many unrelated types
        raise ExportError(f"ONNX export failed ({exporter} exporter): {one_line(e, 300)}") from e
    if Path(f"{path}.data").exists():  # guard the single-file promise
        raise ExportError("the exporter wrote external data; expected a single file")
    # The dynamo exporter converts its opset-18 graph to older opsets with onnx's
    # version converter and, where that fails (opset 13 in torch 2.13), quietly keeps 18.
    import onnx

    got = {
        o.version
        for o in onnx.load(str(path), load_external_data=False).opset_import
        if o.domain in ("", "ai.onnx")
    }
    if got != {opset}:
        raise BadInputError(
            f"the {exporter} exporter produced opset {sorted(got)} instead of {opset}; "
            f"choose another --opset (18, the default, always works)"
        )
