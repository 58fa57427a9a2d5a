"""Versioned checkpoints that load with ``torch.load(weights_only=True)``.

Layout (all plain types and tensors, so no pickle code ever runs on load)::

    {"format": "mesimp.checkpoint", "version": 1, "mesimp_version": str,
     "arch": {...},                       # rebuild the module from this
     "state_dict": {...},                 # nn.Linear-compatible keys
     "meprop": {"config": {...} | None,   # MePropConfig as a dict
                "layers": {name: {"hits": int64[n], "ref": int64[], "mask": bool[n]}}},
     "train": {...},                      # metrics, seed, config, data, epoch...
     "resume": {...}}                     # only in RUN.last.pt: see mesimp.train

meProp counters and masks live in ``meprop`` rather than in ``state_dict`` so that
``state_dict`` loads unchanged into a plain PyTorch model built from ``arch``.

``resume`` (optional, added without a version bump: older readers ignore it, and a
checkpoint without it is simply not resumable) holds the optimizer state, RNG
states, data order and loop position that ``mesimp train --resume`` needs.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp._version import __version__
from mesimp.errors import CheckpointError, MesimpError
from mesimp.files.atomic import atomic_write
from mesimp.models import CNN, arch_from_dict, build_model
from mesimp.nn.linear import MePropConfig, MePropCounters
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.swap import meprop_

FORMAT = "mesimp.checkpoint"
VERSION = 1


def meprop_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Counters and masks of every meProp layer (``MePropLinear``, ``MePropLSTM``) in
    ``model``, keyed by module name."""
    return {
        name: mod.meprop_state()
        for name, mod in model.named_modules()
        if isinstance(mod, MePropCounters)
    }


def make_checkpoint(
    model: nn.Module,
    arch: dict[str, Any],
    meprop_config: MePropConfig | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (tensors are detached CPU copies)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "mesimp_version": __version__,
        "arch": dict(arch),
        "state_dict": state,
        "meprop": {
            "config": meprop_config.to_dict() if meprop_config is not None else None,
            "layers": meprop_state(model),
        },
        "train": dict(train or {}),
    }


class NonFiniteError(MesimpError):
    """NaN/Inf where only finite numbers make sense (weights, optimizer state, a loss)."""


@torch.no_grad()
def first_nonfinite(obj: Any, where: str = "") -> str | None:
    """The key path of the first floating-point tensor in ``obj`` holding NaN or Inf.

    Walks dicts, lists and tuples. The fast path is one ``sum()`` per tensor (finite
    sum => all finite); only a non-finite sum, which huge finite values can also
    produce, pays for the exact ``isfinite`` check.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            t = obj.coalesce().values() if obj.is_sparse else obj
            if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(t.isfinite().all()):
                return where or "tensor"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        bad = first_nonfinite(value, f"{where}.{key}" if where else str(key))
        if bad is not None:
            return bad
    return None


def save_checkpoint(
    path: str | os.PathLike, ckpt: dict[str, Any], *, allow_nonfinite: bool = False
) -> Path:
    """Write ``ckpt`` atomically (temp file + fsync + rename).

    Refuses (``NonFiniteError``, nothing written, the old file kept) a checkpoint
    whose tensors hold NaN or Inf: a diverged run must never overwrite the last good
    checkpoint. ``allow_nonfinite=True`` skips the check.
    """
    if not allow_nonfinite:
        bad = first_nonfinite(ckpt)
        if bad is not None:
            raise NonFiniteError(f"refusing to save {path}: {bad} holds NaN/Inf values")
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True``; never runs pickled code."""
    return validate_checkpoint(safe_torch_load(path), Path(path))


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one ``CheckpointError``
    line (and never torch's advice to load unsafely)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, not a checkpoint")
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({e.strerror or e})") from e
    # torch.save writes a zip archive (PK..); very old files are a bare pickle (0x80).
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (unrecognized file header)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False: exactly what we must not do.
        raise CheckpointError(
            f"{p}: refused: it holds pickled objects that safe loading (weights_only) does "
            "not allow; nothing in it was run"
        ) from e
    except (
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        struct.error,  # a truncated BINUNICODE/BINBYTES length field inside data.pkl
        AssertionError,  # torch's persistent_load raises it for a malformed persistent id
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a loadable mesimp checkpoint ({first[:200]})") from e
    return ckpt


def validate_checkpoint(ckpt: Any, where: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a mesimp checkpoint (no format={FORMAT!r} field)")
    version = ckpt.get("version")
    if not isinstance(version, int) or version < 1:
        shown = " ".join(repr(version).split())[:80]  # a tensor's repr spans lines
        raise CheckpointError(f"{where}: invalid checkpoint version {shown}")
    if version > VERSION:
        raise CheckpointError(
            f"{where}: checkpoint version {version} is newer than supported version {VERSION};"
            " upgrade mesimp"
        )
    for key, typ in (("arch", dict), ("state_dict", dict)):
        if not isinstance(ckpt.get(key), typ):
            raise CheckpointError(f"{where}: checkpoint field {key!r} is missing or malformed")
    ckpt.setdefault("meprop", {"config": None, "layers": {}})
    ckpt.setdefault("train", {})
    if not isinstance(ckpt["train"], dict):
        raise CheckpointError(f"{where}: checkpoint field 'train' is malformed")
    if not isinstance(ckpt["train"].get("metrics", {}), dict):
        raise CheckpointError(f"{where}: checkpoint field 'train.metrics' is malformed")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], meprop: bool | None = None) -> nn.Module:
    """Rebuild the model and load its weights.

    With ``meprop=None`` (default) the model gets ``MePropLinear`` layers exactly
    when the checkpoint holds meProp layer state, so masks and counters come back
    and the model computes what it computed in training. ``meprop=False`` returns
    the plain PyTorch model (masks are then *not* applied).
    """
    try:
        arch = arch_from_dict(ckpt["arch"])
        # Built on the meta device first (no memory): a forged arch with huge sizes must
        # be refused against the stored weights before anything is allocated.
        with torch.device("meta"):
            skeleton = build_model(arch)
    except MesimpError as e:
        if "\n" not in str(e):
            raise
        # models.py puts the raw value in its message: a tensor's repr spans lines
        raise CheckpointError(" ".join(str(e).split())[:300]) from e
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        # hidden_sizes=["x"] (ValueError), in_features=2.5 (TypeError), 2**70 (Overflow/Runtime)
        raise CheckpointError(f"checkpoint 'arch' is malformed: {_first_line(e)}") from e
    _check_weight_shapes(skeleton, ckpt["state_dict"])
    model = build_model(arch)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint weights do not match its arch: {_first_line(e)}") from e
    try:
        layers = ckpt.get("meprop", {}).get("layers") or {}
        if meprop is None:
            meprop = bool(layers)
        if meprop:
            cfg_dict = ckpt.get("meprop", {}).get("config")
            config = MePropConfig.from_dict(cfg_dict) if cfg_dict else MePropConfig()
            names = set(layers) or None
            meprop_(model, config, filter_fn=(lambda n, m: n in names) if names else None)
            for name, mod in list(model.named_modules()):
                if isinstance(mod, nn.LSTM) and name in layers:
                    # MePropLSTM has nn.LSTM's parameter names: swap it in by name
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, MePropLSTM.from_lstm(mod, config))
            for name, mod in model.named_modules():
                if isinstance(mod, MePropCounters) and name in layers:
                    mod.load_meprop_state(layers[name])
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        # "meprop"/"config"/"layers" not dicts (AttributeError, TypeError), a bad config
        # value (BadInputError is a ValueError), counters or masks of the wrong shape or
        # type (RuntimeError from copy_).
        raise CheckpointError(f"checkpoint 'meprop' state is malformed: {_first_line(e)}") from e
    if isinstance(model, CNN) and any(
        isinstance(m, MePropCounters) and m.active_width < m.mask.numel() for m in model.modules()
    ):
        # the readers of a masked group mask their inputs too (mesimp.simplify.masking)
        from mesimp.simplify.graph_shrink import restore_masks

        restore_masks(model, torch.zeros(2, model.config.in_features))
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _check_weight_shapes(skeleton: nn.Module, state_dict: dict[str, Any]) -> None:
    """``state_dict`` has exactly ``skeleton``'s keys and shapes (skeleton is on "meta")."""
    want = skeleton.state_dict()
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not match its arch: missing keys {missing[:4]!r}, "
            f"unexpected keys {unexpected[:4]!r}"[:300]
        )
    for key, ref in want.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            what = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(
                f"checkpoint weights do not match its arch: {key} is {what}, "
                f"the arch needs {list(ref.shape)}"
            )
