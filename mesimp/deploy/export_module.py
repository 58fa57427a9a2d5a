"""ONNX export of any ``nn.Module`` (a user's shrunk model), verified against PyTorch.

``mesimp.export_onnx(model, example_inputs, path)`` lands here (a checkpoint path goes
to ``mesimp.export``'s built-in families). One self-contained file through the
``torch.export``-based exporter, axis 0 of every input symbolic (``batch``; more axes
with ``dynamic_axes``, e.g. a sequence axis for token models), inputs named ``input``
(``input_0, input_1, ...`` for several), outputs ``output`` likewise. Before anything
is written the graph must pass ``onnx.checker`` and onnxruntime must match PyTorch on
the example inputs, on a second batch size and, for every other dynamic axis, on a
second size of it (``PARITY_TOL``).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp._version import __version__
from mesimp.deploy.torch_onnx import torch_to_onnx
from mesimp.deploy.verify import check_model, check_parity, ort_session, set_metadata
from mesimp.errors import BadInputError
from mesimp.files.atomic import atomic_write_bytes, check_writable
from mesimp.nn.swap import meprop_layers, unmeprop

__all__ = ["export_module", "export_onnx"]


def _inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs.values())
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise BadInputError("example_inputs must be a tensor or a non-empty tuple of tensors")
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise BadInputError("example_inputs must be tensors (keyword inputs cannot be exported)")
    if any(t.dim() == 0 or t.shape[0] < 1 for t in example_inputs):
        raise BadInputError("every example input needs a batch axis (dim 0) of size >= 1")
    return tuple(example_inputs)


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # a Hugging Face ModelOutput: its tensors (logits, ...)
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise BadInputError(f"the model must return a tensor or a tuple of tensors, got {type(out)}")


class _Keywords(nn.Module):
    """A model called with keyword inputs (``model(input_ids=...)``), called by position,
    returning its output's tensors: what the exporter traces (which needs a fixed
    signature, not ``*args``: up to four keyword inputs)."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        if len(keys) > 4:
            raise BadInputError(f"at most 4 keyword inputs can be exported, got {len(keys)}")
        self.model, self.keys = model, keys

    def forward(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor | None = None,
        x2: torch.Tensor | None = None,
        x3: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        values = (x0, x1, x2, x3)[: len(self.keys)]
        return tuple(_outputs(self.model(**dict(zip(self.keys, values, strict=True)))))


def export_module(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset: int = 18,
    metadata: dict[str, str] | None = None,
    dynamic_axes: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (in eval mode, on CPU) to ``path``; returns ``{path, opset,
    max_abs_diff, n_check, inputs, outputs, size_bytes}``.

    A model with masked meProp units is refused: masks are training-time state, so
    ``mesimp.shrink`` it first. meProp layers without masks export as plain layers.
    ``metadata`` goes into ``metadata_props`` next to ``mesimp_version``.
    ``dynamic_axes``: ``{axis: name}`` symbolic in every input and output (default
    ``{0: "batch"}``; a token model takes ``{0: "batch", 1: "sequence"}``).
    """
    axes_of = _dynamic_axes(dynamic_axes)
    out = Path(path)
    if out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx")
    check_writable(out)
    masked = [n for n, m in meprop_layers(model) if m.active_width < m.mask.numel()]
    if masked:
        raise BadInputError(
            f"{masked[0]} has masked units: shrink the model first "
            "(mesimp.shrink(model, example_inputs))"
        )
    inputs = tuple(t.detach().cpu() for t in _inputs(example_inputs))
    plain = unmeprop(copy.deepcopy(model)).cpu().eval()
    in_names = _names("input", len(inputs))
    if isinstance(example_inputs, dict):  # keyword inputs: named as the keywords
        plain, in_names = _Keywords(plain, list(example_inputs)), list(example_inputs)
    with torch.no_grad():
        ref = _outputs(plain(*inputs))
    out_names = _names("output", len(ref))
    axes = {n: dict(axes_of) for n in in_names + out_names}
    meta = {"mesimp_version": __version__, **(metadata or {})}
    with tempfile.TemporaryDirectory(prefix="mesimp-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        torch_to_onnx(plain, inputs, raw, opset, axes, in_names, out_names, exporter="dynamo")
        import onnx

        proto = onnx.load(str(raw))
        set_metadata(proto, meta)
        check_model(proto, "exported model")
        payload = proto.SerializeToString()
        sess = ort_session(payload)
        # parity at the example's batch size and at another one (the axis is dynamic),
        # and at a shorter size of every other dynamic axis
        checks = [inputs, tuple(torch.cat([t, t[:1]]) for t in inputs)]
        for axis in sorted(a for a in axes_of if a != 0):
            if all(t.dim() > axis and t.shape[axis] > 1 for t in inputs):
                checks.append(tuple(t.narrow(axis, 0, t.shape[axis] - 1) for t in inputs))
        got, want = [], []
        for feed in checks:
            with torch.no_grad():
                want += [o.numpy() for o in _outputs(plain(*feed))]
            res = sess.run(None, {n: t.numpy() for n, t in zip(in_names, feed, strict=True)})
            got += [np.asarray(r) for r in res]
        diff = check_parity(got, want, sum(len(c[0]) for c in checks))
    atomic_write_bytes(out, payload)
    return {
        "path": str(out),
        "opset": opset,
        "max_abs_diff": diff,
        "n_check": sum(len(c[0]) for c in checks),
        "inputs": [
            {"name": n, "shape": [axes_of.get(i, d) for i, d in enumerate(t.shape)]}
            for n, t in zip(in_names, inputs, strict=True)
        ],
        "outputs": out_names,
        "metadata": meta,
        "size_bytes": out.stat().st_size,
    }


def _dynamic_axes(axes: dict[int, str] | None) -> dict[int, str]:
    if axes is None:
        return {0: "batch"}
    if (
        not isinstance(axes, dict)
        or not all(isinstance(a, int) and a >= 0 and isinstance(n, str) for a, n in axes.items())
        or axes.get(0) is None
    ):
        raise BadInputError(
            f"dynamic_axes must map axis numbers to names, axis 0 included, got {axes!r}"
        )
    return dict(axes)


def export_onnx(source: str | os.PathLike | nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``mesimp.export_onnx``: ``(model, example_inputs, path, ...)`` for any module
    (``export_module``), or ``(checkpoint.pt, ...)`` for mesimp's checkpoints
    (``mesimp.export.export_onnx``: the built-in families, int8 and all)."""
    if isinstance(source, nn.Module):
        return export_module(source, *args, **kwargs)
    from mesimp.deploy.export import export_onnx as export_checkpoint

    return export_checkpoint(source, *args, **kwargs)
