"""What a group's units scored: summed selection counts, or weight norms without counts.

The count of a group unit is the sum of the hits of its rows in every meProp layer that
writes the group, and its reference count is the sum, over those layers, of the
layer's ``ref`` times the unit's rows in it: "how often its rows were selected, out of
how often they could have been". For a one-layer group (an MLP's hidden unit) this is
the layer's own ``hits[j]`` and ``ref``, so the rule reads exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from mesimp.nn.linear import MePropCounters
from mesimp.simplify.groups import UnitGroup, member_module

__all__ = ["group_layers", "unit_counts", "unit_norms"]


def group_layers(model: nn.Module, group: UnitGroup) -> list[tuple[MePropCounters, object]]:
    """The meProp layers that write ``group``, each with its member entry."""
    out = []
    for m in group.writers():
        mod = member_module(model, m.name)
        if isinstance(mod, MePropCounters):
            out.append((mod, m))
    return out


def unit_counts(model: nn.Module, group: UnitGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, ref)`` per unit (long tensors of ``group.size``), summed over the
    group's meProp writers."""
    hits = torch.zeros(group.size, dtype=torch.long)
    ref = torch.zeros(group.size, dtype=torch.long)
    for layer, m in group_layers(model, group):
        hits.index_add_(0, m.units, layer.hits.detach().cpu()[m.channels])
        ref.index_add_(0, m.units, torch.full_like(m.units, int(layer.ref)))
    return hits, ref


def unit_norms(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """The L2 norm of each unit's rows over the group's writers (float64), to rank
    units when there are no counts."""
    sq = torch.zeros(group.size, dtype=torch.double)
    for m in group.writers():
        mod = member_module(model, m.name)
        rows = _rows(mod)
        if rows is None:
            continue
        sq.index_add_(0, m.units, rows[m.channels])
    return sq.sqrt()


def _rows(mod: object) -> torch.Tensor | None:
    """Squared norm of each output unit's incoming weights."""
    if not isinstance(mod, nn.Module):
        return None
    w = getattr(mod, "weight_ih_l0", None)  # an LSTM unit: its four gate rows
    if isinstance(w, torch.Tensor):
        h = w.shape[0] // 4
        return (w.detach().double() ** 2).sum(1).view(4, h).sum(0).cpu()
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    w = w.detach().double()
    if type(mod).__name__ in ("Conv1D", "MePropConv1D"):  # HF Conv1D: [in, out]
        w = w.t()
    if isinstance(mod, nn.Embedding):  # a row per token: a channel is a column
        w = w.t()
    return (w.flatten(1) ** 2).sum(1).cpu()
