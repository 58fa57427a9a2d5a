"""``meprop_``: put meProp layers into any model in place, and ``unmeprop`` to take them out.

torchao style: a module swap by type with a ``filter_fn``. ``nn.Linear`` becomes
``MePropLinear`` and ``nn.Conv2d`` becomes ``MePropConv2d``, both sharing the original
parameters (call it before or after building the optimizer); a single-layer,
unidirectional ``nn.LSTM`` becomes ``MePropLSTM`` with a *copy* of its parameters (call
it before building the optimizer). Subclasses (``NonDynamicallyQuantizableLinear``
inside ``nn.MultiheadAttention``, say) are left alone: they are part of a module that
reads their weights directly.

The output layer, the last ``nn.Linear`` in module order, is skipped by default: the
paper sparsifies hidden layers, and meSimp never removes outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.attention import MultiheadAttention
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.conv1d import MePropConv1D, is_conv1d
from mesimp.nn.fused import fuse_sequentials_, unfuse_sequentials_
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig

__all__ = ["MEPROP_TYPES", "meprop_", "meprop_layers", "unmeprop"]

# plain type -> (meProp type, how to convert)
MEPROP_TYPES: dict[type[nn.Module], tuple[type[nn.Module], Callable]] = {
    nn.Linear: (MePropLinear, MePropLinear.from_linear),
    nn.Conv2d: (MePropConv2d, MePropConv2d.from_conv),
    nn.LSTM: (MePropLSTM, MePropLSTM.from_lstm),
}
_MEPROP = (*(t for t, _ in MEPROP_TYPES.values()), MePropConv1D)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and (type(m) in MEPROP_TYPES or isinstance(m, _MEPROP) or is_conv1d(m))
    ]


def meprop_layers(model: nn.Module) -> list[tuple[str, MePropCounters]]:
    """Every meProp layer (Linear, Conv2d, LSTM, HF Conv1D) with its name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MePropCounters)]


def output_layer(model: nn.Module) -> nn.Module | None:
    """The last ``nn.Linear`` (plain or meProp) in module order: the output layer."""
    linears = [m for _, m in model.named_modules() if type(m) in (nn.Linear, MePropLinear)]
    return linears[-1] if linears else None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def meprop_(
    model: nn.Module,
    config: MePropConfig,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    skip_output: bool = True,
) -> nn.Module:
    """Swap ``model``'s Linear, Conv2d and LSTM layers for meProp layers, in place.

    ``filter_fn(name, module)`` narrows the choice (return False to keep a layer
    plain). An LSTM that ``MePropLSTM`` cannot hold (several layers, bidirectional,
    ``proj_size``, no bias) is a one-line ``BadInputError`` naming it: exclude it with
    ``filter_fn`` or stack single-layer LSTMs. Already swapped layers are left as they
    are, so a second call changes nothing. Returns ``model``.
    """
    _attention_(model, filter_fn)
    out = output_layer(model) if skip_output else None
    for name, mod in _candidates(model):
        if isinstance(mod, _MEPROP) or mod is out:
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        convert = MePropConv1D.from_conv1d if is_conv1d(mod) else MEPROP_TYPES[type(mod)][1]
        try:
            new = convert(mod, config)
        except BadInputError as e:
            raise BadInputError(f"meprop_: cannot convert {name}: {e}") from None
        new.train(mod.training)
        _set(model, name, new)
    return fuse_sequentials_(model)  # chains of Linear layers: one autograd node (fused.py)


def _attention_(model: nn.Module, filter_fn: Callable | None) -> None:
    """``nn.MultiheadAttention`` -> mesimp's ``MultiheadAttention`` (same parameters,
    an ``nn.Linear`` in-projection), so its projections become meProp layers and its
    heads can shrink apart from the stream. Blocks it cannot hold stay as they are."""
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.MultiheadAttention or not name:
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        try:
            _set(model, name, MultiheadAttention.from_torch(mod))
        except BadInputError:
            continue  # cross-attention widths, bias_kv: left plain (and not simplified)


def unmeprop(model: nn.Module, types: tuple[type, ...] = _MEPROP) -> nn.Module:
    """In place: every meProp layer (of ``types``) back to its plain module (masks are
    *not* applied; ``mesimp.shrink`` removes masked units). Linear and Conv2d share
    parameters."""
    for name, mod in _candidates(model):
        if not isinstance(mod, types):
            continue
        if isinstance(mod, MePropLinear):
            new = mod.to_linear()
        elif isinstance(mod, MePropConv2d):
            new = mod.to_conv()
        elif isinstance(mod, MePropLSTM):
            new = mod.to_lstm()
        elif isinstance(mod, MePropConv1D):
            new = mod.to_plain()
        else:
            continue
        new.train(mod.training)
        _set(model, name, new)
    return unfuse_sequentials_(model)
