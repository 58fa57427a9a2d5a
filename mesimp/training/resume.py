"""Resuming a run: finding its resume checkpoint and reconciling configs.

A resume checkpoint (``RUN.last.pt``) is an ordinary mesimp checkpoint of the current
weights plus a ``resume`` section: optimizer state, every RNG state, the data order and
the loop position, meProp counters/masks and MSBP memory, the best-so-far record and
the metrics records. The loop writes and reads that section (``mesimp.training.loop``);
this module finds the file, checks its version, and decides which config a resumed
run uses: the checkpoint's, with the runtime options (threads, save_every, keep_last, device)
free to change and any other disagreement refused in one line.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from mesimp.errors import BadInputError, CheckpointError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.training.config import RUNTIME_FIELDS, TrainConfig

# Layout version of a checkpoint's "resume" section (the checkpoint format stays 1).
RESUME_VERSION = 1


def resume_path(checkpoint: str | Path) -> Path:
    """The resume checkpoint that sits next to a checkpoint: ``RUN.pt`` -> ``RUN.last.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".last.pt")


def load_resume_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The resume checkpoint for ``path`` (``RUN.last.pt`` itself, or ``RUN.pt`` next to
    it), loaded and checked; returns ``(path, checkpoint)``."""
    p = Path(path)
    tried = [p]
    if p.is_file():
        ckpt = load_checkpoint(p)
        if "resume" in ckpt:
            return p, _check_resume_section(ckpt, p)
    q = resume_path(p)
    if q != p:
        tried.append(q)
        if q.is_file():
            ckpt = load_checkpoint(q)
            if "resume" in ckpt:
                return q, _check_resume_section(ckpt, q)
    if not p.exists() and not (q != p and q.exists()):
        raise CheckpointError(f"--resume {p}: no such file")
    raise CheckpointError(
        f"--resume {p}: no training state to resume from in {' or '.join(map(str, tried))} "
        "(only RUN.last.pt holds it, and a finished run removes it unless --keep-last)"
    )


def _check_resume_section(ckpt: dict[str, Any], where: Path) -> dict[str, Any]:
    r = ckpt["resume"]
    version = r.get("version") if isinstance(r, dict) else None
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: malformed resume section")
    if version > RESUME_VERSION:
        raise CheckpointError(
            f"{where}: resume state version {version} is newer than supported version "
            f"{RESUME_VERSION}; upgrade mesimp"
        )
    if not isinstance((ckpt.get("train") or {}).get("config"), dict):
        raise CheckpointError(f"{where}: resume checkpoint has no train config")
    return ckpt


# CLI option name -> how to read it from a TrainConfig (for conflict messages).
_SIMPLIFY_OPTIONS = {
    "prune_rate": "prune_rate",
    "simplify_per_epoch": "points_per_epoch",
    "cycle_epochs": "cycle_epochs",
    "min_width": "min_width",
    "warmup_epochs": "warmup_epochs",
    "schedule": "schedule",
    "target": "target",
    "target_epoch": "target_epoch",
}


def _option_value(config: TrainConfig, option: str) -> Any:
    if option == "simplify":
        return config.simplify is not None
    if option in _SIMPLIFY_OPTIONS:
        return getattr(config.simplify, _SIMPLIFY_OPTIONS[option]) if config.simplify else None
    if option not in {f.name for f in fields(TrainConfig)}:
        raise BadInputError(f"--resume: unknown option {option!r}")
    return (
        _as_hidden_list(getattr(config, option)) if option == "hidden" else getattr(config, option)
    )


def _as_hidden_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resume_config(path: str | Path, given: dict[str, Any] | None = None) -> TrainConfig:
    """The config a resumed run uses: the checkpoint's.

    ``given`` holds the options the user set explicitly (CLI option names with
    underscores: ``epochs``, ``hidden``, ``simplify``, ``prune_rate``, ...). Runtime
    options (``threads``, ``save_every``, ``keep_last``, ``device``) replace the saved ones; any
    other option that disagrees with the checkpoint is refused with one line.
    """
    where, ckpt = load_resume_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["train"]["config"])
    conflicts = []
    for option, value in (given or {}).items():
        if option in RUNTIME_FIELDS:
            setattr(config, option, value)
            continue
        have = _option_value(config, option)
        want = _as_hidden_list(value) if option == "hidden" else value
        if have != want:
            conflicts.append(f"--{option.replace('_', '-')} {want} (the run has {have})")
    if conflicts:
        raise BadInputError(
            f"--resume {where}: {', '.join(conflicts)}; a resumed run keeps its checkpoint's "
            "config, so drop these options"
        )
    config.__post_init__()
    return config


def config_conflicts(config: TrainConfig, saved: TrainConfig) -> list[str]:
    a, b = config.to_dict(), saved.to_dict()
    for d, c in ((a, config), (b, saved)):
        d["hidden"] = c.hidden_sizes()
        d.pop("layers")
    return [
        f"{k}={a[k]!r} (the run has {b[k]!r})"
        for k in a
        if k not in RUNTIME_FIELDS and a[k] != b[k]
    ]
