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

SCHEDULES = ("rate", "cubic")
RECIPE_TARGET = 0.15  # SimplifyConfig.recipe's kept fraction: 500 -> 75, the papers' ~9x


@dataclass
class SimplifyConfig:
    """When and how hard to simplify.

    ``prune_rate``: a neuron survives a point if it was selected in at least this
    fraction of the examples since the previous point. ``points_per_epoch``:
    simplification points per epoch. ``cycle_epochs``: length of a cycle; cycles
    alternate simplifying / plain meProp (0 = every epoch simplifies).
    ``min_width``: no layer goes below this many units. ``cycle_epochs`` defaults to 1
    with the rate schedule and to 0 with the cubic one.

    ``warmup_epochs``: no simplification point in the first N epochs (the counts of an
    untrained network say little: the parser lost 8.8 UAS masking 327 units in epoch
    1); cycles count from the end of the warm-up.

    ``schedule``: ``"rate"`` is the papers' rule (drop what ``prune_rate`` says, so the
    final size is whatever it comes to); ``"cubic"`` drops, at each point, the
    lowest-counted units down to a width that follows Zhu & Gupta's (2017) cubic
    schedule, ``target + (1 - target) * (1 - i / n) ** 3`` of each group's full width at
    point ``i`` of ``n``, reaching exactly ``round(target * width)`` at the last point
    of epoch ``target_epoch - 1``; no point after it (the rest of the run fine-tunes).
    A size fixed in advance makes runs comparable with other pruners at equal size.
    """

    prune_rate: float = 0.01
    points_per_epoch: int = 4
    cycle_epochs: int | None = None  # None: 1 with the rate schedule, 0 with the cubic one
    min_width: int = 1
    warmup_epochs: int = 0
    schedule: str = "rate"
    target: float | None = None  # cubic: fraction of each group's units kept at the end
    target_epoch: int | None = None  # cubic: the target is reached by this epoch's start

    def __post_init__(self) -> None:
        if self.cycle_epochs is None:  # a cubic schedule prunes at every point to its end
            self.cycle_epochs = 0 if self.schedule == "cubic" else 1
        check_prune_rate(self.prune_rate)
        if self.points_per_epoch < 1:
            raise BadInputError(
                f"simplification points per epoch must be >= 1, got {self.points_per_epoch}"
            )
        if self.cycle_epochs < 0:
            raise BadInputError(f"cycle epochs must be >= 0, got {self.cycle_epochs}")
        if self.min_width < 0:
            raise BadInputError(f"min width must be >= 0, got {self.min_width}")
        if _not_int(self.warmup_epochs) or self.warmup_epochs < 0:
            raise BadInputError(
                f"warm-up epochs must be an integer >= 0, got {self.warmup_epochs!r}"
            )
        if self.schedule not in SCHEDULES:
            raise BadInputError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.schedule == "cubic":
            self._check_cubic()
        elif self.target is not None or self.target_epoch is not None:
            raise BadInputError(
                "a target (width, epoch) needs the cubic schedule: --schedule cubic"
            )

    def _check_cubic(self) -> None:
        t, e = self.target, self.target_epoch
        if t is None or isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise BadInputError(
                f"the cubic schedule needs a target width fraction in (0, 1], got {t!r}"
            )
        if e is None or _not_int(e) or e <= self.warmup_epochs:
            raise BadInputError(
                f"the cubic schedule needs a target epoch after the warm-up "
                f"({self.warmup_epochs} epochs), got {e!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def recipe(cls, epochs: int, target: float = RECIPE_TARGET, **overrides: Any) -> SimplifyConfig:
        """The recipe ``mesimp train --simplify`` uses by default (measured in
        benchmarks/QUALITY.md): a warm-up of 30 % of the epochs, then the cubic schedule
        to ``target`` of every group's width by 80 % of them (cycles off), so the last
        20 % fine-tune at the final size. Give meProp a k near the target width (e.g.
        ``k=75`` for 500 -> 75): the last points and the fine-tune then see nearly dense
        gradients. ``overrides`` replace any field (``warmup_epochs=1``, ...)."""
        if _not_int(epochs) or epochs < 1:
            raise BadInputError(f"the recipe needs the run's epochs (>= 1), got {epochs!r}")
        fields = dict(
            schedule="cubic",
            target=target,
            warmup_epochs=3 * epochs // 10,
            target_epoch=math.ceil(0.8 * epochs),
        )
        return cls(**{**fields, **overrides})


def _not_int(v: object) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def cubic_fraction(target: float, point: int, points: int) -> float:
    """Zhu & Gupta's cubic schedule as the kept fraction after ``point`` of ``points``
    (1-based): from 1 (nothing pruned) to ``target`` at the last point, pruning fast
    while many units are redundant and slowly near the end."""
    return target + (1.0 - target) * (1.0 - point / points) ** 3


def cubic_width(size: int, target: float, point: int, points: int, min_width: int) -> int:
    """Units of a group of full width ``size`` kept after ``point`` of ``points``."""
    floor = min(min_width, size)
    return max(floor, math.floor(size * cubic_fraction(target, point, points) + 0.5))


def keep_best(
    active: torch.Tensor, score: torch.Tensor, tiebreak: torch.Tensor, want: int
) -> torch.Tensor:
    """The ``want`` active units of highest ``score`` (ties: higher ``tiebreak``); all
    active ones when there are no more than ``want``."""
    if int(active.sum()) <= want:
        return active.clone()
    inf = torch.tensor(float("inf"), dtype=torch.double)
    s = torch.where(active, score.double(), -inf)
    order = torch.argsort(-tiebreak.double(), stable=True)
    order = order[torch.argsort(-s[order], stable=True)]
    keep = torch.zeros_like(active)
    keep[order[:want]] = True
    return keep


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

    No point in the first ``warmup_epochs`` epochs. After them, epoch e belongs to cycle
    ``(e - warmup_epochs) // cycle_epochs``; even cycles simplify, odd ones are plain
    meProp. Points fall at evenly spaced steps inside simplifying epochs. The cubic
    schedule stops at ``target_epoch``: no point and no cycle start from then on.
    """

    def __init__(self, config: SimplifyConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        n = min(config.points_per_epoch, steps_per_epoch)
        self.points = {math.ceil((i + 1) * steps_per_epoch / n) for i in range(n)}
        # cubic: every point before the target epoch, in order (point i is index i - 1)
        self.order: dict[tuple[int, int], int] = {}
        if config.schedule == "cubic":
            assert config.target_epoch is not None  # SimplifyConfig checked it
            for e in range(config.warmup_epochs, config.target_epoch):
                if self.is_simplifying(e):
                    for s in sorted(self.points):
                        self.order[(e, s)] = len(self.order) + 1

    def _ended(self, epoch: int) -> bool:
        c = self.config
        return c.schedule == "cubic" and c.target_epoch is not None and epoch >= c.target_epoch

    def cycle(self, epoch: int) -> int:
        c = self.config.cycle_epochs
        return (epoch - self.config.warmup_epochs) // c if c else 0

    def is_simplifying(self, epoch: int) -> bool:
        if epoch < self.config.warmup_epochs or self._ended(epoch):
            return False
        return self.cycle(epoch) % 2 == 0

    def cycle_starts(self, epoch: int) -> bool:
        """True at the first epoch of every cycle after the first (not in the warm-up,
        not after a cubic schedule's end)."""
        c, w = self.config.cycle_epochs, self.config.warmup_epochs
        return bool(c) and epoch > w and (epoch - w) % c == 0 and not self._ended(epoch)

    def is_point(self, epoch: int, step_in_epoch: int) -> bool:
        """``step_in_epoch`` counts from 1 (after that many steps of the epoch)."""
        return self.is_simplifying(epoch) and step_in_epoch in self.points

    def point_number(self, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        """The cubic schedule's ``(i, n)`` at a point: this is point i of n."""
        i = self.order.get((epoch, step_in_epoch))
        if i is None:
            raise BadInputError(
                f"epoch {epoch} step {step_in_epoch} is not a point of the cubic schedule: "
                "it simplifies at its points (call Simplifier.step() after every update)"
            )
        return i, len(self.order)


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
