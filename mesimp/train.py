"""Training loop: meProp MLPs on image data, with optional meSimp simplification.

One ``TrainConfig`` in, one checkpoint (best on dev) and one JSONL metrics log out.
Deterministic for a seed on CPU: the data order comes from its own seeded
generator, and random-k draws from the seeded global RNG.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mesimp.atomic import atomic_write_text, check_writable
from mesimp.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from mesimp.data import load_image_dataset
from mesimp.errors import BadInputError
from mesimp.layers import MePropLinear, meprop_
from mesimp.meprop import MePropConfig
from mesimp.models import MLPConfig, build_model, count_macs, count_params, hidden_sizes
from mesimp.optim import build_optimizer, reset_optimizer_state
from mesimp.simplify import (
    SimplifyConfig,
    SimplifySchedule,
    active_widths,
    prunable_layers,
    simplify_step,
)


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in the checkpoint under ``train.config``."""

    data: str | None = None
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

    def __post_init__(self) -> None:
        widths = self.hidden if isinstance(self.hidden, list) else [self.hidden]
        if not widths or any(h <= 0 for h in widths):
            raise BadInputError(f"--hidden must be > 0, got {self.hidden}")
        if self.layers < 0:
            raise BadInputError(f"--layers must be >= 0, got {self.layers}")
        for name in ("epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be > 0")
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


def metrics_path(checkpoint: str | Path) -> Path:
    """The JSONL metrics log that sits next to a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".metrics.jsonl")


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
            if isinstance(mod, MePropLinear) and name in layers_state:
                mod.apply_mask(layers_state[name]["mask"])
    return model, arch


def train(
    config: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, keep the best-on-dev checkpoint, write the metrics log; return a summary.

    With meSimp on, "best" is taken among evaluations at the current widths: the
    record resets whenever a simplification point changes a width, so the saved
    model is the best one of the final (smallest) architecture.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if config.threads:
        torch.set_num_threads(config.threads)
    out = check_writable(config.output)  # before the data: fail fast on a bad -o
    mlog = check_writable(metrics_path(out))
    data = load_image_dataset(config.data, dev_size=config.dev_size)
    seed_everything(config.seed)
    model, arch = _build(config, data.x_train.shape[1], data.num_classes)
    model.train()
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), config.lr, sparse_update=config.sparse_update
    )
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    evals = {
        math.ceil((i + 1) * steps_per_epoch / config.evals_per_epoch)
        for i in range(min(config.evals_per_epoch, steps_per_epoch))
    }
    schedule = (
        SimplifySchedule(config.simplify, steps_per_epoch) if config.simplify is not None else None
    )
    order_gen = torch.Generator().manual_seed(config.seed)
    records: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    last_eval: dict[str, Any] = {}
    best_widths: list[int] | None = None
    t0 = time.perf_counter()
    train_time = 0.0
    global_step = 0
    resets = 0

    def write_log() -> None:
        atomic_write_text(mlog, "".join(json.dumps(r) + "\n" for r in records))

    for epoch in range(config.epochs):
        if schedule is not None and schedule.cycle_starts(epoch):
            reset_optimizer_state(optimizer)
            resets += 1
            for _, layer in prunable_layers(model):
                layer.reset_counters()
            records.append(
                {
                    "event": "cycle_start",
                    "epoch": epoch,
                    "step": global_step,
                    "simplifying": schedule.is_simplifying(epoch),
                }
            )
        perm = torch.randperm(n, generator=order_gen)
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            file=sys.stderr,
            leave=False,
            unit="step",
        )
        t_epoch = time.perf_counter()
        loss_sum = 0.0
        for s in bar:
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            loss_sum += loss.item()
            step = s + 1
            if schedule is not None and schedule.is_point(epoch, step):
                before = active_widths(model)
                widths = simplify_step(model, config.simplify.prune_rate, config.simplify.min_width)
                records.append(
                    {"event": "simplify", "epoch": epoch, "step": global_step, "widths": widths}
                )
                if widths != before:
                    best = None  # a new architecture: its best starts fresh
            if step in evals:
                train_time += time.perf_counter() - t_epoch
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
                    ckpt = make_checkpoint(
                        model,
                        arch,
                        _meprop_cfg(model),
                        train={
                            "config": config.to_dict(),
                            "epoch": rec["epoch"],
                            "step": global_step,
                            "seed": config.seed,
                            "data": data.summary(),
                            "metrics": {
                                k: rec[k] for k in ("dev_accuracy", "test_accuracy", "train_loss")
                            },
                            "optimizer_resets": resets,
                        },
                    )
                    save_checkpoint(out, ckpt)
                write_log()
                bar.set_postfix(loss=f"{rec['train_loss']:.4f}", dev=f"{rec['dev_accuracy']:.4f}")
                t_epoch = time.perf_counter()
        train_time += time.perf_counter() - t_epoch
        bar.close()
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {last_eval['train_loss']:.4f} "
            f"dev {last_eval['dev_accuracy']:.4f} test {last_eval['test_accuracy']:.4f} "
            f"widths {last_eval['widths']}"
        )
    write_log()
    return {
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
        "optimizer_resets": resets,
        "config": config.to_dict(),
    }


def _meprop_cfg(model: nn.Module) -> MePropConfig | None:
    for mod in model.modules():
        if isinstance(mod, MePropLinear):
            return mod.meprop_config
    return None
