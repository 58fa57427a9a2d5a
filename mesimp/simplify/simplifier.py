"""``Simplifier``: meSimp in any training loop, one ``step()`` per optimizer step.

    simp = mesimp.Simplifier(model, SimplifyConfig(prune_rate=0.05), optimizer=opt,
                             steps_per_epoch=len(loader), example_inputs=x0)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            simp.step()

Without a config it runs ``SimplifyConfig.recipe(epochs)`` (warm-up, the cubic schedule
to 15 % of every group by 80 % of ``epochs``: the default of ``mesimp train
--simplify``, measured in benchmarks/QUALITY.md); give a ``SimplifyConfig`` for the
papers' rule or another target.

It runs the schedule of ``SimplifySchedule`` exactly as mesimp's own trainers do (they
use this object): at each simplification point the meSimp rule masks units and the
counters restart; when the next epoch starts a new cycle, the optimizer's state
(Adam's moments) and the counters are reset, once, after the last step of the
epoch before it (never after the last of ``epochs``, when given). ``state_dict()``
holds everything it needs to continue, masks and counters included (those are not
in ``model.state_dict()``), as plain tensors that ``torch.load(weights_only=True)``
reads.

What it simplifies: with ``example_inputs``, the dependency groups of the model
(``mesimp.simplify.groups``): FFN units, conv channels, depthwise chains, grouped
convolutions (slot-aligned), residual streams and a transformer's hidden size (with
the norms over them made mask-aware), attention heads, gated-MLP units, concatenations
-- every group whose units a meProp layer writes (so there are counts) and that
``mesimp.shrink`` can remove exactly. A unit's count is the sum of its rows' hits in
every meProp layer that writes the group (``mesimp.simplify.unit_scores``), and one
decision masks it everywhere (``mesimp.simplify.masking``). Before it starts, the
Simplifier masks half of every group's units on a copy, shrinks it and checks
masked == shrunk on the example inputs, so it never masks what ``shrink`` cannot
remove (a group that fails is left alone, with its reason in ``skipped``). Without
``example_inputs``, every meProp layer of a plain chain (every meProp Linear but the
output layer, every meProp LSTM) is its own group, which is right for mesimp's MLPs
and taggers; a model with meProp convolutions needs ``example_inputs``. ``layers``
names the meProp layers to simplify one by one.

Under ``torch.distributed`` (DDP, one Simplifier per rank) the hit counters of all
ranks are summed at every simplification point before the rule runs, so every rank
sets the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropCounters
from mesimp.nn.swap import meprop_layers
from mesimp.simplify.coupling import couple
from mesimp.simplify.groups import Member, UnitGroup
from mesimp.simplify.masking import apply_keeps, group_keeps, install, sync
from mesimp.simplify.rule import (
    SimplifyConfig,
    SimplifySchedule,
    cubic_width,
    keep_best,
    keep_with_min_width,
    prunable_layers,
    unit_keep_rule,
)
from mesimp.simplify.unit_scores import group_layers, unit_counts, unit_norms
from mesimp.training.optim import reset_optimizer_state

__all__ = ["Simplifier"]

STATE_VERSION = 1


class Simplifier:
    """Simplification points, cycles, counter and optimizer resets for one model."""

    def __init__(
        self,
        model: nn.Module,
        config: SimplifyConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        steps_per_epoch: int,
        epochs: int | None = None,
        example_inputs: Any = None,
        layers: Sequence[str] | None = None,
        compact: bool = False,
    ) -> None:
        if config is None:  # the default: the measured recipe, sized by the run's length
            if epochs is None:
                raise BadInputError(
                    "Simplifier's default recipe needs epochs= (or give a SimplifyConfig)"
                )
            config = SimplifyConfig.recipe(epochs)
        if not isinstance(config, SimplifyConfig):
            raise BadInputError(f"config must be a SimplifyConfig, got {type(config).__name__}")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
            raise BadInputError(f"steps_per_epoch must be an int, got {steps_per_epoch!r}")
        if steps_per_epoch < 1:
            raise BadInputError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.model = model
        self.config = config
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs  # no cycle starts at or after it (the run is over)
        self.schedule = SimplifySchedule(config, steps_per_epoch)
        if compact and (example_inputs is None or layers is not None):
            raise BadInputError(
                "compact=True needs example_inputs (to trace what goes with each unit) "
                "and no explicit layers"
            )
        self.compact = compact
        self.example_inputs = example_inputs
        # group name -> its units still in the model, as indices of its original width
        self.compacted: dict[str, list[int]] = {}
        self.skipped: dict[str, str] = {}  # group name -> why it is not simplified
        self.all_groups: list[UnitGroup] = []  # every group (the masks' AND runs over all)
        self.groups = self._choose_groups(model, example_inputs, layers)
        # each group's width before any simplification: what a cubic target is a fraction of
        self.full_sizes = {g.name: g.size for g in self.groups}
        self.layers = self._counting_layers()
        if not self.groups:
            raise BadInputError(
                "no meProp layer to simplify: call mesimp.meprop_(model, MePropConfig(k=...)) "
                "first (and check that their units can be removed)"
            )
        self.steps = 0  # optimizer steps done
        self.resets = 0  # optimizer resets done

    # -- which groups ----------------------------------------------------------------
    def _choose_groups(
        self, model: nn.Module, example_inputs: Any, names: Sequence[str] | None
    ) -> list[UnitGroup]:
        every = dict(meprop_layers(model))
        if names is not None:
            missing = [n for n in names if n not in every]
            if missing:
                raise BadInputError(f"not meProp layers of the model: {', '.join(missing)}")
            return [layer_group(n, every[n]) for n in names]
        if example_inputs is not None:
            return self._graph_groups(model, example_inputs)
        convs = [n for n, m in every.items() if isinstance(m, MePropConv2d)]
        if convs:
            raise BadInputError(
                f"{convs[0]} is a meProp convolution: give Simplifier example_inputs so "
                "that it can see which channels can be removed (BatchNorm, residual adds)"
            )
        return [layer_group(n, m) for n, m in prunable_layers(model)]

    def _graph_groups(self, model: nn.Module, example_inputs: Any) -> list[UnitGroup]:
        """The groups ``mesimp.simplify.coupling`` chooses (checked by a trial shrink),
        with the mask hooks of every group's readers and norms installed (not when
        compacting: masked units are removed at once, so nothing reads a mask)."""
        c = couple(model, example_inputs)
        self.all_groups, self.skipped = c.groups, c.skipped
        if not self.compact:
            install(model, c.groups)
            sync(model, c.groups)
        return c.chosen

    def _counting_layers(self) -> dict[str, MePropCounters]:
        """The meProp layers that count for the groups: their counters and masks are
        the Simplifier's state."""
        layers: dict[str, MePropCounters] = {}
        names = {id(m): n for n, m in self.model.named_modules()}
        for g in self.groups:
            for layer, _ in group_layers(self.model, g):
                layers.setdefault(names[id(layer)], layer)
        return layers

    # -- the loop ----------------------------------------------------------------------
    @property
    def widths(self) -> list[int]:
        """Active units per simplified group, in module order (then heads)."""
        return [int(group_keeps(self.model, g).sum()) for g in self.groups]

    def step(self) -> list[dict[str, Any]]:
        """Call once after every ``optimizer.step()``. Returns what happened, as metrics
        records: ``{"event": "simplify", "epoch", "step", "widths"}`` at a point and
        ``{"event": "cycle_start", "epoch", "step", "simplifying"}`` when the optimizer
        was reset for the next epoch's cycle (usually nothing: ``[]``)."""
        self.steps += 1
        epoch, done = divmod(self.steps - 1, self.steps_per_epoch)
        step_in_epoch = done + 1
        events: list[dict[str, Any]] = []
        if self.schedule.is_point(epoch, step_in_epoch):
            self._sum_counts_across_ranks()
            widths = self.simplify()
            events.append(
                {"event": "simplify", "epoch": epoch, "step": self.steps, "widths": widths}
            )
            if self.compact and self.compact_now():
                events.append({"event": "compact", "epoch": epoch, "step": self.steps})
        next_epoch = epoch + 1
        if (
            step_in_epoch == self.steps_per_epoch
            and self.schedule.cycle_starts(next_epoch)
            and (self.epochs is None or next_epoch < self.epochs)
        ):
            self.reset()
            events.append(
                {
                    "event": "cycle_start",
                    "epoch": next_epoch,
                    "step": self.steps,
                    "simplifying": self.schedule.is_simplifying(next_epoch),
                }
            )
        return events

    def simplify(self) -> list[int]:
        """One simplification point: the rule on every group's unit counts, one mask per
        unit for all its members; the counters restart. Returns the widths.

        The ``rate`` schedule masks the units counted below ``prune_rate``; the
        ``cubic`` one keeps, per group, the schedule's number of units with the highest
        selection rate (hits / reference count; ties: the larger weight norm), at the
        point that the step count says (``step()`` calls it at a point)."""
        c = self.config
        cubic = None
        if c.schedule == "cubic":
            epoch, done = divmod(max(self.steps, 1) - 1, self.steps_per_epoch)
            cubic = self.schedule.point_number(epoch, done + 1)
        for g in self.groups:
            hits, ref = unit_counts(self.model, g)
            active = group_keeps(self.model, g)
            if cubic is not None:
                assert c.target is not None  # SimplifyConfig checked it
                want = cubic_width(self.full_sizes[g.name], c.target, *cubic, c.min_width)
                rate = hits.double() / ref.clamp(min=1).double()
                apply_keeps(self.model, g, keep_best(active, rate, unit_norms(self.model, g), want))
                continue
            if int(ref.sum()) == 0:
                continue
            keep = unit_keep_rule(hits, ref, c.prune_rate)
            apply_keeps(self.model, g, keep_with_min_width(hits, active, keep, c.min_width))
        sync(self.model, self.all_groups)
        for layer in self.layers.values():
            layer.reset_counters()
        return self.widths

    def compact_now(self) -> bool:
        """Remove the masked units from the model in place (``mesimp.simplify.compact``),
        the optimizer rebound to the new parameters; the groups are read again at the
        new widths. False when nothing was masked. A DDP wrapper must be rebuilt by its
        owner (every rank compacts identically: the masks agree)."""
        from mesimp.simplify.compact import compact_

        done = compact_(self.model, self.example_inputs, self.optimizer)
        if done is None:
            return False
        for name, kept in done.kept.items():
            before = self.compacted.get(name)
            self.compacted[name] = kept if before is None else [before[i] for i in kept]
        self._regroup(done.groups)
        return True

    def _regroup(self, groups: list[UnitGroup] | None = None) -> None:
        """The groups at the model's new widths (the same ones, by name): those the
        compaction read off its pruned graph, or read again."""
        if groups is None:
            groups = couple(self.model, self.example_inputs, trial=False).groups
        chosen = {g.name for g in self.groups}
        self.all_groups = groups
        self.groups = [g for g in groups if g.name in chosen]
        self.layers = self._counting_layers()

    def _sum_counts_across_ranks(self) -> None:
        """Under ``torch.distributed`` every rank counted its own shard: sum the counts
        (``all_reduce``) before the rule runs, so every rank applies the same masks and
        the replicas never diverge. A no-op in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for layer in self.layers.values():
            dist.all_reduce(layer.hits)
            dist.all_reduce(layer.ref)

    def reset(self) -> None:
        """A cycle start: forget the optimizer's state and restart the counters."""
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer)
        self.resets += 1
        for layer in self.layers.values():
            layer.reset_counters()

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Steps, resets and each simplified layer's counters and mask (plain tensors)."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "steps": self.steps,
            "resets": self.resets,
            "layers": {n: layer.meprop_state() for n, layer in self.layers.items()},
            "compacted": {n: list(k) for n, k in self.compacted.items()},
            "full_sizes": dict(self.full_sizes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``: the same layers, schedule and progress. A
        compacting run's state replays its compactions on a model built at full width
        (then load the model's and the optimizer's state dicts: they fit)."""
        try:
            if state["version"] != STATE_VERSION:
                raise BadInputError(f"Simplifier state version {state['version']} is unknown")
            self.full_sizes.update(state.get("full_sizes") or {})  # absent before issue 30
            self._replay(state.get("compacted") or {})
            if state["steps_per_epoch"] != self.steps_per_epoch:
                raise BadInputError(
                    f"the saved run had {state['steps_per_epoch']} steps per epoch, this "
                    f"one {self.steps_per_epoch}"
                )
            if set(state["layers"]) != set(self.layers):
                raise BadInputError(
                    f"the saved layers {sorted(state['layers'])} are not this model's "
                    f"{sorted(self.layers)}"
                )
            for name, layer in self.layers.items():
                layer.load_meprop_state(state["layers"][name])
            sync(self.model, self.all_groups)
            self.steps, self.resets = int(state["steps"]), int(state["resets"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise BadInputError(f"malformed Simplifier state ({e})") from None

    def _replay(self, compacted: dict[str, list[int]]) -> None:
        """Compact a model built at full width as the saved run did; a model already at
        those widths is left as it is."""
        if not compacted:
            return
        if not self.compact:
            raise BadInputError(
                "the saved run compacted its model: build the Simplifier with compact=True"
            )
        from mesimp.simplify.compact import replay_

        done = replay_(self.model, self.example_inputs, compacted, self.optimizer)
        if done is not None:
            self._regroup(done.groups)  # read off the pruned graph: no second trace
        self.compacted = {n: list(k) for n, k in compacted.items()}


def layer_group(name: str, layer: MePropCounters) -> UnitGroup:
    """One meProp layer's units as a group of their own (a plain chain: its output
    units, read by the next layer, which sees 0 from a masked unit)."""
    n = layer.mask.numel()
    ids = torch.arange(n)
    return UnitGroup(name, "channels", n, [Member(name, "out", ids, ids)], root=name)
