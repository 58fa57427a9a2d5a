"""meSimp: simplify a network during meProp training from its update counters.

At a simplification point every prunable layer masks the neurons with
``hits[j] < floor(prune_rate * ref)`` (selected in fewer than ``prune_rate`` of the
examples since the last point), then resets its counts. Masked neurons never come
back; ``mesimp.shrink`` (any model) or ``mesimp shrink`` (a checkpoint) later
removes them physically.

Differences from the C# reference (lancopku/meSimp), on purpose:

* Selection only picks active neurons (masked ones score -1 in ``meprop.select``),
  so counts are never wasted on dead units.
* An int ``k`` is capped at the active width and a fractional ``k`` scales with it
  (``MePropConfig.resolve_k``). The reference kept k fixed, so at width 154 with
  k=160 every unit, and some masked ones, were "selected" and the rule stopped
  meaning anything.
* Ties: ``topk`` among equal scores is implementation-defined rather than biased to
  low indices; the rule itself compares counts, which are exact integers.
* ``min_width`` keeps the most-selected units of a layer so it never vanishes.
* The optimizer is reset **once** at each cycle start (the reference reset Adam at
  every simplification point of a cycle's last epoch: 8 times).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError
from mesimp.models import linear_layers
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear
from mesimp.nn.lstm import MePropLSTM


@dataclass
class SimplifyConfig:
    """When and how hard to simplify.

    ``prune_rate``: a neuron survives a point if it was selected in at least this
    fraction of the examples since the previous point. ``points_per_epoch``:
    simplification points per epoch. ``cycle_epochs``: length of a cycle; cycles
    alternate simplifying / plain meProp (0 = every epoch simplifies).
    ``min_width``: no layer goes below this many units.
    """

    prune_rate: float = 0.01
    points_per_epoch: int = 4
    cycle_epochs: int = 1
    min_width: int = 1

    def __post_init__(self) -> None:
        check_prune_rate(self.prune_rate)
        if self.points_per_epoch < 1:
            raise BadInputError(
                f"simplification points per epoch must be >= 1, got {self.points_per_epoch}"
            )
        if self.cycle_epochs < 0:
            raise BadInputError(f"cycle epochs must be >= 0, got {self.cycle_epochs}")
        if self.min_width < 0:
            raise BadInputError(f"min width must be >= 0, got {self.min_width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_prune_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise BadInputError(f"prune rate must be in [0, 1), got {rate}")
    return rate


def keep_rule(hits: torch.Tensor, ref: int | torch.Tensor, prune_rate: float) -> torch.Tensor:
    """``hits[j] >= floor(prune_rate * ref)``: the neurons that survive."""
    threshold = math.floor(prune_rate * int(ref))
    return hits >= threshold


def unit_keep_rule(hits: torch.Tensor, ref: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """``keep_rule`` per unit, each with its own reference count (a group unit's)."""
    threshold = torch.tensor([math.floor(prune_rate * int(r)) for r in ref.tolist()])
    return hits >= threshold


def prunable_layers(model: nn.Module) -> list[tuple[str, MePropLinear | MePropLSTM]]:
    """Hidden meProp layers: ``MePropLinear`` except the output layer (the last Linear),
    and ``MePropLSTM`` (its hidden units). Inputs and outputs are never pruned."""
    linears = linear_layers(model)
    output = linears[-1][1] if linears else None
    return [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, MePropLinear) and m is not output) or isinstance(m, MePropLSTM)
    ]


def keep_with_min_width(
    hits: torch.Tensor, active: torch.Tensor, keep: torch.Tensor, min_width: int
) -> torch.Tensor:
    """``keep & active``, topped up with the most-hit active units to ``min_width``."""
    keep = keep & active
    need = min(min_width, int(active.sum()))
    if int(keep.sum()) >= need:
        return keep
    score = torch.where(active, hits.double(), torch.tensor(-1.0, dtype=torch.double))
    order = torch.argsort(score, descending=True, stable=True)
    out = torch.zeros_like(keep)
    out[order[:need]] = True
    return out | keep


def simplify_step(model: nn.Module, prune_rate: float, min_width: int = 1) -> list[int]:
    """One simplification point on a chain model's prunable layers (see ``Simplifier``)."""
    return simplify_layers([m for _, m in prunable_layers(model)], prune_rate, min_width)


def simplify_layers(layers: Iterable[Any], prune_rate: float, min_width: int = 1) -> list[int]:
    """One simplification point: mask, reset counts; returns the active widths."""
    widths = []
    for layer in layers:
        if int(layer.ref) > 0:
            keep = keep_rule(layer.hits, layer.ref, prune_rate)
            layer.apply_mask(keep_with_min_width(layer.hits, layer.mask, keep, min_width))
        layer.reset_counters()
        widths.append(layer.active_width)
    return widths


def active_widths(model: nn.Module) -> list[int]:
    """Active width per hidden layer, in module order (plain layers count as fully active)."""
    linears = linear_layers(model)
    output = linears[-1][1] if linears else None
    widths = []
    for _, m in model.named_modules():
        if isinstance(m, (MePropLinear, MePropLSTM, MePropConv2d)) and m is not output:
            widths.append(m.active_width)
        elif isinstance(m, nn.Conv2d):
            widths.append(m.out_channels)
        elif isinstance(m, nn.LSTM):
            widths.append(m.hidden_size)
        elif isinstance(m, nn.Linear) and m is not output:
            widths.append(m.out_features)
    return widths


class SimplifySchedule:
    """Decides, step by step, when to simplify and when to reset the optimizer.

    Epoch e belongs to cycle ``e // cycle_epochs``; even cycles simplify, odd ones
    are plain meProp. Points fall at evenly spaced steps inside simplifying epochs.
    """

    def __init__(self, config: SimplifyConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        n = min(config.points_per_epoch, steps_per_epoch)
        self.points = {math.ceil((i + 1) * steps_per_epoch / n) for i in range(n)}

    def cycle(self, epoch: int) -> int:
        return epoch // self.config.cycle_epochs if self.config.cycle_epochs else 0

    def is_simplifying(self, epoch: int) -> bool:
        return self.cycle(epoch) % 2 == 0

    def cycle_starts(self, epoch: int) -> bool:
        """True at the first epoch of every cycle after the first."""
        c = self.config.cycle_epochs
        return bool(c) and epoch > 0 and epoch % c == 0

    def is_point(self, epoch: int, step_in_epoch: int) -> bool:
        """``step_in_epoch`` counts from 1 (after that many steps of the epoch)."""
        return self.is_simplifying(epoch) and step_in_epoch in self.points


def unit_norms(layer: nn.Module) -> torch.Tensor:
    """The L2 norm of each output unit's incoming weights (an LSTM unit: its four gate
    rows), to rank units when there are no counts."""
    if isinstance(layer, MePropLSTM):
        h = layer.hidden_size
        rows = layer.weight_ih_l0.detach().norm(dim=1) ** 2
        return rows.view(4, h).sum(0).sqrt()
    return layer.weight.detach().flatten(1).norm(dim=1)


def round_keeps(layer: nn.Module, multiple: int) -> torch.Tensor:
    """The layer's active units, cut down to a multiple of ``multiple`` (never below it).

    onnxruntime's CPU GEMMs work in column blocks of 16, so widths 83 and 96 cost the
    same (measured: 784-83-66-10 and 784-96-80-10 both 0.19 ms at batch 256, while
    784-80-64-10 takes 0.16 ms). Rounding down keeps the units selected most often
    (by ``hits``; by weight norm when there are no counts); fine-tune afterwards.
    """
    active = layer.mask
    width = int(active.sum())
    target = max(multiple, width // multiple * multiple) if width > multiple else width
    if target >= width:
        return active.clone()
    score = layer.hits.double() if int(layer.ref) > 0 else unit_norms(layer).double()
    score = torch.where(active, score, torch.tensor(-1.0, dtype=torch.double))
    keep = torch.zeros_like(active)
    keep[torch.argsort(score, descending=True, stable=True)[:target]] = True
    return keep
