"""Training LSTM models (tagger, row classifier) with meProp, meSimp, and the shrink.

    data = tagging_data("train.conllu", "test.conllu")
    result = train_lstm(data, hidden=500, k=20,
                        simplify=SimplifyConfig(prune_rate=0.01, points_per_epoch=2))
    small = shrink_lstm_model(result["model"])   # plain model at the kept widths

The loop mirrors ``mesimp.train`` for MLPs: minibatch Adam, meSimp points from
``SimplifySchedule`` (cycles alternate simplifying and plain meProp; the optimizer state
and the counters are reset at each cycle start), evaluation once per epoch on the
held-out split, and the best held-out model is kept. Adam is torch's dense Adam:
``MePropLSTM``'s weight gradients are dense tensors whose unselected rows are zero, so
the row-sparse optimizer path of ``mesimp.optim`` does not apply.

The checkpoint written holds the best model as trained: full widths, ``MePropLSTM``
counters and masks in its ``meprop`` section (``arch`` = the config fields, plus the
vocabularies for a tagger), as for MLPs; ``mesimp shrink`` (``shrink_checkpoint``)
removes the masked units and verifies the result. Interrupted LSTM runs are not
resumable (the MLP trainer's ``--resume`` machinery is not wired in here).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.data.sequences import SeqData
from mesimp.errors import BadInputError
from mesimp.files.atomic import atomic_write_text, check_writable
from mesimp.files.checkpoint import make_checkpoint, save_checkpoint
from mesimp.models import (
    RowLSTMConfig,
    TaggerConfig,
    build_model,
    count_macs,
    count_params,
    lstm_stack,
)
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.progress import bar as progress_bar
from mesimp.simplify.checkpoint_shrink import shrink_lstm_model
from mesimp.simplify.rule import (
    SimplifyConfig,
    active_widths,
)
from mesimp.simplify.simplifier import Simplifier
from mesimp.training.loop import TrainingDiverged, metrics_path, seed_everything
from mesimp.training.optim import build_optimizer
from mesimp.training.runsafety import nonfinite_grad

__all__ = ["meprop_lstms_", "shrink_lstm_model", "train_lstm"]  # shrink_lstm_model: re-export


def meprop_lstms_(model: nn.Module, config: MePropConfig) -> nn.Module:
    """In place: swap every ``nn.LSTM`` of ``model.stack`` for a ``MePropLSTM`` with a copy
    of its parameters (same names and layout, so the state_dict keys do not change)."""
    lstms = lstm_stack(model)
    for i, lstm in enumerate(lstms):
        if isinstance(lstm, MePropLSTM):
            continue
        if not isinstance(lstm, nn.LSTM):
            raise BadInputError(f"meprop_lstms_: layer {i} is a {type(lstm).__name__}")
        new = MePropLSTM.from_lstm(lstm, config)
        new.train(lstm.training)
        lstms[i] = new
    return model


def _check(hidden: list[int], k: int | float, simplify: SimplifyConfig | None, **kw: Any) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"{name} must be an integer > 0, got {v!r}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0:
        raise BadInputError(f"k must be >= 0 (0 = dense backprop), got {k!r}")
    if isinstance(k, int) and k > max(hidden):
        raise BadInputError(f"k={k} is larger than every hidden width {hidden}")
    if simplify is not None and k == 0:
        raise BadInputError("meSimp (simplify) needs meProp: give k > 0")


def train_lstm(
    data: SeqData,
    *,
    hidden: int | list[int] = 500,
    emb_dim: int = 100,
    dropout: float = 0.0,
    k: int | float = 0,
    selection: str = "unified",
    simplify: SimplifyConfig | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 1,
    output: str | Path | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Train an LSTM model on ``data``; keep the best held-out model; report test accuracy.

    ``k > 0`` trains ``MePropLSTM`` layers (unit-level top-k backward with ``selection``);
    ``simplify`` adds meSimp masking. The best model is the best held-out evaluation at
    the *current* widths (a new architecture starts a fresh best, as in ``mesimp.train``);
    its weights are in ``result["module"]`` (masked, meProp layers) on return and its
    shrunk plain copy in ``result["shrunk"]``; with ``output`` the masked model is saved
    with its counters and masks (``mesimp shrink`` turns it into the plain one).
    """
    widths = hidden if isinstance(hidden, list) else [hidden]
    _check(widths, k, simplify, epochs=epochs, batch_size=batch_size, emb_dim=emb_dim)
    mcfg = MePropConfig(k=k, selection=selection)  # validates selection early
    out = check_writable(output) if output is not None else None
    seed_everything(seed)
    if data.kind == "tagging":
        config: TaggerConfig | RowLSTMConfig = TaggerConfig(
            data.arch["vocab_size"], data.arch["num_tags"], emb_dim, widths, dropout
        )
    else:
        config = RowLSTMConfig(data.arch["in_features"], data.arch["num_classes"], widths, dropout)
    model = build_model(config)
    if k > 0:
        meprop_lstms_(model, mcfg)
    model.train()
    optimizer = build_optimizer("adam", model.parameters(), lr, sparse_update=False)
    named = list(model.named_parameters())
    n = len(data.x_train)
    if n == 0:
        raise BadInputError("no training examples")
    steps_per_epoch = math.ceil(n / batch_size)
    simplifier = (
        Simplifier(model, simplify, optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs)
        if simplify is not None
        else None
    )
    order_gen = torch.Generator().manual_seed(seed)
    records: list[dict[str, Any]] = [
        {"event": "start", "widths": active_widths(model), "data": data.summary}
    ]
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    train_time = 0.0
    gstep = 0
    t_start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        loss_sum = 0.0
        t0 = time.perf_counter()
        bar = progress_bar(
            range(steps_per_epoch),
            progress=progress,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
        )
        for s in bar:
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb, yb = data.batch(data.x_train[idx], data.y_train[idx])
            loss = data.loss(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gstep += 1
            lv = loss.item()
            if not math.isfinite(lv) or (gstep % 10 == 0 and nonfinite_grad(named)):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}, step {s + 1}: non-finite "
                    f"loss or gradient (try a smaller --lr)"
                )
            optimizer.step()
            loss_sum += lv
            if simplifier is not None:
                before = simplifier.widths
                records.extend(simplifier.step())
                if simplifier.widths != before:
                    best, best_state = None, None  # a new architecture: its best starts fresh
        train_time += time.perf_counter() - t0
        rec = {
            "event": "eval",
            "epoch": epoch + 1,
            "step": gstep,
            "train_loss": loss_sum / steps_per_epoch,
            "heldout_accuracy": data.accuracy(model, data.x_held, data.y_held),
            "test_accuracy": data.accuracy(model, data.x_test, data.y_test),
            "widths": active_widths(model),
            "train_time_s": train_time,
        }
        records.append(rec)
        score = rec["heldout_accuracy"]
        if math.isnan(score):
            score = -rec["train_loss"]
        if best is None or score > best["score"]:
            best = {"score": score, **rec}
            best_state = {name: v.detach().clone() for name, v in model.state_dict().items()}
        if progress is not False:  # the epoch line is a log line, bar or not
            print(
                f"epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f} "
                f"held-out {rec['heldout_accuracy']:.4f} test {rec['test_accuracy']:.4f} "
                f"widths {rec['widths']} ({train_time:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    if best is None or best_state is None:
        raise BadInputError("no epoch was trained")
    # the masks only shrink and a width change resets the best, so the current masks are
    # the best model's masks: loading its weights restores it exactly
    model.load_state_dict(best_state)
    plain = shrink_lstm_model(model)
    arch = {**model.config.to_dict()}
    if data.kind == "tagging":
        arch.update(word_vocab=data.arch["word_vocab"], tag_vocab=data.arch["tag_vocab"])
    last_rec = next(r for r in reversed(records) if r["event"] == "eval")
    run_config = {
        "model": data.model,
        "hidden": widths,
        "emb_dim": emb_dim,
        "dropout": dropout,
        "k": k,
        "selection": selection,
        "simplify": simplify.to_dict() if simplify is not None else None,
        "optimizer": "adam",
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
    }
    # The same names and meanings as mesimp.train's summary (one ``train --json``
    # schema for every model family; "dev" is the held-out part used to pick the best).
    result: dict[str, Any] = {
        "model": data.model,
        "hidden_sizes": widths,
        "active_widths": best["widths"],
        "params": count_params(model),
        "macs": count_macs(model),
        "best": {
            "epoch": best["epoch"],
            "step": best["step"],
            "dev_accuracy": best["heldout_accuracy"],
            "test_accuracy": best["test_accuracy"],
        },
        "final": {
            "dev_accuracy": last_rec["heldout_accuracy"],
            "test_accuracy": last_rec["test_accuracy"],
        },
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "optimizer_resets": simplifier.resets if simplifier is not None else 0,
        "config": run_config,
        "data": data.summary,
    }
    if out is not None:
        train_info = {
            **result,
            # "dev_accuracy" is the name `mesimp info` and the MLP checkpoints use
            "metrics": {
                "dev_accuracy": best["heldout_accuracy"],
                "heldout_accuracy": best["heldout_accuracy"],
                "test_accuracy": best["test_accuracy"],
            },
        }
        save_checkpoint(out, make_checkpoint(model, arch, mcfg if k else None, train=train_info))
        mlog = metrics_path(out)
        atomic_write_text(mlog, "".join(json.dumps(r) + "\n" for r in records))
    result["checkpoint"] = str(out) if out is not None else None
    result["metrics_log"] = str(mlog) if out is not None else None
    shrunk_arch = {**arch, **plain.config.to_dict()}
    # Python callers also get the modules, the records and the shrunk model's arch
    result.update(records=records, arch=shrunk_arch, module=model, shrunk=plain)
    return result
