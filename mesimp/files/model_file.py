"""Save and load a shrunk user model without pickling code.

A file holds plain data only (``torch.load(weights_only=True)`` reads it)::

    {"format": "mesimp.model", "version": 1,
     "factory": "package.module:function",   # builds the *unshrunk* architecture
     "factory_kwargs": {...},                # plain JSON-like values
     "example_inputs": [{"shape": [...], "dtype": "float32"[, "name": kw]}, ...],
     "kept": {"layer.name": [kept unit indices], ...},   # what mesimp.shrink kept
     "state_dict": {...}}                    # the shrunk model's, PyTorch layouts

``load_model`` imports the factory, builds the model, replays the shrink (Torch-Pruning's
dependency graph traced on zero inputs of the recorded shapes; the same groups as at
shrink time), then loads the state_dict strictly: the outputs are bit-identical to the
saved model's.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, CheckpointError
from mesimp.files.atomic import atomic_write, check_writable
from mesimp.files.checkpoint import safe_torch_load
from mesimp.simplify.graph_shrink import flatten_outputs, kept_units, prune_groups
from mesimp.simplify.groups import UnitGroup, find_groups
from mesimp.simplify.tracing import run_model, trace

__all__ = ["FORMAT", "load_model", "save_model"]

FORMAT = "mesimp.model"
VERSION = 1
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool)
}


def resolve_factory(factory: str) -> Any:
    """``"package.module:function"`` -> the function (a one-line error if it does not import)."""
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise BadInputError(f"factory must look like 'package.module:function', got {factory!r}")
    mod_name, _, attr = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except ImportError as e:
        raise BadInputError(f"factory {factory!r} does not import: {e}") from None
    except AttributeError:
        raise BadInputError(f"factory {factory!r}: {mod_name} has no {attr!r}") from None
    if not callable(fn):
        raise BadInputError(f"factory {factory!r} is not callable")
    return fn


def _input_specs(example_inputs: Any) -> list[dict[str, Any]]:
    """Shapes and dtypes of the example inputs (and their keywords, for a dict)."""
    if isinstance(example_inputs, dict):
        named = list(example_inputs.items())
    else:
        items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        named = [(None, t) for t in items]
    specs = []
    for name, t in named:
        if not isinstance(t, torch.Tensor) or str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise BadInputError("example_inputs must be tensors of a float, int or bool dtype")
        spec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if name is not None:
            spec["name"] = str(name)
        specs.append(spec)
    return specs


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    factory: str,
    example_inputs: Any,
    factory_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (from ``mesimp.shrink``, or any model ``factory`` builds as is)
    atomically; checks first that the factory imports and that the file loads back to
    the same outputs."""
    resolve_factory(factory)
    out = check_writable(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "factory": factory,
        "factory_kwargs": dict(factory_kwargs or {}),
        "example_inputs": _input_specs(example_inputs),
        "kept": kept_units(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    try:  # refuse to write what would not load back
        rebuilt = _rebuild(payload, f"{path}")
    except (BadInputError, CheckpointError) as e:
        raise BadInputError(
            f"{factory} does not rebuild this model ({e}); not writing {path}"
        ) from None
    was = model.training
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        same = _same_outputs(model, rebuilt, example_inputs)
    model.train(was)
    if not same:
        raise BadInputError(
            f"{factory} with the recorded shrink does not rebuild this model (outputs "
            f"differ); not writing {path}"
        )
    return atomic_write(out, lambda tmp: torch.save(payload, tmp))


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model saved by ``save_model``, rebuilt and loaded (in eval mode)."""
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mesimp model file (no format={FORMAT!r} field)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported model file version {payload.get('version')!r}")
    return _rebuild(payload, str(path)).eval()


def _rebuild(payload: dict[str, Any], where: str) -> nn.Module:
    try:
        factory, kwargs = payload["factory"], payload["factory_kwargs"]
        kept, state = payload["kept"], payload["state_dict"]
        specs = payload["example_inputs"]
        zeros = [torch.zeros(s["shape"], dtype=_DTYPES[s["dtype"]]) for s in specs]
        names = [s.get("name") for s in specs]
        inputs: Any = tuple(zeros)
        if names and all(isinstance(n, str) for n in names):  # keyword inputs
            inputs = dict(zip(names, zeros, strict=True))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: malformed model file ({e})") from None
    model = resolve_factory(factory)(**kwargs)
    if not isinstance(model, nn.Module):
        raise BadInputError(f"factory {factory!r} returned a {type(model).__name__}, not a model")
    if kept:
        dg = trace(model, inputs)
        groups = find_groups(model, dg)
        prune_groups(model, dg, groups, _keeps(kept, groups, where, factory))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{where}: the weights do not fit {factory} ({first})") from None
    model.mesimp_kept = dict(kept)
    return model


def _keeps(
    kept: dict[str, list[int]], groups: list[UnitGroup], where: str, factory: str
) -> dict[str, torch.Tensor]:
    """The recorded kept units as keep masks, by group name. Files of mesimp <= 0.x
    named each group by its first meProp layer, with channel indices: the same thing for
    one-channel units, which is all those versions could remove."""
    by_name = {g.name: g for g in groups}
    keeps = {}
    for name, units in kept.items():
        g = by_name.get(name)
        if g is None:
            raise CheckpointError(f"{where}: {factory} has no layer or group {name!r}")
        keep = torch.zeros(g.size, dtype=torch.bool)
        try:
            keep[torch.tensor([int(u) for u in units], dtype=torch.long)] = True
        except (IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad kept units for {name!r} ({e})") from None
        keeps[name] = keep
    return keeps


def _same_outputs(a: nn.Module, b: nn.Module, example_inputs: Any) -> bool:
    xa = flatten_outputs(run_model(a, example_inputs))
    xb = flatten_outputs(run_model(b, example_inputs))
    return len(xa) == len(xb) and all(torch.equal(x, y) for x, y in zip(xa, xb, strict=True))
