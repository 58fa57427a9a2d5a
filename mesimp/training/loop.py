"""Training loop: meProp MLPs on image data, with optional meSimp simplification.

One ``TrainConfig`` in, one checkpoint (best on dev) and one JSONL metrics log out.
Deterministic for a seed on CPU: the data order comes from its own seeded
generator, and random-k draws from the seeded global RNG.

Crash safety (see README, "Resume and crash safety"):

* every ``save_every`` steps, at every evaluation and on SIGINT/SIGTERM the loop
  writes a *resume checkpoint* ``RUN.last.pt`` next to ``RUN.pt`` (atomically). It is
  an ordinary mesimp checkpoint of the *current* weights plus a ``resume`` section:
  optimizer state, every RNG state, the data order and the loop position, meProp
  counters/masks and MSBP memory, the best-so-far record and the metrics records.
  ``train(..., resume=path)`` continues from it and reproduces the uninterrupted
  run bit for bit on CPU (same machine and thread count).
* SIGINT/SIGTERM finish the current step, write ``RUN.last.pt`` and raise
  ``TrainingInterrupted`` (CLI exit 130/143).
* A NaN/Inf loss or gradient stops training *before* the optimizer step, naming
  the epoch and step; ``save_checkpoint`` refuses non-finite tensors, so the last
  good checkpoints are never overwritten by a diverged model.
* ``RUN.last.pt`` is removed when the run finishes (``keep_last`` keeps it).
* One process per output (an advisory lock), so a resume cannot race the run it
  resumes; temp files a ``kill -9`` left behind are removed at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.data import load_image_dataset
from mesimp.errors import BadInputError, CheckpointError, MesimpError
from mesimp.files.atomic import atomic_write_text, check_writable
from mesimp.files.checkpoint import (
    NonFiniteError,
    first_nonfinite,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from mesimp.models import CNNConfig, MLPConfig, build_model, count_macs, count_params, hidden_sizes
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.progress import bar as progress_bar
from mesimp.simplify.rule import (
    SimplifyConfig,
    active_widths,
)
from mesimp.simplify.simplifier import Simplifier
from mesimp.training.optim import build_optimizer
from mesimp.training.runsafety import (
    StopSignals,
    nonfinite_grad,
    remove_stale_temp_files,
    rng_state,
    run_lock,
    set_rng_state,
)

IMAGE_MODELS = ("mlp", "cnn")  # the families this loop trains on image data

# Fields that change how a run is executed, not what it computes: a resumed run may
# set them anew. (Bit-identity across a resume still needs the same thread count.)
RUNTIME_FIELDS = frozenset({"threads", "save_every", "keep_last"})
# Layout version of a checkpoint's "resume" section (the checkpoint format stays 1).
RESUME_VERSION = 1
# The loss is checked every step (free: its .item() is needed anyway). The gradients
# are checked every GRAD_CHECK_EVERY steps: one check costs ~15 us, 1.4% of a 1.3 ms
# meProp step (784-500-500-10, k=20, 1 thread). In between, a NaN gradient makes NaN
# weights and so a NaN loss one step later, and saves check the weights themselves.
GRAD_CHECK_EVERY = 10


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint under ``train.config``."""

    data: str | None = None
    model: str = "mlp"  # "mlp" or "cnn" (hidden: the channels of each conv block)
    hidden: int | list[int] = 500  # one width for every layer, or a width per layer
    layers: int = 2
    dropout: float = 0.0
    k: int | float = 0
    selection: str = "unified"
    msbp: float = 0.0
    sparse_update: bool = True
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 50
    seed: int = 1
    evals_per_epoch: int = 1
    dev_size: int = 5000
    output: str = "models/mlp.pt"
    init: str | None = None
    simplify: SimplifyConfig | None = None
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Write RUN.last.pt every N optimizer steps (and at every evaluation); 0 = only at
    # evaluations and on SIGINT/SIGTERM. One write of the default 784-500-500-10 model
    # (8.3 MB with Adam's moments) takes 12-25 ms here (serialize, fsync, rename): about
    # 1% of 1000 steps of the fastest configuration (unified k=20, 1.3-1.7 ms a step).
    save_every: int = 1000
    keep_last: bool = False  # keep RUN.last.pt (final weights + optimizer) after the run

    def __post_init__(self) -> None:
        widths = self.hidden if isinstance(self.hidden, list) else [self.hidden]
        if not widths or any(h <= 0 for h in widths):
            raise BadInputError(f"--hidden must be > 0, got {self.hidden}")
        if self.layers < 0:
            raise BadInputError(f"--layers must be >= 0, got {self.layers}")
        if self.model not in IMAGE_MODELS:
            raise BadInputError(
                f"--model must be one of {', '.join(IMAGE_MODELS)}, got {self.model!r}"
            )
        if self.model == "cnn" and (not self.hidden_sizes() or self.dropout):
            raise BadInputError("a CNN needs at least one block (--layers >= 1) and no --dropout")
        for name in ("epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be > 0")
        if self.save_every < 0:
            raise BadInputError(f"--save-every must be >= 0, got {self.save_every}")
        self.meprop_config()  # validates k, selection, msbp
        if self.simplify is not None and self.k == 0:
            raise BadInputError("--simplify needs meProp counts: set --k > 0 (e.g. --k 60)")

    def hidden_sizes(self) -> list[int]:
        if isinstance(self.hidden, list):
            return list(self.hidden)
        return [self.hidden] * self.layers

    def meprop_config(self) -> MePropConfig:
        return MePropConfig(
            k=self.k, selection=self.selection, msbp_alpha=self.msbp, sparse_grad=self.sparse_update
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["simplify"] = self.simplify.to_dict() if self.simplify else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; unknown keys are ignored, missing ones defaulted
        (checkpoints written before a field existed still load)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        simp = kw.get("simplify")
        if isinstance(simp, dict):
            sknown = {f.name for f in fields(SimplifyConfig)}
            kw["simplify"] = SimplifyConfig(**{k: v for k, v in simp.items() if k in sknown})
        try:
            return cls(**kw)
        except TypeError as e:
            raise CheckpointError(f"checkpoint holds a malformed train config: {e}") from e


class TrainingInterrupted(MesimpError):
    """SIGINT/SIGTERM stopped training after a complete step; RUN.last.pt holds it.

    ``exit_code`` is the shell's convention, 128 + signal number (130, 143).
    """

    def __init__(self, message: str, signum: int, resume_path: Path) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.resume_path = resume_path


class TrainingDiverged(NonFiniteError):
    """The loss or a gradient became NaN/Inf; nothing from that step on was saved."""


def metrics_path(checkpoint: str | Path) -> Path:
    """The JSONL metrics log that sits next to a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".metrics.jsonl")


def resume_path(checkpoint: str | Path) -> Path:
    """The resume checkpoint that sits next to a checkpoint: ``RUN.pt`` -> ``RUN.last.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".last.pt")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    """Accuracy of ``model`` on ``(x, y)``; NaN for an empty split."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / len(y)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# resume: finding the checkpoint, reconciling configs
# --------------------------------------------------------------------------------------
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
    options (``threads``, ``save_every``, ``keep_last``) replace the saved ones; any
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


def _config_conflicts(config: TrainConfig, saved: TrainConfig) -> list[str]:
    a, b = config.to_dict(), saved.to_dict()
    for d, c in ((a, config), (b, saved)):
        d["hidden"] = c.hidden_sizes()
        d.pop("layers")
    return [
        f"{k}={a[k]!r} (the run has {b[k]!r})"
        for k in a
        if k not in RUNTIME_FIELDS and a[k] != b[k]
    ]


def _data_fingerprint(data) -> str:
    """Cheap identity of the data: all labels and a strided sample of training images."""
    h = hashlib.sha256()
    for t in (data.y_train, data.y_dev, data.y_test):
        h.update(t.numpy().tobytes())
    step = max(1, len(data.x_train) // 64)
    h.update(data.x_train[::step].numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# building the model
# --------------------------------------------------------------------------------------
def _build(config: TrainConfig, in_features: int, num_classes: int) -> tuple[nn.Module, dict]:
    if config.init:
        src = load_checkpoint(config.init)
        arch = dict(src["arch"])
        model = build_model(arch)
        model.load_state_dict(src["state_dict"])
        if arch.get("in_features") != in_features or arch.get("out_features") != num_classes:
            raise BadInputError(
                f"--init model expects {arch.get('in_features')} inputs/"
                f"{arch.get('out_features')} classes, data has {in_features}/{num_classes}"
            )
        layers_state = src["meprop"].get("layers") or {}
    elif config.model == "cnn":
        arch = CNNConfig(in_features, config.hidden_sizes(), num_classes).to_dict()
        model = build_model(arch)
        layers_state = {}
    else:
        arch = MLPConfig(
            in_features=in_features,
            hidden_sizes=config.hidden_sizes(),
            out_features=num_classes,
            dropout=config.dropout,
        ).to_dict()
        model = build_model(arch)
        layers_state = {}
    mcfg = config.meprop_config()
    if mcfg.k != 0 or config.simplify is not None or layers_state:
        meprop_(model, mcfg)
        for name, mod in model.named_modules():
            if isinstance(mod, MePropCounters) and name in layers_state:
                mod.apply_mask(layers_state[name]["mask"])
    return model, arch


def _build_resumed(config: TrainConfig, ckpt: dict[str, Any]) -> tuple[nn.Module, dict]:
    """The model of a resume checkpoint: weights, masks, counters and MSBP memory.

    Built from the checkpoint's own ``arch`` (the ``--init`` file is not needed any
    more); it has ``MePropLinear`` layers exactly when the interrupted run had them.
    """
    arch = dict(ckpt["arch"])
    model = build_model(arch)
    model.load_state_dict(ckpt["state_dict"])
    layers_state = ckpt["meprop"].get("layers") or {}
    memory = ckpt["resume"].get("msbp_memory") or {}
    if layers_state:
        meprop_(model, config.meprop_config())
        for name, mod in model.named_modules():
            if isinstance(mod, MePropCounters) and name in layers_state:
                mod.load_meprop_state(layers_state[name])
                mod._state.memory = memory.get(name)
    return model, arch


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def train(
    config: TrainConfig | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    *,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train, keep the best-on-dev checkpoint, write the metrics log; return a summary.

    With meSimp on, "best" is taken among evaluations at the current widths: the
    record resets whenever a simplification point changes a width, so the saved
    model is the best one of the final (smallest) architecture.

    ``resume``: a resume checkpoint (``RUN.last.pt``, or ``RUN.pt`` next to it) to
    continue from. Its config is used; a ``config`` given as well must agree with it
    except for the runtime fields (``threads``, ``save_every``, ``keep_last``).

    Raises ``TrainingInterrupted`` on SIGINT/SIGTERM (after writing RUN.last.pt) and
    ``TrainingDiverged`` on a NaN/Inf loss or gradient.
    """
    stop = StopSignals()
    log = log or (lambda m: print(m, file=sys.stderr))
    # signals from the start, so that a signal during set-up is graceful too; the
    # ExitStack releases the run lock however _train ends
    with stop.installed(), contextlib.ExitStack() as on_exit:
        return _train(config, progress, log, resume, stop, on_exit)


def _train(
    config: TrainConfig | None,
    progress: bool | None,
    log: Callable[[str], None],
    resume: str | Path | None,
    stop: StopSignals,
    on_exit: contextlib.ExitStack,
) -> dict[str, Any]:
    rckpt: dict[str, Any] | None = None
    if resume is not None:
        rwhere, rckpt = load_resume_checkpoint(resume)
        saved = TrainConfig.from_dict(rckpt["train"]["config"])
        if config is None:
            config = saved
        else:
            conflicts = _config_conflicts(config, saved)
            if conflicts:
                raise BadInputError(
                    f"resume {rwhere}: the config disagrees with the checkpoint's: "
                    f"{', '.join(conflicts)}"
                )
    elif config is None:
        raise BadInputError("train() needs a TrainConfig or resume=RUN.last.pt")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = check_writable(config.output)  # before the data: fail fast on a bad -o
    mlog = check_writable(metrics_path(out))
    last = check_writable(resume_path(out))
    on_exit.enter_context(run_lock(out))
    data = load_image_dataset(config.data, dev_size=config.dev_size)
    fingerprint = _data_fingerprint(data)
    if rckpt is not None and rckpt["resume"].get("data_fingerprint") != fingerprint:
        raise BadInputError(
            f"resume {rwhere}: the data at {data.source} differs from the run's "
            f"({rckpt['train'].get('data')})"
        )
    if rckpt is None and last.exists():
        log(f"note: {last} (an unfinished run's state) will be replaced by this run's")
    remove_stale_temp_files(out, mlog, last)
    seed_everything(config.seed)
    if rckpt is None:
        model, arch = _build(config, data.x_train.shape[1], data.num_classes)
    else:
        model, arch = _build_resumed(config, rckpt)
    model.train()
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), config.lr, sparse_update=config.sparse_update
    )
    named_params = list(model.named_parameters())
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    evals = {
        math.ceil((i + 1) * steps_per_epoch / config.evals_per_epoch)
        for i in range(min(config.evals_per_epoch, steps_per_epoch))
    }
    simplifier = (
        Simplifier(
            model,
            config.simplify,
            optimizer,
            steps_per_epoch=steps_per_epoch,
            epochs=config.epochs,
            # a CNN's removable channels (and the BatchNorms to mask) come from its graph
            example_inputs=data.x_train[:2] if arch.get("model") == "cnn" else None,
        )
        if config.simplify is not None
        else None
    )
    order_gen = torch.Generator().manual_seed(config.seed)
    records: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    last_eval: dict[str, Any] = {}
    best_widths: list[int] | None = None
    t0 = time.perf_counter()
    train_time = 0.0
    global_step = 0
    start_epoch, start_step = 0, 0  # the next step to run is step start_step + 1
    perm: torch.Tensor | None = None
    loss_sum = 0.0
    last_saved: tuple[int, int] | None = None  # (epoch, step) in RUN.last.pt from this run

    if rckpt is not None:
        r = rckpt["resume"]
        try:
            optimizer.load_state_dict(r["optimizer"])
            order_gen.set_state(r["order_gen"])
            set_rng_state(r["rng"])
            records, best, last_eval = list(r["records"]), r["best"], dict(r["last_eval"])
            best_widths = r["best_widths"]
            if simplifier is not None:  # its progress is (global step, resets done)
                simplifier.steps, simplifier.resets = r["global_step"], r["optimizer_resets"]
            train_time, global_step, loss_sum = r["train_time_s"], r["global_step"], r["loss_sum"]
            start_epoch, start_step, perm = r["epoch"], r["step"], r["perm"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{rwhere}: malformed resume section ({e})") from e
        if r.get("steps_per_epoch") != steps_per_epoch:
            raise BadInputError(
                f"resume {rwhere}: the run had {r.get('steps_per_epoch')} steps "
                f"per epoch, this data and batch size give {steps_per_epoch}"
            )
        last_saved = (start_epoch, start_step)
        if start_step >= steps_per_epoch:  # saved at the end of an epoch
            start_epoch, start_step, perm, loss_sum = start_epoch + 1, 0, None, 0.0

    def write_log() -> None:
        atomic_write_text(mlog, "".join(json.dumps(r) + "\n" for r in records))

    def checkpoint_now(epoch_float: float, metrics: dict[str, Any]) -> dict[str, Any]:
        """The model as a checkpoint, with the run's metadata (best and resume alike)."""
        return make_checkpoint(
            model,
            arch,
            _meprop_cfg(model),
            train={
                "config": config.to_dict(),
                "epoch": epoch_float,
                "step": global_step,
                "seed": config.seed,
                "data": data.summary(),
                "metrics": {
                    k: metrics[k]
                    for k in ("dev_accuracy", "test_accuracy", "train_loss")
                    if k in metrics
                },
                "optimizer_resets": simplifier.resets if simplifier is not None else 0,
            },
        )

    def save_resume(epoch: int, step: int, complete: bool = False) -> None:
        nonlocal last_saved
        ckpt = checkpoint_now(epoch + step / steps_per_epoch, last_eval)
        ckpt["resume"] = {
            "version": RESUME_VERSION,
            "epoch": epoch,  # 0-based epoch in progress ...
            "step": step,  # ... and the steps of it that are done
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "complete": complete,
            "perm": perm,  # this epoch's data order
            "order_gen": order_gen.get_state(),
            "rng": rng_state(),
            "optimizer": optimizer.state_dict(),
            "msbp_memory": {
                name: mod._state.memory
                for name, mod in model.named_modules()
                if isinstance(mod, MePropCounters)
            },
            # the simplify schedule is a pure function of (epoch, step): no state of its own
            "loss_sum": loss_sum,
            "records": records,
            "best": best,
            "last_eval": last_eval,
            "best_widths": best_widths,
            "optimizer_resets": simplifier.resets if simplifier is not None else 0,
            "train_time_s": train_time,
            "data_fingerprint": fingerprint,
        }
        save_checkpoint(last, ckpt)
        last_saved = (epoch, step)

    def evaluate_and_save(epoch: int, step: int, is_eval: bool, final: bool) -> None:
        """At an evaluation: evaluate, keep the best, rewrite the log; then RUN.last.pt."""
        nonlocal last_eval, best, best_widths
        if is_eval:
            rec = {
                "event": "eval",
                "epoch": epoch + step / steps_per_epoch,
                "step": global_step,
                "train_loss": loss_sum / step,
                "dev_accuracy": evaluate(model, data.x_dev, data.y_dev),
                "test_accuracy": evaluate(model, data.x_test, data.y_test),
                "widths": active_widths(model),
                "elapsed_s": train_time,
            }
            records.append(rec)
            last_eval = rec
            score = rec["dev_accuracy"] if len(data.y_dev) else -rec["train_loss"]
            if best is None or score > best["score"]:
                best = {"score": score, **rec}
                best_widths = rec["widths"]
                save_checkpoint(out, checkpoint_now(rec["epoch"], rec))
            write_log()
            bar.set_postfix(loss=f"{rec['train_loss']:.4f}", dev=f"{rec['dev_accuracy']:.4f}")
        if not final or config.keep_last:
            # the end of a run needs no resume state: the file is removed below
            save_resume(epoch, step, complete=final)

    def where(epoch: int, step: int) -> str:
        return f"epoch {epoch + 1} step {step}"

    def diverged(what: str, epoch: int, step: int, gstep: int) -> TrainingDiverged:
        # best_widths is set once this run (or the run it resumes) wrote its best checkpoint
        kept = [f"{out} (best on dev)"] if best_widths is not None and out.exists() else []
        if last_saved is not None and last.exists():
            kept.append(f"{last} ({where(*last_saved)})")
        write_log()
        return TrainingDiverged(
            f"training diverged: {what} at {where(epoch, step)} (global step {gstep}); "
            f"nothing from this step on was saved; kept {', '.join(kept) or 'no checkpoint yet'}; "
            "try a lower --lr"
        )

    if not records:  # a fresh run: the widths at step 0, so plots start at the full width
        records.append({"event": "start", "epoch": 0, "step": 0, "widths": active_widths(model)})
    for epoch in range(start_epoch, config.epochs):
        if start_step == 0:
            perm = torch.randperm(n, generator=order_gen)
            loss_sum = 0.0
        bar = progress_bar(
            range(start_step, steps_per_epoch),
            progress=progress,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            initial=start_step,
            total=steps_per_epoch,
            unit="step",
        )
        start_step = 0
        t_epoch = time.perf_counter()
        for s in bar:
            step = s + 1
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                bar.close()
                raise diverged(f"loss is {loss_value}", epoch, step, global_step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            check = (global_step + 1) % GRAD_CHECK_EVERY == 0
            bad = nonfinite_grad(named_params) if check else None
            if bad is not None:
                bar.close()
                raise diverged(f"the gradient of {bad} holds NaN/Inf", epoch, step, global_step + 1)
            optimizer.step()
            global_step += 1
            loss_sum += loss_value
            if simplifier is not None:
                before = simplifier.widths
                records.extend(simplifier.step())
                if simplifier.widths != before:
                    best = None  # a new architecture: its best starts fresh
            final = epoch == config.epochs - 1 and step == steps_per_epoch
            is_eval = step in evals
            save = is_eval or stop.signum is not None
            save = save or (config.save_every > 0 and global_step % config.save_every == 0)
            if not save:
                continue
            train_time += time.perf_counter() - t_epoch
            # The loss and gradients were finite, but an update can still overflow: never
            # evaluate, log or save such weights (save_checkpoint would refuse them anyway).
            bad = first_nonfinite(dict(named_params))
            if bad is not None:
                bar.close()
                raise diverged(f"the update made {bad} NaN/Inf", epoch, step, global_step)
            try:
                evaluate_and_save(epoch, step, is_eval, final)
            except NonFiniteError as e:  # e.g. Adam's second moment overflowed
                bar.close()
                raise diverged(str(e), epoch, step, global_step) from e
            if stop.signum is not None and not final:
                write_log()
                bar.close()
                raise TrainingInterrupted(
                    f"interrupted by {stop.name} at {where(epoch, step)}; "
                    f"resume with: mesimp train --resume {last}",
                    stop.signum,
                    last,
                )
            t_epoch = time.perf_counter()
        train_time += time.perf_counter() - t_epoch
        bar.close()
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {last_eval['train_loss']:.4f} "
            f"dev {last_eval['dev_accuracy']:.4f} test {last_eval['test_accuracy']:.4f} "
            f"widths {last_eval['widths']}"
        )
    write_log()
    if not config.keep_last:
        last.unlink(missing_ok=True)
    return {
        "model": arch["model"],
        "checkpoint": str(out),
        "metrics_log": str(mlog),
        "hidden_sizes": hidden_sizes(model),
        "active_widths": best_widths,
        "params": count_params(model),
        "macs": count_macs(model),
        "best": {
            k: (best or last_eval)[k] for k in ("epoch", "step", "dev_accuracy", "test_accuracy")
        },
        "final": {k: last_eval[k] for k in ("dev_accuracy", "test_accuracy")},
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t0,
        "optimizer_resets": simplifier.resets if simplifier is not None else 0,
        "config": config.to_dict(),
        "data": data.summary(),
    }


def _meprop_cfg(model: nn.Module) -> MePropConfig | None:
    for mod in model.modules():
        if isinstance(mod, MePropLinear):
            return mod.meprop_config
    return None
