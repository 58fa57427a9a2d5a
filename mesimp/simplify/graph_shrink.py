"""``mesimp.shrink``: any masked model -> a physically smaller model of plain PyTorch modules.

The engine is Torch-Pruning's ``DependencyGraph`` (see ``mesimp.coupling``): for every
meProp layer with masked units, the group of coupled parameters (the next layers'
input columns, a BatchNorm's channels, an LSTM's gate rows through mesimp's own
pruner) is pruned together with ``group.prune()`` on a plain copy of the model.

Verification is the contract: the shrunk model's outputs must equal the masked
model's on the example inputs, both run in float64 in eval mode, or nothing is
returned. A layer whose units cannot be removed without changing the function (a
residual stream, a LayerNorm over them) is refused by name before anything is pruned.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, VerificationError
from mesimp.nn.swap import unmeprop
from mesimp.simplify.coupling import (
    build_graph,
    classify,
    lstm_pruners,
    mask_norm_outputs,
    meprop_layers,
    out_pruning_fn,
    run_model,
    strip_norm_masks,
)
from mesimp.simplify.rule import round_keeps

__all__ = ["TOLERANCE", "flatten_outputs", "kept_units", "max_output_diff", "shrink"]

TOLERANCE = 1e-6  # max |masked - shrunk| in float64


def kept_units(model: nn.Module) -> dict[str, list[int]]:
    """What ``shrink`` kept of each layer it pruned: ``{layer name: kept unit indices}``,
    stored on the shrunk model as ``model.mesimp_kept`` (``mesimp.save_model`` writes it)."""
    return dict(getattr(model, "mesimp_kept", {}))


def shrink(
    model: nn.Module,
    example_inputs: Any,
    round_to: int = 1,
    verify: bool = True,
) -> nn.Module:
    """A smaller copy of ``model`` with the masked units of its meProp layers removed.

    ``example_inputs``: what ``model`` is called with (a tensor, a tuple, or a dict of
    keyword arguments); used to trace the graph and to verify. ``round_to``: round each
    pruned width down to a multiple (keeping the most-selected units; the masks are
    tightened to match before verifying). The result holds only plain modules
    (``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM``, ...) in PyTorch's layouts, in the
    input model's train/eval mode; ``model`` is not changed. Refused, with a one-line
    error and nothing returned: a layer that would be left with no units, units that
    cannot be removed (named, with the reason), inputs that do not run, a failed check.
    """
    return _shrink(model, example_inputs, round_to, verify, diagnose=True)


def _shrink(
    model: nn.Module, example_inputs: Any, round_to: int, verify: bool, diagnose: bool
) -> nn.Module:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BadInputError(f"round_to must be an integer >= 1, got {round_to!r}")
    masked = copy.deepcopy(model)
    keeps: dict[str, torch.Tensor] = {}
    for name, layer in meprop_layers(masked):
        if round_to > 1:
            layer.apply_mask(round_keeps(layer, round_to))
        if layer.active_width == 0:
            raise BadInputError(f"shrinking would leave {name} with no units (all masked)")
        if layer.active_width < layer.mask.numel():
            keeps[name] = layer.mask.clone()
    if not keeps:
        plain = unmeprop(masked)
        strip_norm_masks(plain)
        plain.mesimp_kept = {}
        return plain
    # one trace serves both: which units may go, and the groups that remove them
    plain = unmeprop(copy.deepcopy(masked))
    strip_norm_masks(plain)
    dg = build_graph(plain, example_inputs, customized_pruners=lstm_pruners(plain))
    coupling = classify(plain, dg, list(keeps))
    blocked = [c for c in coupling.values() if not c.removable]
    if blocked:
        c = blocked[0]
        raise BadInputError(f"cannot remove the masked units of {c.name}: {c.reason}")
    mask_norm_outputs(masked, coupling)  # the masked model's meaning (idempotent)
    modules = dict(plain.named_modules())
    for name, keep in keeps.items():
        root = modules[name]
        drop = (~keep).nonzero().squeeze(1).tolist()
        group = dg.get_pruning_group(root, out_pruning_fn(dg, root), idxs=drop)
        group.prune()
    plain.train(model.training)
    plain.mesimp_kept = {n: k.nonzero().squeeze(1).tolist() for n, k in keeps.items()}
    if verify:
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
            culprit = (
                _first_failing_layer(masked, example_inputs, list(keeps)) if diagnose else None
            )
            where = f" ({culprit}: e.g. an activation with f(0) != 0 after it)" if culprit else ""
            raise VerificationError(
                f"the shrunk model differs from the masked one by {diff:.3g} (> "
                f"{TOLERANCE:g}) on the example inputs{where}; nothing returned"
            )
    return plain


def _first_failing_layer(masked: nn.Module, example_inputs: Any, names: list[str]) -> str | None:
    """After a failed check: the first layer whose units, removed alone, change the
    outputs (masks of the others lifted), to name it in the error."""
    for name in names:
        one = copy.deepcopy(masked)
        for other, layer in meprop_layers(one):
            if other != name:
                layer.load_meprop_state({"mask": torch.ones_like(layer.mask)})
        try:
            _shrink(one, example_inputs, 1, True, diagnose=False)
        except VerificationError:
            return name
    return None


def max_output_diff(a: nn.Module, b: nn.Module, example_inputs: Any) -> float:
    """max |a(x) - b(x)| over every output tensor, both in float64 and eval mode (on
    copies: the models keep their dtype and mode)."""
    outs = []
    for m in (a, b):
        m64 = copy.deepcopy(m).double().eval()
        with torch.no_grad():
            outs.append(flatten_outputs(run_model(m64, _to_double(example_inputs))))
    if len(outs[0]) != len(outs[1]):
        return float("inf")
    worst = 0.0
    for x, y in zip(outs[0], outs[1], strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
    return worst


def _to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double(v) for v in x)
    return x


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, tuple/list or dict), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []
