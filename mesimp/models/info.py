"""A summary of a checkpoint: what ``mesimp info`` prints and ``shrink`` reports."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from mesimp.models import CNN, count_macs, count_params, hidden_sizes, linear_layers
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per layer: name, in/out widths, active outputs, params and MACs.

    LSTM models list their LSTM layers (MACs per time step, ``4h(in + h)``; active =
    the unmasked units of a meProp LSTM) before the output Linear, so that every row but
    the last is a hidden layer, as for MLPs."""
    rows = []
    stack = getattr(model, "stack", None)
    for i, m in enumerate(getattr(stack, "lstms", None) or []):
        h, n_in = int(m.hidden_size), int(m.input_size)
        mask = getattr(m, "mask", None)
        rows.append(
            {
                "name": f"stack.lstms.{i}",
                "in_features": n_in,
                "out_features": h,
                "active": int(mask.sum()) if mask is not None else h,
                "params": sum(p.numel() for p in m.parameters()),
                "macs": 4 * h * (n_in + h),
            }
        )
    if isinstance(model, CNN):  # conv blocks (MACs per image), then the head
        for i, (conv, macs) in enumerate(zip(model.convs(), model.conv_macs(), strict=True)):
            rows.append(
                {
                    "name": f"features.{3 * i}",
                    "in_features": conv.in_channels,
                    "out_features": conv.out_channels,
                    "active": getattr(conv, "active_width", conv.out_channels),
                    "params": sum(p.numel() for p in conv.parameters()),
                    "macs": macs,
                }
            )
    for name, m in linear_layers(model):
        active = m.active_width if isinstance(m, MePropLinear) else m.out_features
        rows.append(
            {
                "name": name,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "active": active,
                "params": sum(p.numel() for p in m.parameters()),
                "macs": m.in_features * m.out_features,
            }
        )
    return rows


def counter_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Update counts per meProp layer: examples seen and selection-frequency quantiles."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (MePropLinear, MePropConv2d)):
            continue
        ref = int(m.ref)
        active = m.hits[m.mask].double()
        freq = (active / ref) if ref and active.numel() else active.new_zeros(0)
        out.append(
            {
                "name": name,
                "ref": ref,
                "active": m.active_width,
                "k": m.k,
                "selection": m.meprop_config.selection,
                "never_selected": int((active == 0).sum()) if ref else None,
                "freq_min": float(freq.min()) if freq.numel() else None,
                "freq_median": float(freq.median()) if freq.numel() else None,
                "freq_max": float(freq.max()) if freq.numel() else None,
            }
        )
    return out


def model_info(model: nn.Module, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``info`` JSON object (docs/file-formats.md, "info --json")."""
    metrics = ((ckpt or {}).get("train") or {}).get("metrics") or {}
    return {
        "model": ((ckpt or {}).get("arch") or {}).get("model", type(model).__name__.lower()),
        "arch": (ckpt or {}).get("arch"),
        "hidden_sizes": hidden_sizes(model),
        "active_widths": [r["active"] for r in layer_table(model)[:-1]],
        "params": count_params(model),
        "macs": count_macs(model),
        "dev_accuracy": metrics.get("dev_accuracy"),
        "test_accuracy": metrics.get("test_accuracy"),
        # a parser's attachment scores (its accuracies are transition accuracy)
        **{k: metrics[k] for k in ("dev_uas", "dev_las", "test_uas", "test_las") if k in metrics},
        "layers": layer_table(model),
        "counters": counter_summary(model),
    }


def onnx_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``info`` object of an ONNX file: sizes read from the graph, plus its metadata."""
    from mesimp.deploy.onnx_graph import load_model_info

    # refuses non-ONNX files with a one-line BadInputError
    base = load_model_info(path, metadata=True)
    arch = base["arch"]
    return {
        "path": str(path),
        "format": "onnx",
        "model": arch.get("model", "onnx") if isinstance(arch, dict) else "onnx",
        "hidden_sizes": base.get("hidden_sizes"),
        "params": base["params"],
        "macs": base["macs"],
        "size_bytes": base["size_bytes"],
        "input": base["input"],
        "quantization": base.get("quantization"),
        "metadata": base["metadata"],
    }


def path_info(path: str | os.PathLike) -> dict[str, Any]:
    """``mesimp info`` for a checkpoint (``.pt``) or an ONNX file (``.onnx``)."""
    if str(path).endswith(".onnx"):
        return onnx_info(path)
    from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    return {
        "path": str(path),
        "format": "checkpoint",
        **model_info(model_from_checkpoint(ckpt), ckpt),
    }
