"""``mesimp.shrink``: any masked model -> a physically smaller model of plain PyTorch modules.

The engine is Torch-Pruning's ``DependencyGraph`` (``mesimp.simplify.tracing``) read as
unit groups (``mesimp.simplify.groups``): for every group with masked units, the
coupled parameters (every writer's rows, every reader's columns, the norms, positional
parameters, an LSTM's gate rows through mesimp's own pruner) go together with
``group.prune()`` on a plain copy of the model; attention heads go through mesimp's head
pruner (``mesimp.simplify.attention``), which updates the head counts.

Verification is the contract: the shrunk model's outputs must equal the masked
model's on the example inputs, both run in float64 in eval mode, or nothing is
returned. Masked units that cannot be removed without changing the function (their
channels reach the output, a module mesimp cannot mask exactly) are refused by name
before anything is pruned.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, VerificationError
from mesimp.nn.linear import MePropCounters
from mesimp.nn.swap import meprop_layers, unmeprop
from mesimp.simplify.attention import prune_heads
from mesimp.simplify.groups import UnitGroup, find_groups, member_module
from mesimp.simplify.masking import apply_keeps, group_keeps, install, strip, sync
from mesimp.simplify.tracing import (
    TracingError,
    cast_floats,
    deadline,
    reached_names,
    run_model,
    trace,
)
from mesimp.simplify.unit_scores import group_layers
from mesimp.simplify.width_attrs import refresh_width_attributes

__all__ = [
    "TOLERANCE",
    "flatten_outputs",
    "kept_units",
    "max_output_diff",
    "plain_groups",
    "prune_groups",
    "restore_masks",
    "round_group",
    "shrink",
]

TOLERANCE = 1e-6  # max |masked - shrunk| in float64


def kept_units(model: nn.Module) -> dict[str, list[int]]:
    """What ``shrink`` kept of each group it pruned: ``{group name: kept unit indices}``,
    stored on the shrunk model as ``model.mesimp_kept`` (``mesimp.save_model`` writes it)."""
    return dict(getattr(model, "mesimp_kept", {}))


def plain_groups(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, Any, list[UnitGroup]]:
    """A plain copy of ``model`` (meProp layers swapped back, mask hooks removed), its
    dependency graph and its unit groups; ``model`` is not touched."""
    plain = unmeprop(copy.deepcopy(model))
    strip(plain)
    dg = trace(plain, example_inputs)
    with deadline("reading the model's dependency groups"):
        return plain, dg, find_groups(plain, dg)


def restore_masks(model: nn.Module, example_inputs: Any) -> list[UnitGroup]:
    """Give a model whose meProp layers hold masks (loaded from a checkpoint) the mask
    hooks of its readers and norms, so that it computes what it computed in training."""
    _, _, groups = plain_groups(model, example_inputs)
    install(model, groups)
    sync(model, groups)
    return groups


def shrink(
    model: nn.Module,
    example_inputs: Any,
    round_to: int = 1,
    verify: bool = True,
) -> nn.Module:
    """A smaller copy of ``model`` with the masked units of its groups removed.

    ``example_inputs``: what ``model`` is called with (a tensor, a tuple, or a dict of
    keyword arguments); used to trace the graph and to verify. ``round_to``: round each
    group's active units down to a multiple (keeping the most-selected units; the masks
    are tightened to match before verifying). The result holds only plain modules
    (``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM``, ...) in PyTorch's layouts, in the
    input model's train/eval mode; ``model`` is not changed. Refused, with a one-line
    error and nothing returned: a group that would be left with no units, units that
    cannot be removed (named, with the reason), inputs that do not run, a failed check.
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BadInputError(f"round_to must be an integer >= 1, got {round_to!r}")
    masked = copy.deepcopy(model)
    plain, dg, groups = plain_groups(masked, example_inputs)
    if round_to > 1:
        for g in groups:
            if g.removable:
                apply_keeps(masked, g, round_group(masked, g, round_to))
        sync(masked, groups)  # the graph and the groups stay: masks do not change them
    keeps = masked_groups(masked, dg, groups)
    prune_groups(plain, dg, groups, keeps)
    plain.train(model.training)
    if verify:
        _verify(masked, plain, example_inputs, groups, keeps)
    return plain


def masked_groups(masked: nn.Module, dg: Any, groups: list[UnitGroup]) -> dict[str, torch.Tensor]:
    """The groups with masked units and their keep masks; refuses what cannot go: a
    group left empty, a group that cannot be removed exactly, a meProp layer whose
    masked rows its group keeps (masked by hand in one writer of several), a masked
    layer the tracer never reached."""
    keeps = {}
    explained: dict[str, torch.Tensor] = {}  # rows some group masks, per meProp writer
    for g in groups:
        keep = group_keeps(masked, g)
        for layer, m in group_layers(masked, g):
            rows = explained.setdefault(m.name, torch.zeros(layer.mask.numel(), dtype=torch.bool))
            rows[m.channels[~keep[m.units]]] = True
        if bool(keep.all()):
            continue
        if not bool(keep.any()):
            raise BadInputError(f"shrinking would leave {g.name} with no units (all masked)")
        if not g.removable:
            raise BadInputError(f"cannot remove the masked units of {g.name}: {g.reason}")
        keeps[g.name] = keep
    for name, rows in explained.items():
        layer = masked.get_submodule(name)
        if bool((~layer.mask.detach().cpu() & ~rows).any()):
            raise BadInputError(
                f"cannot remove the masked units of {name}: its group keeps them (mask a "
                "group's units in all its writers: Simplifier or masking.apply_keeps)"
            )
    covered = {m.name for g in groups for m in g.writers()}
    reached = reached_names(dg)  # dg traced the plain copy: its modules, the same names
    for name, layer in meprop_layers(masked):
        if layer.active_width == layer.mask.numel() or name in covered:
            continue
        if name not in reached and name.rpartition(".")[0] not in reached:
            raise TracingError(
                f"the tracer did not reach {name} on the example inputs (data-dependent "
                "control flow, or a branch the inputs do not take)"
            )
        raise BadInputError(f"cannot remove the masked units of {name}: in no group")
    return keeps


def prune_groups(
    plain: nn.Module, dg: Any, groups: list[UnitGroup], keeps: dict[str, torch.Tensor]
) -> None:
    """Remove from ``plain`` (traced as ``dg``) the units not kept in ``keeps`` (by group
    name), in place; records ``plain.mesimp_kept``."""
    heads: dict[str, tuple[set[int], set[int]]] = {}
    for g in groups:
        keep = keeps.get(g.name)
        if keep is None or bool(keep.all()):
            continue
        dropped = (~keep).nonzero().squeeze(1).tolist()
        if g.attention is not None:  # heads inside an attention block
            q, kv = heads.setdefault(g.attention, (set(), set()))
            _drop_heads(member_module(plain, g.attention), g.kind, dropped, q, kv)
            continue
        root = member_module(plain, g.root)
        drop = sorted(c for u in dropped for c in g.root_channels[u])
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, idxs=drop).prune()
    for name, (q, kv) in heads.items():
        prune_heads(member_module(plain, name), sorted(q), sorted(kv))
    refresh_width_attributes(plain)
    plain.mesimp_kept = {
        n: k.nonzero().squeeze(1).tolist() for n, k in keeps.items() if not bool(k.all())
    }


def _drop_heads(attn: nn.Module, kind: str, units: list[int], q: set, kv: set) -> None:
    from mesimp.simplify.attention import head_layout

    layout = head_layout(attn)
    r, n_kv = layout.group_size, layout.num_kv_heads
    if kind == "heads":
        q.update(units)
        kv.update(units)
    elif kind == "kv_heads":
        kv.update(units)
        q.update(g * r + j for g in units for j in range(r))
    else:  # q_heads: slot j of every kv group
        q.update(g * r + j for j in units for g in range(n_kv))


def round_group(model: nn.Module, group: UnitGroup, multiple: int) -> torch.Tensor:
    """The group's active units cut down to a multiple of ``multiple`` (never below it),
    keeping the most-selected (by summed hits; by weight norm without counts).

    onnxruntime's CPU GEMMs work in column blocks of 16, so widths 83 and 96 cost the
    same; rounding down keeps the units selected most often; fine-tune afterwards."""
    from mesimp.simplify.unit_scores import unit_counts, unit_norms

    keep = group_keeps(model, group)
    width = int(keep.sum())
    target = max(multiple, width // multiple * multiple) if width > multiple else width
    if target >= width:
        return keep
    hits, ref = unit_counts(model, group)
    score = hits.double() if bool((ref > 0).any()) else unit_norms(model, group)
    score = torch.where(keep, score, torch.tensor(-1.0, dtype=torch.double))
    out = torch.zeros_like(keep)
    out[torch.argsort(score, descending=True, stable=True)[:target]] = True
    return out


def _verify(
    masked: nn.Module,
    plain: nn.Module,
    example_inputs: Any,
    groups: list[UnitGroup],
    keeps: dict[str, torch.Tensor],
) -> None:
    try:
        diff = max_output_diff(masked, plain, example_inputs)
    except Exception as e:  # the shrunk graph no longer runs: something untraced
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VerificationError(
            f"the shrunk model fails on the example inputs ({type(e).__name__}: {first}); "
            "a part of the model the dependency graph cannot see depends on the "
            "pruned widths; nothing returned"
        ) from None
    if not diff <= TOLERANCE:
        culprit = _first_failing_group(masked, example_inputs, groups, keeps)
        where = f" ({culprit}: e.g. an activation with f(0) != 0 after it)" if culprit else ""
        raise VerificationError(
            f"the shrunk model differs from the masked one by {diff:.3g} (> "
            f"{TOLERANCE:g}) on the example inputs{where}; nothing returned"
        )


def _first_failing_group(
    masked: nn.Module,
    example_inputs: Any,
    groups: list[UnitGroup],
    keeps: dict[str, torch.Tensor],
) -> str | None:
    """After a failed check: the first group whose units, removed alone, change the
    outputs, to name it in the error."""
    if len(keeps) < 2:
        return next(iter(keeps), None)
    by_name = {g.name: g for g in groups}
    for name, keep in keeps.items():
        one = copy.deepcopy(masked)
        for mod in one.modules():  # every mask lifted, then this group's alone
            if isinstance(mod, MePropCounters):
                mod.load_meprop_state({"mask": torch.ones_like(mod.mask)})
        apply_keeps(one, by_name[name], keep)
        sync(one, groups)
        plain, dg, _ = plain_groups(one, example_inputs)
        prune_groups(plain, dg, groups, {name: keep})
        try:
            if max_output_diff(one, plain, example_inputs) > TOLERANCE:
                return name
        except Exception:  # noqa: BLE001 - a shrunk copy that fails to run fails the check
            return name
    return None


def max_output_diff(a: nn.Module, b: nn.Module, example_inputs: Any) -> float:
    """max |a(x) - b(x)| over every output tensor, both in float64 and eval mode (on
    copies: the models keep their dtype and mode)."""
    outs = []
    for m in (a, b):
        m64 = copy.deepcopy(m).double().eval()
        with torch.no_grad():
            outs.append(flatten_outputs(run_model(m64, cast_floats(example_inputs, torch.float64))))
    if len(outs[0]) != len(outs[1]):
        return float("inf")
    worst = 0.0
    for x, y in zip(outs[0], outs[1], strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
    return worst


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, tuple/list or dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []
