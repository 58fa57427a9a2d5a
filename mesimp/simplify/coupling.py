"""Which meProp layers' units can be removed from a model, from its dependency graph.

Removing output unit j of a layer removes everything coupled to it: the next layers'
input columns, a following BatchNorm's channel j, the matching channel of a residual
add or a concatenation. Torch-Pruning's ``DependencyGraph`` (traced through autograd on
example inputs) finds those groups; this module reads them and decides, per meProp
layer, whether masking its units and later removing them leaves the model's function
unchanged ("masked == shrunk"):

* **removable**: the layer is the only writer of those channels, and nothing
  normalizes over them except a BatchNorm right on them (per-channel, so a masked
  channel's BatchNorm output is zeroed as well: ``mask_norm_outputs``);
* **not removable**, with the reason: another layer also writes into the channels (a
  residual stream: a unit goes only if *every* writer drops it, and a plain layer
  never does), a LayerNorm/GroupNorm/InstanceNorm normalizes over them (removing a
  channel changes the statistics of the others), or they reach the model's output.

meSimp masks only removable layers; ``mesimp.shrink`` removes their masked units.
A layer that did not run on the example inputs (data-dependent control flow, an
unused branch) is not in the graph: ``TracingError`` names it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, MesimpError
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.nn.lstm import MePropLSTM

__all__ = [
    "LayerCoupling",
    "TracingError",
    "analyze",
    "build_graph",
    "classify",
    "mask_norm_outputs",
    "meprop_layers",
    "out_pruning_fn",
    "run_model",
    "strip_norm_masks",
]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_GROUP_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm)
_WRITERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LSTM, nn.GRU)


class TracingError(BadInputError):
    """The model could not be traced on the example inputs, or a layer was not reached."""


@dataclass
class LayerCoupling:
    """What removing a meProp layer's units takes with it."""

    name: str
    removable: bool
    reason: str | None = None  # why not, in a few words
    norms: list[str] = field(default_factory=list)  # BatchNorms applied to its channels
    consumers: list[str] = field(default_factory=list)  # layers whose inputs shrink with it


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # a runtime dependency; a one-line message if it is missing
        raise MesimpError("this needs torch-pruning (pip install 'torch-pruning==1.6.1')") from e
    return tp


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(*example_inputs)`` (a tensor, a tuple of them, or a dict of keywords)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def out_pruning_fn(dg: Any, module: nn.Module) -> Any:
    """The graph's "remove output units" function for a plain layer (its own pruner
    for each type, mesimp's for ``nn.LSTM``)."""
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise BadInputError(f"no pruning function for {type(module).__name__}")
    return pruner.prune_out_channels


def build_graph(plain: nn.Module, example_inputs: Any, customized_pruners: dict | None = None):
    """Torch-Pruning's dependency graph of a model of plain modules, traced in place in
    eval mode (so no BatchNorm statistics move); the model's mode is restored."""
    tp = _tp()
    training = plain.training
    plain.eval()  # tracing must not move BatchNorm's running statistics
    try:
        return _trace(tp, plain, example_inputs, customized_pruners)
    finally:
        plain.train(training)


def _trace(tp: Any, plain: nn.Module, example_inputs: Any, customized_pruners: dict | None):
    try:
        with torch.enable_grad():
            run_model(plain, example_inputs)  # a clear message for inputs that do not fit
    except Exception as e:  # any error of the user's forward: report it in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TracingError(
            f"the example inputs do not run through the model: {type(e).__name__}: {first}"
        ) from None
    inputs, forward_fn = example_inputs, None
    if isinstance(example_inputs, dict):
        forward_fn = lambda m, x: m(**x)  # noqa: E731
    elif isinstance(example_inputs, list):
        inputs = tuple(example_inputs)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                plain,
                example_inputs=inputs,
                forward_fn=forward_fn,
                customized_pruners=customized_pruners,
                verbose=False,
            )
    except Exception as e:  # Torch-Pruning raises many types while tracing
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TracingError(
            f"Torch-Pruning could not trace the model: {type(e).__name__}: {first}"
        ) from None


def meprop_layers(model: nn.Module) -> list[tuple[str, MePropCounters]]:
    """Every meProp layer (Linear, Conv2d, LSTM) with its name, in module order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (MePropLinear, MePropConv2d, MePropLSTM))
    ]


def analyze(
    model: nn.Module,
    example_inputs: Any,
    names: Sequence[str] | None = None,
) -> dict[str, LayerCoupling]:
    """The coupling of each meProp layer of ``model`` (or of ``names``), traced on a copy
    of the model with plain modules; ``model`` itself is not touched."""
    from mesimp.nn.swap import unmeprop

    layers = dict(meprop_layers(model))
    if names is not None:
        missing = [n for n in names if n not in layers]
        if missing:
            raise BadInputError(f"not meProp layers: {', '.join(missing)}")
        layers = {n: layers[n] for n in names}
    plain = unmeprop(copy.deepcopy(model))
    dg = build_graph(plain, example_inputs, customized_pruners=lstm_pruners(plain))
    return classify(plain, dg, list(layers))


def classify(plain: nn.Module, dg: Any, names: Sequence[str]) -> dict[str, LayerCoupling]:
    """``analyze`` on a graph already traced (``build_graph``) of the plain model."""
    modules = dict(plain.named_modules())
    name_of = {m: n for n, m in modules.items()}
    out: dict[str, LayerCoupling] = {}
    for name in names:
        root = modules[name]
        if root not in dg.module2node:
            raise TracingError(
                f"the tracer did not reach {name} on the example inputs (data-dependent "
                "control flow, or a branch the inputs do not take)"
            )
        every = list(range(dg.get_out_channels(root)))
        group = dg.get_pruning_group(root, out_pruning_fn(dg, root), idxs=every)
        out[name] = _classify(name, root, group, name_of)
    return out


def _classify(name: str, root: nn.Module, group: Any, name_of: dict) -> LayerCoupling:
    tp = _tp()
    writers, norms, bad_norms, consumers = [], [], [], []
    reaches_output = False
    for dep, _ in group:
        mod = dep.target.module
        if mod is root:
            continue
        if isinstance(mod, tp.ops._OutputOp):
            reaches_output = True
            continue
        other = name_of.get(mod)
        if other is None:  # Torch-Pruning's own ops: element-wise, reshape, concat...
            continue
        handler = getattr(dep.handler, "__name__", "")
        if isinstance(mod, _BATCHNORMS):
            norms.append(other)
        elif isinstance(mod, _GROUP_NORMS):
            bad_norms.append(other)
        elif isinstance(mod, nn.MultiheadAttention):
            writers.append(other)
        elif isinstance(mod, _WRITERS):
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1
            if handler == "prune_out_channels" or depthwise:
                writers.append(other)
            else:
                consumers.append(other)
    reason = None
    if reaches_output:
        reason = "its units reach the model's output"
    elif writers:
        reason = f"its channels are also written by {', '.join(sorted(set(writers)))}"
    elif bad_norms:
        reason = f"{', '.join(sorted(set(bad_norms)))} normalizes over its units"
    return LayerCoupling(
        name,
        reason is None,
        reason,
        sorted(set(norms)),
        sorted(set(consumers)),
    )


def mask_norm_outputs(model: nn.Module, coupling: dict[str, LayerCoupling]) -> None:
    """Zero the masked channels at the output of the BatchNorms that follow a removable
    layer (a masked conv channel is 0, but BatchNorm maps 0 to its shift). Idempotent:
    one forward hook per BatchNorm, reading the layer's current mask."""
    modules = dict(model.named_modules())
    for c in coupling.values():
        if not c.removable:
            continue
        layer = modules[c.name]
        for bn_name in c.norms:
            bn = modules[bn_name]
            _remove_hook(bn)
            bn._mesimp_mask_hook = bn.register_forward_hook(_make_hook(layer)).id


def strip_norm_masks(model: nn.Module) -> None:
    """Remove the hooks of ``mask_norm_outputs`` (from a copy about to be pruned)."""
    for m in model.modules():
        _remove_hook(m)


def _remove_hook(module: nn.Module) -> None:
    # by id: a deep copy keeps the hook dict and its ids, but not a working handle
    hook_id = module.__dict__.pop("_mesimp_mask_hook", None)
    if hook_id is not None:
        module._forward_hooks.pop(hook_id, None)


def _make_hook(layer: MePropCounters):
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if layer.active_width == layer.mask.numel():
            return None
        shape = (1, -1) + (1,) * (output.dim() - 2)
        return output * layer.mask.view(shape).to(output.dtype)

    return hook


def lstm_pruners(model: nn.Module) -> dict | None:
    """mesimp's own ``nn.LSTM`` pruner for Torch-Pruning (1.6.1's raises ``IndexError``
    and asserts one layer), when the model has LSTMs."""
    if not any(isinstance(m, nn.LSTM) for m in model.modules()):
        return None
    from mesimp.simplify.lstm_pruner import LSTMPruner

    return {nn.LSTM: LSTMPruner()}
