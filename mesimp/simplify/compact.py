"""Compaction: remove a model's masked units during training, in place, optimizer included.

A masked unit is still computed by every forward and backward: the mask only multiplies
it by zero. ``compact_`` removes it, so training continues at the active widths: the
meSimp paper's "reduce the computational cost both in the training and decoding".

One mechanism with ``mesimp.shrink``: the same groups, the same pruners, the same
``prune_groups``, run on a plain copy of the live model whose parameters (and floating
buffers) hold *their own flat indices* (float64, exact up to 2^53). After the prune,
every parameter of the copy holds the indices of the entries it kept, so the live
model's new parameters are gathered from the old ones, and so is every optimizer state
tensor of the parameter's shape (Adam's moments, Adagrad's sums, momentum buffers;
``RowSparseAdam`` and the compiled optimizers keep theirs in ``optimizer.state`` too).
The live modules keep their class (meProp layers stay meProp layers) and take the new
parameters and widths; meProp counters keep the rows of the kept units, masks become
all-active, and MSBP memories over changed widths are dropped (a mask change drops them
in masked training as well).

The optimizer is **rebound in place**: its param groups list the new parameters and
its state is keyed by them (documented choice: no optimizer to rebuild, schedulers
and the Hugging Face Trainer keep working). A DDP wrapper must be rebuilt by its
owner (``mesimp train`` does it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.nn.linear import MePropCounters
from mesimp.nn.swap import meprop_layers
from mesimp.simplify.graph_shrink import masked_groups, plain_groups, prune_groups
from mesimp.simplify.groups import UnitGroup, find_groups
from mesimp.simplify.masking import strip

__all__ = ["Compaction", "compact_", "rebind_optimizer", "replay_"]


@dataclass
class Compaction:
    """What one compaction removed."""

    kept: dict[str, list[int]]  # group name -> kept units, of the widths before
    params: dict[int, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    # id(old parameter) -> (new parameter, flat indices of the old one it kept)
    groups: list[UnitGroup] = field(default_factory=list)  # the groups at the new widths


def compact_(
    model: nn.Module, example_inputs: Any, optimizer: torch.optim.Optimizer | None = None
) -> Compaction | None:
    """Remove the masked units of ``model`` in place (``None`` if none is masked); the
    optimizer, if given, is rebound to the new parameters with its state sliced."""
    if all(layer.active_width == layer.mask.numel() for _, layer in meprop_layers(model)):
        return None  # nothing masked (a point that dropped nothing): no trace needed
    plain, dg, groups = plain_groups(model, example_inputs)
    keeps = masked_groups(model, dg, groups)
    if not keeps:
        return None
    for t in [*plain.parameters(), *plain.buffers()]:
        if t.is_floating_point():
            t.data = torch.arange(t.numel(), dtype=torch.float64).view(t.shape)
    prune_groups(plain, dg, groups, keeps)
    done = Compaction({n: k.nonzero().squeeze(1).tolist() for n, k in keeps.items()})
    done.groups = find_groups(plain, dg)  # the same graph, at the new widths
    before = {name: layer.mask.detach().clone() for name, layer in meprop_layers(model)}
    _transplant(model, plain, done)
    for name, layer in meprop_layers(model):
        _resize_counters(layer, before[name])
    strip(model)  # every mask is gone: the readers' and norms' masks with them
    if optimizer is not None:
        rebind_optimizer(optimizer, done.params)
    return done


def replay_(
    model: nn.Module,
    example_inputs: Any,
    compacted: dict[str, list[int]],
    optimizer: torch.optim.Optimizer | None = None,
) -> Compaction | None:
    """Compact a meProp model built at full width as a run did: ``compacted`` maps a
    group name to its units still in the model, as indices of its original width (what
    ``Simplifier.compacted`` records). Groups already at those widths are left; returns
    what was removed (``None``: nothing)."""
    from mesimp.errors import BadInputError
    from mesimp.simplify.masking import apply_keeps

    _, _, groups = plain_groups(model, example_inputs)
    by_name = {g.name: g for g in groups}
    todo = False
    for name, kept in compacted.items():
        g = by_name.get(name)
        if g is None:
            raise BadInputError(f"the run compacted {name}, which this model does not have")
        if g.size == len(kept):
            continue  # already at the run's widths
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[torch.tensor(kept, dtype=torch.long)] = True
        apply_keeps(model, g, keep)
        todo = True
    return compact_(model, example_inputs, optimizer) if todo else None


def _transplant(model: nn.Module, plain: nn.Module, done: Compaction) -> None:
    """Give each live module the pruned copy's shapes: parameters and floating buffers
    gathered by the indices the copy holds, and the width attributes that changed."""
    shared: dict[tuple[int, bytes], nn.Parameter] = {}  # tied weights stay tied
    for name, pm in plain.named_modules():
        lm = model.get_submodule(name)
        for pname, p in list(pm.named_parameters(recurse=False)):
            old = getattr(lm, pname)
            if p.shape == old.shape:
                continue
            idx = p.detach().flatten().long()
            key = (id(old), idx.numpy().tobytes())
            new = shared.get(key)
            if new is None:
                value = old.detach().flatten()[idx.to(old.device)].view(p.shape).clone()
                new = shared[key] = nn.Parameter(value, requires_grad=old.requires_grad)
                done.params[id(old)] = (new, idx)
            setattr(lm, pname, new)
        for bname, b in list(pm.named_buffers(recurse=False)):
            old = getattr(lm, bname, None)
            if isinstance(old, torch.Tensor) and b.shape != old.shape and b.is_floating_point():
                idx = b.detach().flatten().long().to(old.device)
                lm._buffers[bname] = old.detach().flatten()[idx].view(b.shape).clone()
        for attr, value in vars(pm).items():
            if attr.startswith("_") or not _width_like(value):
                continue
            if hasattr(lm, attr) and _width_like(getattr(lm, attr)) and getattr(lm, attr) != value:
                setattr(lm, attr, value)


def _width_like(v: object) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v))


def _resize_counters(layer: MePropCounters, mask_before: torch.Tensor) -> None:
    """A meProp layer's counters after its rows were cut to the active ones: the hits of
    the kept rows, an all-active mask, the MSBP memory dropped if the width changed."""
    width = _out_width(layer)
    if width == layer.mask.numel():
        return
    kept = mask_before.nonzero().squeeze(1).to(layer.hits.device)
    hits, ref, counting = layer.hits.index_select(0, kept), layer.ref.clone(), layer.counting
    layer._init_counters(width, layer.mask.device)
    layer.hits.copy_(hits)
    layer.ref.copy_(ref)
    layer.counting = counting


def _out_width(layer: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "hidden_size", "nf"):
        v = getattr(layer, attr, None)
        if isinstance(v, int):
            return v
    raise TypeError(f"no output width on {type(layer).__name__}")


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, params: dict[int, tuple[nn.Parameter, torch.Tensor]]
) -> None:
    """Point ``optimizer`` at the new parameters, in place: its param groups list them
    and every state tensor shaped like an old parameter is gathered like it (scalars,
    Adam's ``step`` say, carry over)."""
    state = optimizer.state
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            if id(p) not in params:
                new_params.append(p)
                continue
            new, idx = params[id(p)]
            new_params.append(new)
            if p in state:
                st = state.pop(p)
                state[new] = {k: _gather(v, p, new, idx) for k, v in st.items()}
        group["params"] = new_params


def _gather(v: Any, old: torch.Tensor, new: torch.Tensor, idx: torch.Tensor) -> Any:
    if isinstance(v, torch.Tensor) and v.shape == old.shape:
        return v.detach().flatten()[idx.to(v.device)].view(new.shape).clone()
    return v
