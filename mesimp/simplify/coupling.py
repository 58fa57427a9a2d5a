"""Which units meSimp can simplify in a model: the groups, checked, and the per-layer view.

The unit of meSimp is the dependency group (``mesimp.simplify.groups``). A group is
simplified when

* it can be removed exactly (``UnitGroup.reason`` is None: its channels do not reach
  the model's output, every member can be masked exactly),
* a meProp layer writes its units (so the rule has counts), and it has two units or
  more,
* and a trial passes: half of every such group's units masked on a copy, shrunk, and
  the shrunk copy checked against the masked one in float64 on the example inputs
  (bisected when it fails). The trial catches what no graph shows: a width kept in a
  plain attribute, channels that come from the model's input, a transpose the tracer
  mis-maps. So whatever the ``Simplifier`` masks, ``mesimp.shrink`` removes.

``analyze`` answers the per-layer question a user asks first, "will meSimp touch this
layer, and if not, why": a meProp layer is removable when the group its output units
belong to is simplified; ``norms`` are the norms over its channels (masked too),
``consumers`` the layers whose inputs shrink with it. A layer the tracer did not reach
on the example inputs (data-dependent control flow, an unused branch) is not in the
graph: ``TracingError`` names it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.swap import meprop_layers
from mesimp.simplify.graph_shrink import plain_groups, shrink
from mesimp.simplify.groups import UnitGroup
from mesimp.simplify.masking import apply_keeps, install, sync
from mesimp.simplify.tracing import TracingError, reached_names, run_model
from mesimp.simplify.unit_scores import group_layers

__all__ = [
    "Coupling",
    "LayerCoupling",
    "TracingError",
    "analyze",
    "couple",
    "meprop_layers",
    "run_model",
]


@dataclass
class Coupling:
    """A model's groups, those meSimp simplifies, and why the others are left alone."""

    groups: list[UnitGroup]  # every group (masks are an AND over all of them)
    chosen: list[UnitGroup]  # the groups meSimp simplifies
    skipped: dict[str, str]  # group name -> why not
    reached: set[str]  # modules the tracer reached


@dataclass
class LayerCoupling:
    """What removing a meProp layer's units takes with it."""

    name: str
    removable: bool
    reason: str | None = None  # why not, in a few words
    norms: list[str] = field(default_factory=list)  # norms over its channels
    consumers: list[str] = field(default_factory=list)  # layers whose inputs shrink with it
    group: str | None = None  # the unit group its output units belong to


def couple(model: nn.Module, example_inputs: Any, trial: bool = True) -> Coupling:
    """The groups of ``model`` (traced on a plain copy) and the ones meSimp simplifies,
    checked by a trial shrink unless ``trial`` is False; ``model`` is not touched."""
    plain, dg, groups = plain_groups(model, example_inputs)
    reached = reached_names(dg)
    skipped: dict[str, str] = {}
    chosen = []
    for g in groups:
        if not g.removable:
            skipped[g.name] = g.reason or ""
        elif g.size < 2:
            skipped[g.name] = "a single unit"
        elif not group_layers(model, g):
            skipped[g.name] = "no meProp layer writes its units (nothing counts them)"
        else:
            chosen.append(g)
    if trial:
        for g in _failing(model, example_inputs, groups, chosen):
            skipped[g.name] = "a trial shrink of its units changes the outputs"
        chosen = [g for g in chosen if g.name not in skipped]
    return Coupling(groups, chosen, skipped, reached)


def _failing(
    model: nn.Module, example_inputs: Any, groups: list[UnitGroup], chosen: list[UnitGroup]
) -> list[UnitGroup]:
    """The chosen groups whose units a trial shrink cannot remove exactly: half of every
    group's units masked on a copy, shrunk, checked; bisected when the check fails."""

    def ok(subset: list[UnitGroup]) -> bool:
        trial = copy.deepcopy(model)
        try:
            for g in subset:
                gen = torch.Generator().manual_seed(len(g.name))
                keep = torch.ones(g.size, dtype=torch.bool)
                keep[torch.randperm(g.size, generator=gen)[: g.size // 2]] = False
                apply_keeps(trial, g, keep)
            install(trial, groups)
            sync(trial, groups)
            shrink(trial, example_inputs)
        except Exception:  # noqa: BLE001 - whatever fails, these units cannot go
            return False
        return True

    def bad(subset: list[UnitGroup]) -> list[UnitGroup]:
        if not subset or ok(subset):
            return []
        if len(subset) == 1:
            return subset
        half = len(subset) // 2
        return bad(subset[:half]) + bad(subset[half:])

    return bad(chosen)


def analyze(
    model: nn.Module,
    example_inputs: Any,
    names: Sequence[str] | None = None,
) -> dict[str, LayerCoupling]:
    """The coupling of each meProp layer of ``model`` (or of ``names``): whether meSimp
    simplifies its output units, and if not, why; ``model`` itself is not touched."""
    layers = dict(meprop_layers(model))
    if names is not None:
        missing = [n for n in names if n not in layers]
        if missing:
            raise BadInputError(f"not meProp layers: {', '.join(missing)}")
        layers = {n: layers[n] for n in names}
    c = couple(model, example_inputs)
    chosen = {g.name for g in c.chosen}
    out: dict[str, LayerCoupling] = {}
    for name in layers:
        if name not in c.reached and name.rpartition(".")[0] not in c.reached:
            raise TracingError(
                f"the tracer did not reach {name} on the example inputs (data-dependent "
                "control flow, or a branch the inputs do not take)"
            )
        group = next((g for g in c.groups if any(m.name == name for m in g.writers())), None)
        if group is None:
            out[name] = LayerCoupling(name, False, "its units are in no group")
            continue
        out[name] = LayerCoupling(
            name,
            group.name in chosen,
            c.skipped.get(group.name),
            sorted({m.name for m in group.members if m.role in ("norm", "bn")}),
            sorted({m.name for m in group.members if m.role == "in"}),
            group.name,
        )
    return out
