"""Torch-Pruning (VainF/Torch-Pruning 1.6.1) baselines: an optional dependency.

MLP: magnitude pruning (L2 norm of each hidden unit's coupled weights: its row in
``W_l`` and ``b_l`` and its column in ``W_{l+1}``) of a trained dense net to *exact*
per-layer widths. ``BasePruner`` keeps ``int(n * (1 - ratio))`` channels of a layer
named in ``pruning_ratio_dict``, so the ratio ``1 - (w + 0.5) / n`` lands on ``w``
whatever the float rounding; the widths are verified after the step.

LSTM: the same pruner on ``Embedding -> LSTM -> Linear``. Version 1.6.1 raised
``IndexError`` on this before; ``try_prune_lstm`` records whatever happens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mesimp.errors import MesimpError
from mesimp.models import hidden_sizes, linear_layers

NOT_INSTALLED = "skipped: torch-pruning not installed (pip install '.[bench]')"


class PruneError(MesimpError):
    """Torch-Pruning did not produce the requested widths."""


def available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        from importlib.metadata import version as v

        return v("torch-pruning")
    except Exception:  # not installed, or no metadata
        return None


def exact_ratio(n: int, width: int) -> float:
    """The pruning ratio for which BasePruner keeps exactly ``width`` of ``n`` channels."""
    return 1.0 - (width + 0.5) / n


def prune_mlp_to_widths(model: nn.Module, widths: list[int]) -> nn.Module:
    """A copy of the MLP ``model`` with its hidden layers pruned to ``widths`` by L2
    magnitude; the output layer is never pruned. Raises PruneError on a width miss."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    linears = [m for _, m in linear_layers(model)]
    hidden, output = linears[:-1], linears[-1]
    if len(widths) != len(hidden):
        raise PruneError(f"{len(widths)} widths for {len(hidden)} hidden layers")
    ratios = {m: exact_ratio(m.out_features, w) for m, w in zip(hidden, widths, strict=True)}
    example = torch.zeros(2, linears[0].in_features)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=[output],
    )
    pruner.step()
    got = hidden_sizes(model)
    if got != list(widths):
        raise PruneError(f"torch-pruning gave widths {got}, asked for {widths}")
    return model


def try_prune_lstm(model: nn.Module, width: int, vocab_size: int) -> dict[str, Any]:
    """Try to prune the tagger's LSTM hidden units to ``width``.

    Returns ``{"ok": True, "model": pruned}`` or ``{"ok": False, "error": "Type: first
    line"}``; never raises for Torch-Pruning's own failures.
    """
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    lstms = [m for m in model.modules() if isinstance(m, nn.LSTM)]
    if len(lstms) != 1:
        return {"ok": False, "error": f"expected one nn.LSTM, found {len(lstms)}"}
    lstm = lstms[0]
    example = torch.randint(1, vocab_size, (2, 8))
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.0,
            pruning_ratio_dict={lstm: exact_ratio(lstm.hidden_size, width)},
            ignored_layers=[linear_layers(model)[-1][1]],
        )
        pruner.step()
        with torch.no_grad():
            model(example)
    except Exception as e:  # the outcome is the result: record any failure
        first = (str(e).strip().splitlines() or [""])[0]
        return {"ok": False, "error": f"{type(e).__name__}: {first}"[:200]}
    if lstm.hidden_size != width or lstm.weight_hh_l0.shape != (4 * width, width):
        return {
            "ok": False,
            "error": f"ran, but the LSTM has hidden_size {lstm.hidden_size} and weight_hh "
            f"{tuple(lstm.weight_hh_l0.shape)}, asked for {width}",
        }
    return {"ok": True, "model": model}
