"""``MePropConv1D``: meProp for Hugging Face's ``Conv1D`` (GPT-2's Linear, weight ``[in, out]``).

``transformers.pytorch_utils.Conv1D`` computes ``x @ W + b`` with ``W`` stored
``[in, out]``. ``MePropConv1D`` keeps that layout and those parameter names (so a
GPT-2 checkpoint loads into it and its ``state_dict`` loads back), and runs the meProp
backward of ``MePropLinear`` on the ``[out, in]`` view ``W^T``: the same selection,
counters, mask and MSBP memory. The weight gradient is always dense (a row-sparse
gradient of ``W^T`` would be column-sparse in ``W``, which no row-sparse optimizer
takes). mesimp never imports transformers: ``meprop_`` recognises the class by name,
and ``to_plain()`` rebuilds an instance of the original class.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mesimp.nn.linear import MePropCounters, meprop_linear
from mesimp.nn.meprop import MePropConfig

__all__ = ["MePropConv1D", "is_conv1d"]


def is_conv1d(module: object) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2), recognised without importing transformers."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


class MePropConv1D(MePropCounters, nn.Module):
    """HF ``Conv1D`` with a meProp backward; output units are the ``nf`` columns of W."""

    def __init__(self, nf: int, nx: int, config: MePropConfig, plain_cls: type) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)
        self.meprop_config = dataclasses.replace(config, sparse_grad=False)
        self._plain_cls = plain_cls
        self._init_counters(nf, self.weight.device)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config: MePropConfig) -> MePropConv1D:
        """Wrap an existing ``Conv1D``, sharing its parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = int(conv.nf), int(conv.weight.shape[0])
        new.weight, new.bias = conv.weight, conv.bias
        new.meprop_config = dataclasses.replace(config, sparse_grad=False)
        new._plain_cls = type(conv)
        new._init_counters(new.nf, conv.weight.device)
        return new

    def to_plain(self) -> nn.Module:
        """The original ``Conv1D`` class, sharing this layer's parameters."""
        plain = self._plain_cls.__new__(self._plain_cls)
        nn.Module.__init__(plain)
        plain.nf, plain.nx = self.nf, self.nx
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return meprop_linear(self, x, self.weight.t(), self.bias, buffered=False)

    def extra_repr(self) -> str:
        c = self.meprop_config
        s = f"nf={self.nf}, nx={self.nx}, k={c.k}, selection={c.selection}"
        if self._active < self.nf:
            s += f", active={self._active}"
        return s
