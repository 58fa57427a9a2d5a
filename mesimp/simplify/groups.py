"""The dependency group as the unit of meSimp.

A unit that meSimp removes is whatever a dependency group couples, not one layer's
row: channel c of a residual stream is every writer's row c (stem, output
projections, embeddings), every reader's column c, the norms over the stream and the
positional parameters; an attention head is its q/k/v rows and its output-projection
columns; a gated MLP unit is a gate row, an up row and a down column. ``find_groups``
reads these groups from Torch-Pruning's dependency graph (``mesimp.simplify.tracing``)
and from the attention layouts (``mesimp.simplify.attention``), and returns one
``UnitGroup`` per set of coupled channels, with:

* ``members``: every module (or parameter) that holds the group's channels, with its
  role (``out``: writes them, ``in``: reads them, ``norm``: normalises over them,
  ``bn``/``param``: per-channel, nothing to do) and, per channel, the unit it
  belongs to;
* the units: usually one channel each; whole heads for attention; for a grouped
  convolution or GroupNorm with channels-per-group C_g, one *slot* per unit (channel j
  of every group: ``{g*C_g + j}``), so every group keeps the same number of channels;
  in general the connected components of "must go together" (union-find over the
  root's channels);
* ``reason``: why the group cannot be removed without changing the function (its
  channels reach the model's output, a module mesimp cannot mask exactly), or None.

Counting: a unit's hits are the sum of the hits of its rows in every meProp layer that
writes the group (``out`` members), and its reference count the sum of those layers'
``ref`` times the unit's rows in each, so the rule ``hits >= floor(rate * ref)`` reads
"selected in at least ``rate`` of the opportunities", as for a single layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.simplify.attention import HeadLayout, head_layout
from mesimp.simplify.leaves import is_conv1d, is_rms_norm

__all__ = ["Member", "UnitGroup", "find_groups", "member_module"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class Member:
    """One module's (or parameter's) share of a group."""

    name: str  # qualified name in the model
    role: str  # "out" | "in" | "inout" | "norm" | "bn" | "param"
    channels: torch.Tensor  # long [n]: indices along the member's channel dimension
    units: torch.Tensor  # long [n]: the unit of each channel


@dataclass
class UnitGroup:
    """A set of coupled channels, removed together unit by unit."""

    name: str  # the root module's name, or "<attention>:heads" (":q_heads", ":kv_heads")
    kind: str  # "channels" | "heads" | "q_heads" | "kv_heads"
    size: int  # number of units
    members: list[Member] = field(default_factory=list)
    reason: str | None = None  # why its units cannot be removed exactly, if so
    root: str | None = None  # Torch-Pruning root (pruned with get_pruning_group)
    root_channels: list[list[int]] | None = None  # the root's channels of each unit
    attention: str | None = None  # the attention block of a head group

    @property
    def removable(self) -> bool:
        return self.reason is None

    def writers(self) -> list[Member]:
        return [m for m in self.members if m.role in ("out", "inout")]


def member_module(model: nn.Module, name: str) -> Any:
    """The module (or parameter) a member names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


# -- union-find over a root's channels -----------------------------------------------------
class _Units:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, items: Iterable[int]) -> None:
        items = list(items)
        for a in items[1:]:
            ra, rb = self.find(items[0]), self.find(a)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> list[int]:
        """Unit index of each channel: components numbered by their lowest channel."""
        ids: dict[int, int] = {}
        return [ids.setdefault(self.find(i), len(ids)) for i in range(len(self.parent))]


def _slots(channels: list[int], roots: list[int], per_group: int, uf: _Units) -> None:
    """Channel j of every group (``c % per_group``) goes together."""
    by_slot: dict[int, list[int]] = {}
    for c, r in zip(channels, roots, strict=True):
        by_slot.setdefault(c % per_group, []).append(r)
    for rs in by_slot.values():
        uf.union(rs)


# -- reading Torch-Pruning's groups ----------------------------------------------------------
def find_groups(plain: nn.Module, dg: Any) -> list[UnitGroup]:
    """Every group of coupled channels of a traced model of plain modules, in module
    order, then the head groups of its attention blocks."""
    import torch_pruning as tp

    name_of = {m: n for n, m in plain.named_modules()}
    param_name = dict(getattr(dg, "_param_to_name", {}))
    visited: set[nn.Module] = set()
    groups: list[UnitGroup] = []
    for name, m in plain.named_modules():
        if m not in dg.module2node or m in visited or not _is_root(m):
            continue
        pruner = dg.get_pruner_of_module(m)
        width = dg.get_out_channels(m) if pruner is not None else None
        if not width:
            continue
        group = dg.get_pruning_group(m, pruner.prune_out_channels, idxs=list(range(width)))
        g = _from_tp(tp, dg, name, width, group, name_of, param_name, visited)
        groups.append(g)
    for name, m in plain.named_modules():
        layout = head_layout(m)
        if layout is not None and layout.o is not None and m in dg.module2node:
            groups.extend(_internal_heads(name, layout))
    return groups


def _is_root(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Linear, *_CONVS, nn.Embedding, nn.LSTM))
        or is_conv1d(m)
        or head_layout(m) is not None
    )


def _from_tp(
    tp: Any,
    dg: Any,
    root: str,
    width: int,
    group: Any,
    name_of: dict,
    param_name: dict,
    visited: set,
) -> UnitGroup:
    uf = _Units(width)
    items: list[tuple[str, str, list[int], list[int]]] = []  # (name, role, channels, roots)
    reasons: list[str] = []
    kind = "channels"
    for item in group:
        dep = item.dep
        mod, handler = dep.target.module, dep.handler
        idxs, roots = [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]
        if isinstance(mod, tp.ops._OutputOp):
            reasons.append("its units reach the model's output")
            continue
        if isinstance(mod, nn.Parameter):
            items.append((param_name.get(mod, "?"), "param", idxs, roots))
            continue
        name = name_of.get(mod)
        if name is None:  # Torch-Pruning's own ops: element-wise, reshape, concat, split...
            continue
        is_out = dg.is_out_channel_pruning_fn(handler)
        is_in = dg.is_in_channel_pruning_fn(handler)
        layout = head_layout(mod)
        if layout is not None:
            if (
                is_out
                and handler == dg.get_pruner_of_module(mod).prune_out_channels
                and (not is_in or layout.o is not None)
            ):
                visited.add(mod)
                if layout.o is not None:
                    items.append((f"{name}.{layout.o}", "out", idxs, roots))
                else:  # BERT-style: the block outputs its heads
                    kind = "heads"
                    if layout.unsupported or layout.num_kv_heads != layout.num_heads:
                        reasons.append(f"{name}: {layout.unsupported or 'grouped-query heads'}")
                    d = layout.head_dim
                    by_head: dict[int, list[int]] = {}
                    for c, r in zip(idxs, roots, strict=True):
                        by_head.setdefault(c // d, []).append(r)
                    for rs in by_head.values():
                        uf.union(rs)
                    for part in (layout.q, layout.k, layout.v):
                        ch = [part[1] + c for c in idxs]
                        items.append((f"{name}.{part[0]}", "out", ch, roots))
            else:
                for reader in layout.readers:
                    items.append((f"{name}.{reader}", "in", idxs, roots))
            continue
        role = _role(mod, is_out, is_in)
        if role is None:
            reasons.append(f"{name} ({type(mod).__name__}) cannot be masked exactly")
            continue
        limit = dg.get_out_channels(mod) if role != "in" else dg.get_in_channels(mod)
        if limit is not None and idxs and max(idxs) >= limit:
            reasons.append(
                f"the graph maps channel {max(idxs)} into {name}, which has {limit} (a "
                "transpose or reshape Torch-Pruning cannot follow)"
            )
            continue
        if role in ("out", "inout"):
            visited.add(mod)
            if not dg.module2node[mod].outputs:  # a sink: what it writes is the output
                reasons.append("its units reach the model's output")
        per = _per_group(mod, role)
        if per:
            _slots(idxs, roots, per, uf)
        items.append((name, role, idxs, roots))
    labels = uf.labels()
    size = max(labels) + 1 if labels else 0
    root_channels: list[list[int]] = [[] for _ in range(size)]
    for r in range(width):
        root_channels[labels[r]].append(r)
    members = _merge(items, labels)
    if kind == "heads":
        name = f"{root}:heads"
    else:
        name = root
    return UnitGroup(
        name=name,
        kind=kind,
        size=size,
        members=members,
        reason=reasons[0] if reasons else None,
        root=root,
        root_channels=root_channels,
    )


def _role(mod: nn.Module, is_out: bool, is_in: bool) -> str | None:
    """A member's role from its type and Torch-Pruning's handler; None: not maskable."""
    if isinstance(mod, _BATCHNORMS) or isinstance(mod, _INSTANCE) or isinstance(mod, nn.PReLU):
        return "bn"  # per channel: nothing in another channel depends on it
    if isinstance(mod, _NORMS) or is_rms_norm(mod):
        return "norm"
    if isinstance(mod, _CONVS) and mod.groups == mod.in_channels == mod.out_channels > 1:
        return "inout"  # depthwise: channel c in is channel c out
    if isinstance(mod, nn.Embedding):
        return "out"  # its channels are its columns; its rows are tokens, never coupled
    if isinstance(mod, (nn.Linear, *_CONVS, nn.LSTM)) or is_conv1d(mod):
        if is_out and not is_in:
            return "out"
        if is_in and not is_out:
            return "in"
    return None


def _per_group(mod: nn.Module, role: str) -> int:
    """Channels per group of a grouped conv or GroupNorm (0: no alignment needed)."""
    if isinstance(mod, _CONVS) and role in ("in", "out") and mod.groups > 1:
        width = mod.in_channels if role == "in" else mod.out_channels
        return width // mod.groups
    if isinstance(mod, nn.GroupNorm) and 1 < mod.num_groups < mod.num_channels:
        return mod.num_channels // mod.num_groups
    return 0


def _merge(items: list[tuple[str, str, list[int], list[int]]], labels: list[int]) -> list[Member]:
    """One ``Member`` per (name, role), each channel with its unit, duplicates dropped."""
    merged: dict[tuple[str, str], dict[int, int]] = {}
    for name, role, idxs, roots in items:
        chans = merged.setdefault((name, role), {})
        for c, r in zip(idxs, roots, strict=True):
            chans.setdefault(c, labels[r])
    out = []
    for (name, role), chans in merged.items():
        cs = sorted(chans)
        out.append(
            Member(
                name,
                role,
                torch.tensor(cs, dtype=torch.long),
                torch.tensor([chans[c] for c in cs], dtype=torch.long),
            )
        )
    return out


# -- heads inside an attention block -------------------------------------------------------
def _internal_heads(name: str, layout: HeadLayout) -> list[UnitGroup]:
    """Head groups of a block whose output projection is inside it (Llama, timm, GPT-2):
    ``heads`` (one k/v per head), or ``kv_heads`` and ``q_heads`` under GQA."""
    h, kv, r = layout.num_heads, layout.num_kv_heads, layout.group_size
    reason = f"{name}: {layout.unsupported}" if layout.unsupported else None
    groups = []
    if kv == h:
        units = [([u], [u]) for u in range(h)]  # (query heads, kv heads) of each unit
        groups.append(_head_group(name, "heads", layout, units, reason))
    else:
        if kv > 1:
            units = [([g * r + j for j in range(r)], [g]) for g in range(kv)]
            groups.append(_head_group(name, "kv_heads", layout, units, reason))
        if r > 1:
            units = [([g * r + j for g in range(kv)], []) for j in range(r)]
            groups.append(_head_group(name, "q_heads", layout, units, reason))
    return groups


def _head_group(
    name: str,
    kind: str,
    layout: HeadLayout,
    units: list[tuple[list[int], list[int]]],
    reason: str | None,
) -> UnitGroup:
    items: list[tuple[str, str, list[int], list[int]]] = []
    for u, (q_heads, kv_heads) in enumerate(units):
        parts = [(layout.q[0], layout.q_rows(q_heads))]
        parts += [(layout.k[0], layout.kv_rows("k", kv_heads))]
        parts += [(layout.v[0], layout.kv_rows("v", kv_heads))]
        for sub, rows in parts:
            if rows:
                items.append((f"{name}.{sub}", "out", rows, [u] * len(rows)))
        cols = layout.o_cols(q_heads)
        items.append((f"{name}.{layout.o}", "in", cols, [u] * len(cols)))
    return UnitGroup(
        name=f"{name}:{kind}",
        kind=kind,
        size=len(units),
        members=_merge(items, list(range(len(units)))),
        reason=reason,
        attention=name,
    )
