"""Masks on dependency groups: the masked model computes what the shrunk one will.

The source of truth is the mask of each meProp layer (``MePropCounters.mask``, saved in
checkpoints and the ``Simplifier``'s state): a group's unit is masked when every row
of it in every meProp layer that writes the group is masked (``group_keeps``). From
the group masks, the rest of the masked model follows (``sync``):

* every module that *reads* the group's channels (a Linear's input columns, a conv's
  input channels, a q/k/v projection reading a residual stream, an output projection
  reading heads) multiplies its input by the channel mask, in a forward pre-hook;
  after that, what the masked channels hold (a plain writer's output, a positional
  parameter, a BatchNorm's shift, a sigmoid's 0.5) reaches nothing;
* every norm over the group's channels (LayerNorm, RMSNorm, GroupNorm) normalises over
  the active channels only, in a forward hook that re-runs the norm's own forward on
  the active channels with its parameters sliced (so its arithmetic, dtype casts
  included, is the shrunk norm's), and outputs 0 on the masked ones;
* BatchNorm and other per-channel modules need nothing: their masked channels are read
  by nobody.

So masked == shrunk holds in the forward and in the gradients of the kept units, and
``mesimp.shrink`` removes exactly what is masked here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mesimp.simplify.groups import UnitGroup, member_module
from mesimp.simplify.unit_scores import group_layers

__all__ = ["apply_keeps", "group_keeps", "install", "strip", "sync"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_IN_KEEP, _NORM_KEEP = "mesimp_in_keep", "mesimp_norm_keep"


def group_keeps(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """The group's active units, from the masks of the meProp layers that write it (all
    active when none does)."""
    keep = torch.zeros(group.size, dtype=torch.bool)
    layers = group_layers(model, group)
    if not layers:
        return ~keep
    for layer, m in layers:
        alive = layer.mask.detach().cpu()[m.channels]
        keep.index_fill_(0, m.units[alive], True)
    return keep


def apply_keeps(model: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
    """Mask the units not in ``keep`` in every meProp layer that writes the group (the
    masks only ever lose units). Call ``sync`` afterwards for the readers and norms."""
    keep = keep.to(torch.bool).cpu()
    for layer, m in group_layers(model, group):
        rows = torch.ones(layer.mask.numel(), dtype=torch.bool)
        rows[m.channels[~keep[m.units]]] = False
        layer.apply_mask(rows)


def install(model: nn.Module, groups: Iterable[UnitGroup]) -> None:
    """Give every reader and norm of ``groups`` its (all-active) mask and hook, once."""
    for g in groups:
        for m in g.members:
            mod = member_module(model, m.name)
            if m.role == "in" and isinstance(mod, nn.Module):
                _ensure(mod, _IN_KEEP, _width_in(mod), _mask_input, pre=True)
            elif m.role == "norm" and isinstance(mod, nn.Module):
                _ensure(mod, _NORM_KEEP, _norm_width(mod), _masked_norm, pre=False)


def sync(model: nn.Module, groups: Sequence[UnitGroup]) -> None:
    """Set the masks of the readers and norms of ``groups`` (all of a model's groups:
    a module's mask is the AND over every group it is in) from the group masks."""
    touched: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for g in groups:
        keep = None
        for m in g.members:
            if m.role not in ("in", "norm"):
                continue
            mod = member_module(model, m.name)
            mask = getattr(mod, _IN_KEEP if m.role == "in" else _NORM_KEEP, None)
            if mask is None:
                continue
            if id(mask) not in touched:
                mask.fill_(True)
                touched[id(mask)] = (mod, mask)
            keep = group_keeps(model, g) if keep is None else keep
            ch = m.channels.to(mask.device)
            mask[ch] &= keep[m.units].to(mask.device)
    for mod, mask in touched.values():
        mod._mesimp_full = bool(mask.all())


def strip(model: nn.Module) -> None:
    """Remove every mask hook and buffer of ``install`` (from a copy about to be pruned)."""
    for mod in model.modules():
        for hook_id in mod.__dict__.pop("_mesimp_hooks", ()):
            mod._forward_pre_hooks.pop(hook_id, None)
            mod._forward_hooks.pop(hook_id, None)
        for attr in (_IN_KEEP, _NORM_KEEP):
            if attr in mod._buffers:
                del mod._buffers[attr]
        mod.__dict__.pop("_mesimp_full", None)


def _ensure(mod: nn.Module, attr: str, width: int, hook: Any, pre: bool) -> None:
    if attr in mod._buffers:
        return
    device = next((t.device for t in mod.parameters(recurse=False)), None)
    mod.register_buffer(attr, torch.ones(width, dtype=torch.bool, device=device), persistent=False)
    mod._mesimp_full = True
    handle = mod.register_forward_pre_hook(hook) if pre else mod.register_forward_hook(hook)
    # by id: a deep copy keeps the hook dicts and ids, not a working handle
    mod.__dict__.setdefault("_mesimp_hooks", []).append(handle.id)


def _width_in(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    if isinstance(mod, _CONVS):
        return mod.in_channels
    if isinstance(getattr(mod, "input_size", None), int):  # nn.LSTM, MePropLSTM
        return mod.input_size
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings
    return int(mod.weight.shape[0])  # HF Conv1D: weight [in, out]


def _norm_width(mod: nn.Module) -> int:
    if isinstance(mod, nn.GroupNorm):
        return mod.num_channels
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[0])
    return int(mod.normalized_shape[-1])


def _channel_dim(mod: nn.Module, x: torch.Tensor) -> int:
    """Where a module's channels are in its input: after the batch for convs and
    GroupNorm and channels-first LayerNorms (``LayerNorm2d``), last otherwise."""
    if isinstance(mod, _CONVS):
        return x.dim() - len(mod.kernel_size) - 1
    if isinstance(mod, nn.GroupNorm) or "2d" in type(mod).__name__.lower():
        return 1
    return -1


def _mask_input(mod: nn.Module, args: tuple) -> tuple | None:
    if mod._mesimp_full or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    keep = getattr(mod, _IN_KEEP)
    shape = [1] * x.dim()
    shape[_channel_dim(mod, x)] = -1
    return (x * keep.view(shape).to(x.dtype), *args[1:])


def _masked_norm(mod: nn.Module, args: tuple, output: Any) -> Any:
    """The norm's own forward over the active channels (parameters sliced), 0 elsewhere."""
    if (
        mod._mesimp_full
        or mod.__dict__.get("_mesimp_inside")
        or not isinstance(output, torch.Tensor)
    ):
        return None
    x = args[0]
    dim = _channel_dim(mod, x)
    idx = getattr(mod, _NORM_KEEP).nonzero().squeeze(1).to(x.device)
    params = {
        n: p.index_select(0, idx.to(p.device))
        for n, p in mod.named_parameters(recurse=False)
        if p.dim() == 1 and p.shape[0] == getattr(mod, _NORM_KEEP).numel()
    }
    shape = getattr(mod, "normalized_shape", None)
    mod.__dict__["_mesimp_inside"] = True
    try:
        if isinstance(shape, (tuple, list)) and shape:
            mod.normalized_shape = (*tuple(shape)[:-1], int(idx.numel()))
        y = torch.func.functional_call(mod, params, (x.index_select(dim, idx), *args[1:]))
    finally:
        mod.__dict__.pop("_mesimp_inside", None)
        if isinstance(shape, (tuple, list)) and shape:
            mod.normalized_shape = shape
    return output.new_zeros(output.shape).index_copy(dim, idx, y)
