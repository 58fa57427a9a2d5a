"""Multiply-accumulates per layer of any model, measured on example inputs.

The built-in families count their MACs from their config (``mesimp.models.count_macs``);
a user's model is measured instead: one forward with hooks on every layer that holds
weights (``nn.Linear``, convolutions, HF ``Conv1D``, ``nn.LSTM``), each counted from the
shapes it saw. The score matmuls of attention (``q k^T``, ``attn v``) hold no weights
and are not counted: what a structural prune changes is the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mesimp.nn.conv1d import MePropConv1D, is_conv1d

__all__ = ["layer_macs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """``{layer name: MACs}`` of one forward of ``model`` on ``example_inputs`` (a
    tensor, a tuple, or a dict of keywords), in eval mode and without gradients; a
    layer called twice counts twice. The model's mode is restored."""
    from mesimp.simplify.tracing import run_model

    macs: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
        n = _macs(mod, inp, out)
        if n:
            macs[names[mod]] = macs.get(names[mod], 0) + n

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counted(m)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return macs


def _counted(m: nn.Module) -> bool:
    layers = (nn.Linear, *_CONVS, nn.LSTM, MePropConv1D)
    return isinstance(m, layers) or is_conv1d(m) or _lstm_like(m)


def _lstm_like(m: nn.Module) -> bool:
    return hasattr(m, "weight_ih_l0") and hasattr(m, "hidden_size")


def _macs(mod: nn.Module, inp: tuple, out: Any) -> int:
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return 0
    if isinstance(mod, _CONVS):
        per_out = mod.in_channels // mod.groups
        for k in mod.kernel_size:
            per_out *= k
        return out.numel() * per_out
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    if is_conv1d(mod) or isinstance(mod, MePropConv1D):  # weight [in, out]
        return out.numel() * int(mod.weight.shape[0])
    if isinstance(mod, nn.LSTM) or _lstm_like(mod):
        steps = out.numel() // (
            mod.hidden_size * (2 if getattr(mod, "bidirectional", False) else 1)
        )
        h = mod.hidden_size
        return (
            steps
            * 4
            * h
            * (mod.input_size + h)
            * (2 if getattr(mod, "bidirectional", False) else 1)
        )
    return 0
