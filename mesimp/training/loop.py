"""The training loop: one for every task (MLP, CNN, LSTM tagger, row LSTM, a user's model).

One ``TrainConfig`` (and optionally a ``Task`` and a model) in; one checkpoint (best on
dev) and one JSONL metrics log out. The loop knows nothing about model families: the
task cuts batches and defines the loss and the accuracy (``mesimp.data.tasks``), the
model comes from ``mesimp.training.build``, meProp lives in the layers and meSimp in the
``Simplifier``. Deterministic for a seed on CPU: the data order comes from its own
seeded generator, and random-k draws from the seeded global RNG.

Crash safety (docs/resume.md, "Resume and crash safety"):

* every ``save_every`` steps, at every evaluation and on SIGINT/SIGTERM the loop
  writes a *resume checkpoint* ``RUN.last.pt`` next to ``RUN.pt`` (atomically), and
  ``train(..., resume=path)`` continues from it bit for bit on CPU (same machine and
  thread count);
* SIGINT/SIGTERM finish the current step, write ``RUN.last.pt`` and raise
  ``TrainingInterrupted`` (CLI exit 130/143);
* a NaN/Inf loss or gradient stops training *before* the optimizer step, naming the
  epoch and step; ``save_checkpoint`` refuses non-finite tensors, so the last good
  checkpoints are never overwritten by a diverged model;
* ``RUN.last.pt`` is removed when the run finishes (``keep_last`` keeps it);
* one process per output (an advisory lock), so a resume cannot race the run it
  resumes; temp files a ``kill -9`` left behind are removed at the next start.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mesimp.data.tasks import Task
from mesimp.data.tasks import classification_accuracy as evaluate
from mesimp.errors import BadInputError, CheckpointError
from mesimp.files.atomic import atomic_write_text, check_writable
from mesimp.files.checkpoint import (
    NonFiniteError,
    first_nonfinite,
    make_checkpoint,
    save_checkpoint,
)
from mesimp.models import arch_at_widths, arch_from_dict, count_macs, count_params, hidden_sizes
from mesimp.nn import kernels
from mesimp.nn.fused import fused_train_step
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.nn.lstm import MePropLSTM, lstm_op_built
from mesimp.nn.swap import meprop_
from mesimp.progress import bar as progress_bar
from mesimp.simplify.compact import replay_
from mesimp.simplify.reference_schedule import ReferenceSimplifier
from mesimp.simplify.rule import active_widths
from mesimp.simplify.simplifier import Simplifier
from mesimp.training.build import build, load_task, rebuild, restore_meprop
from mesimp.training.config import CUSTOM, RUNTIME_FIELDS, TrainConfig
from mesimp.training.distill import kd_loss, load_teacher
from mesimp.training.distributed import (
    Distributed,
    check_same_masks,
    rank_state,
    restore_rank_state,
)
from mesimp.training.optim import build_optimizer
from mesimp.training.reference import ReferenceAdam, chunk_ends, chunked_batches
from mesimp.training.resume import (
    RESUME_VERSION,
    config_conflicts,
    load_resume_checkpoint,
    resume_config,
    resume_path,
)
from mesimp.training.runsafety import (
    StopSignals,
    TrainingDiverged,
    TrainingInterrupted,
    nonfinite_grad,
    remove_stale_temp_files,
    rng_state,
    run_lock,
    set_rng_state,
)

__all__ = [
    "RUNTIME_FIELDS",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "metrics_path",
    "resume_config",
    "resume_path",
    "seed_everything",
    "train",
]

# The loss is checked every step (free: its .item() is needed anyway). The gradients
# are checked every GRAD_CHECK_EVERY steps: one check costs ~15 us, 1.4% of a 1.3 ms
# meProp step (784-500-500-10, k=20, 1 thread). In between, a NaN gradient makes NaN
# weights and so a NaN loss one step later, and saves check the weights themselves.
GRAD_CHECK_EVERY = 10
# Metrics a task's ``metrics`` may add to an evaluation, carried into the checkpoint and
# the summary (the parser's attachment scores).
_TASK_METRICS = ("dev_uas", "dev_las", "test_uas", "test_las")


def metrics_path(checkpoint: str | Path) -> Path:
    """The JSONL metrics log that sits next to a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".metrics.jsonl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    config: TrainConfig | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    *,
    resume: str | Path | None = None,
    task: Task | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Train, keep the best-on-dev checkpoint, write the metrics log; return a summary.

    ``task``: the data (default: the built-in family's, from ``config``). ``model``: a
    user's own module to train instead of a built-in family (``config.model`` is then
    ``"custom"``; its checkpoint holds the weights and meProp state, not a recipe to
    rebuild it, so resume it by passing the same model and task again).

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
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    device = config.device if config is not None else "auto"
    # signals from the start, so that a signal during set-up is graceful too; the
    # ExitStack releases the run lock and the process group however the run ends
    with stop.installed(), contextlib.ExitStack() as on_exit:
        ranks = Distributed.from_env(device)
        on_exit.callback(ranks.close)
        if not ranks.main:  # one writer of logs and files: rank 0
            log, progress = (lambda _m: None), False
        run = _Run(config, resume, task, model, progress, log, stop, on_exit, ranks)
        return run.fit()


def _resolve_config(
    config: TrainConfig | None, resume: str | Path | None, model: nn.Module | None
) -> tuple[TrainConfig, Path | None, dict[str, Any] | None]:
    """The run's config, and the resume checkpoint (path, dict) when resuming."""
    if resume is None:
        if config is None:
            raise BadInputError("train() needs a TrainConfig or resume=RUN.last.pt")
        if model is not None and config.model != CUSTOM:
            config.model = CUSTOM
        return config, None, None
    where, ckpt = load_resume_checkpoint(resume)
    saved = TrainConfig.from_dict(ckpt["train"]["config"])
    if config is None:
        return saved, where, ckpt
    conflicts = config_conflicts(config, saved)
    if conflicts:
        raise BadInputError(
            f"resume {where}: the config disagrees with the checkpoint's: {', '.join(conflicts)}"
        )
    return config, where, ckpt


class _Run:
    """One run's state: the model and optimizer, the loop position, the records.

    The methods are the loop's concepts: ``fit``/``_epoch`` (epochs and steps), ``_step``
    (one optimizer step and its guards), ``_checkpoint`` (at an evaluation or a save
    point), ``_evaluate`` (dev/test, best-so-far and its checkpoint), ``_save_resume``
    (RUN.last.pt) and ``_restore`` (resume). Under torchrun every rank runs the same
    methods in the same order (they hold collectives); only rank 0 writes.
    """

    def __init__(
        self,
        config: TrainConfig | None,
        resume: str | Path | None,
        task: Task | None,
        model: nn.Module | None,
        progress: bool | None,
        log: Callable[[str], None],
        stop: StopSignals,
        on_exit: contextlib.ExitStack,
        ranks: Distributed,
    ) -> None:
        self.config, self.rwhere, rckpt = _resolve_config(config, resume, model)
        config = self.config
        self.progress, self.log, self.stop, self.ranks = progress, log, stop, ranks
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.output)
        self.mlog, self.last = metrics_path(self.out), resume_path(self.out)
        if ranks.main:  # before the data: fail fast on a bad -o
            for path in (self.out, self.mlog, self.last):
                check_writable(path)
            on_exit.enter_context(run_lock(self.out))
        self.task = (task if task is not None else load_task(config)).to(ranks.device)
        if len(self.task.y_train) == 0:
            raise BadInputError("no training examples")
        self.fingerprint = self.task.fingerprint()
        if rckpt is not None and rckpt["resume"].get("data_fingerprint") != self.fingerprint:
            raise BadInputError(
                f"resume {self.rwhere}: the data at {self.task.source} differs from the "
                f"run's ({rckpt['train'].get('data')})"
            )
        if rckpt is None and self.last.exists():
            log(f"note: {self.last} (an unfinished run's state) will be replaced by this run's")
        if ranks.main:
            remove_stale_temp_files(self.out, self.mlog, self.last)
        if ranks.world > 1 and config.sparse_update:
            # DDP all-reduces dense gradients: meProp's are zero outside the selected rows
            log(f"note: {ranks.world} processes: dense updates (DDP takes no row-sparse gradients)")
            config.sparse_update = False
        seed_everything(config.seed)
        self.model, self.arch = self._model(model, rckpt)
        self.model.to(ranks.device).train()
        if ranks.world > 1:  # the same initial model everywhere, then each rank its own
            seed_everything(config.seed + 1_000_003 * ranks.rank)  # dropout/random-k draws
        self.forward = self.model  # what the training step calls: DDP when world > 1
        self.optimizer = (
            ReferenceAdam(self.model.parameters(), lr=config.lr)
            if config.reference
            else build_optimizer(
                config.optimizer, self.model.parameters(), config.lr, config.sparse_update
            )
        )
        self.reduction = "sum" if config.reference else "mean"
        # the whole step as one compiled call: mesimp's own cross-entropy step of a
        # Linear-ReLU stack, in one process (each step re-checks that it applies)
        self.one_call = not config.reference and ranks.world == 1 and not self.task.tagging
        # knowledge distillation: the teacher's outputs join the loss (not in one call)
        self.teacher = (
            load_teacher(config.teacher, ranks.device) if config.teacher is not None else None
        )
        self.one_call = self.one_call and self.teacher is None
        self.path = "python"  # which path the last step took (train --json reports it)
        self.sparse_layers = any(_kernels_serve(m) for m in self.model.modules())
        self.named_params = list(self.model.named_parameters())
        self.n = len(self.task.y_train)
        per_rank = math.ceil(self.n / ranks.world)  # DistributedSampler pads by wrapping
        bs, evals = config.batch_size, config.evals_per_epoch
        if config.reference:  # chunks of the epoch, a dev check after each
            self.bounds = chunked_batches(per_rank, bs, evals)
            self.evals = chunk_ends(per_rank, bs, evals)
        else:
            self.bounds = [(s, min(s + bs, per_rank)) for s in range(0, per_rank, bs)]
            spe = len(self.bounds)
            self.evals = {math.ceil((i + 1) * spe / evals) for i in range(min(evals, spe))}
        self.steps_per_epoch = spe = len(self.bounds)
        self.simplifier: Simplifier | ReferenceSimplifier | None = (
            ReferenceSimplifier(
                self.model,
                config.simplify,
                self.optimizer,
                reset=config.extra.get("reference_reset", "moments"),
            )
            if config.simplify is not None and config.reference
            else Simplifier(
                self.model,
                config.simplify,
                self.optimizer,
                steps_per_epoch=spe,
                epochs=config.epochs,
                # a CNN's (or any graph's) units come from its graph, and so does what a
                # compaction removes; a masked MLP or LSTM stack needs none
                example_inputs=self._example()
                if config.compact or self.arch.get("model") in ("cnn", CUSTOM)
                else None,
                compact=config.compact,
            )
            if config.simplify is not None
            else None
        )
        # the simplified widths: a point that changes them starts a new best
        self.widths = self.simplifier.widths if self.simplifier is not None else None
        if isinstance(self.simplifier, Simplifier) and self.arch.get("compacted"):
            # a resumed user's model: later compactions compose with the run's earlier ones
            self.simplifier.compacted = {n: list(k) for n, k in self.arch["compacted"].items()}
        self.order_gen = torch.Generator().manual_seed(config.seed)
        self.records: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {}
        self.best_widths: list[int] | None = None
        self.t0 = time.perf_counter()
        self.train_time = 0.0
        self.global_step = 0
        self.start_epoch, self.start_step = 0, 0  # the next step is start_step + 1
        self.perm: torch.Tensor | None = None
        self.shard: torch.Tensor | None = None  # this rank's part of perm
        self.stopping = False  # a signal reached some rank: all stop after this step
        self.loss_sum = 0.0
        self.last_saved: tuple[int, int] | None = None  # (epoch, step) in RUN.last.pt
        if rckpt is not None:
            self._restore(rckpt)
        self._wrap_ddp()

    def _wrap_ddp(self) -> None:
        """Several ranks: the forward goes through a DDP wrapper of the model (built
        again after a compaction changed the parameters)."""
        if self.ranks.world > 1:
            cuda = self.ranks.device.type == "cuda"
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.ranks.device.index] if cuda else None
            )

    # ---------------------------------------------------------------- building
    def _model(
        self, model: nn.Module | None, rckpt: dict[str, Any] | None
    ) -> tuple[nn.Module, dict[str, Any]]:
        config = self.config
        if model is None:
            return build(config, self.task) if rckpt is None else rebuild(config, rckpt)
        # a user's module: trained in place; its checkpoint cannot rebuild it
        arch = {"model": CUSTOM, "class": type(model).__name__}
        if rckpt is not None:
            compacted = rckpt["arch"].get("compacted")
            if compacted:  # the run removed units: the same from the model given
                meprop_(model, config.meprop_config())
                replay_(model, self._example(), compacted)
                arch["compacted"] = compacted
            try:
                model.load_state_dict(rckpt["state_dict"])
            except RuntimeError as e:
                raise CheckpointError(
                    f"resume {self.rwhere}: the model given is not the run's model ({e})"
                ) from e
            restore_meprop(model, config, rckpt)
        elif config.k != 0 or config.simplify is not None:
            meprop_(model, config.meprop_config())
        return model, arch

    def _example(self) -> Any:
        """Two training inputs: what tracing a model's dependency groups runs on."""
        x, _ = self.task.batch(self.task.x_train[:2], self.task.y_train[:2])
        return x

    def _compacted(self) -> None:
        """After the Simplifier removed units: the loop's views of the model follow (its
        parameters, the checkpoint's arch at the new widths, the DDP wrapper)."""
        self.named_params = list(self.model.named_parameters())
        if self.arch["model"] == CUSTOM:
            self.arch = {**self.arch, "compacted": self.simplifier.compacted}
        else:
            self.arch = arch_at_widths(self.arch, self.model)
            if hasattr(self.model, "config"):  # the built-in model's own record of its sizes
                self.model.config = arch_from_dict(self.arch)
        self._wrap_ddp()

    def _cost(self) -> dict[str, int]:
        """Parameters and MACs per example (per token, per row) of the model now."""
        if self.arch["model"] == CUSTOM:
            return {"params": count_params(self.model), "macs": _custom_macs(self)}
        return {"params": count_params(self.model), "macs": count_macs(self.model)}

    def _restore(self, rckpt: dict[str, Any]) -> None:
        r = rckpt["resume"]
        try:
            self.optimizer.load_state_dict(r["optimizer"])
            self.order_gen.set_state(r["order_gen"])
            set_rng_state(r["rng"])
            self.records, self.best = list(r["records"]), r["best"]
            self.last_eval, self.best_widths = dict(r["last_eval"]), r["best_widths"]
            if self.simplifier is not None:  # its progress is (global step, resets done)
                self.simplifier.steps = r["global_step"]
                self.simplifier.resets = r["optimizer_resets"]
            if isinstance(self.simplifier, Simplifier) and r.get("full_sizes"):
                # the model was rebuilt at its compacted widths: a cubic target is a
                # fraction of the widths the run started from
                self.simplifier.full_sizes.update(r["full_sizes"])
            self.train_time, self.global_step = r["train_time_s"], r["global_step"]
            self.loss_sum = r["loss_sum"]
            self.start_epoch, self.start_step, self.perm = r["epoch"], r["step"], r["perm"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.rwhere}: malformed resume section ({e})") from e
        world = r.get("world_size", 1)
        if world != self.ranks.world:
            raise BadInputError(
                f"resume {self.rwhere}: the run had {world} process(es), this is "
                f"{self.ranks.world}; resume it with torchrun --nproc_per_node {world}"
            )
        if world > 1:
            restore_rank_state(self.model, r["ranks"][self.ranks.rank], self.ranks.device)
        if self.perm is not None:
            self.shard = self.ranks.shard(self.perm)
        if r.get("steps_per_epoch") != self.steps_per_epoch:
            raise BadInputError(
                f"resume {self.rwhere}: the run had {r.get('steps_per_epoch')} steps "
                f"per epoch, this data and batch size give {self.steps_per_epoch}"
            )
        self.last_saved = (self.start_epoch, self.start_step)
        if self.start_step >= self.steps_per_epoch:  # saved at the end of an epoch
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
            self.perm, self.loss_sum = None, 0.0

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        config = self.config
        if not self.records:  # a fresh run: the widths at step 0, so plots start at full width
            self.records.append(
                {
                    "event": "start",
                    "epoch": 0,
                    "step": 0,
                    "widths": active_widths(self.model),
                    **self._cost(),
                }
            )
        for epoch in range(self.start_epoch, config.epochs):
            self._epoch(epoch)
        self._write_log()
        if not config.keep_last and self.ranks.main:
            self.last.unlink(missing_ok=True)
        return self._summary()

    def _epoch(self, epoch: int) -> None:
        config, spe = self.config, self.steps_per_epoch
        if self.start_step == 0:
            perm = torch.randperm(self.n, generator=self.order_gen)
            self.perm = self.task.order(perm, config.batch_size)  # bucketed by length, or perm
            self.shard = self.ranks.shard(self.perm)
            self.loss_sum = 0.0
        self.bar = progress_bar(
            range(self.start_step, spe),
            progress=self.progress,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            initial=self.start_step,
            total=spe,
            unit="step",
        )
        self.start_step = 0
        t_epoch = time.perf_counter()
        try:
            for s in self.bar:
                step = s + 1
                self._step(epoch, step)
                if step == spe:  # before the epoch's last save: a resume sees the record
                    self.train_time += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    self._epoch_record(epoch)
                final = epoch == config.epochs - 1 and step == spe
                is_eval = step in self.evals
                save = is_eval or self.stopping
                save = save or (config.save_every > 0 and self.global_step % config.save_every == 0)
                if not save:
                    continue
                self.train_time += time.perf_counter() - t_epoch
                self._checkpoint(epoch, step, is_eval, final)
                if self.stopping and not final:
                    raise self._interrupted(epoch, step)
                t_epoch = time.perf_counter()
            self.train_time += time.perf_counter() - t_epoch
        finally:
            self.bar.close()
        e = self.last_eval
        self.log(
            f"epoch {epoch + 1}/{config.epochs}: loss {e['train_loss']:.4f} "
            f"dev {e['dev_accuracy']:.4f} test {e['test_accuracy']:.4f} "
            f"widths {e['widths']} ({self.train_time:.1f}s)"
        )

    def _epoch_record(self, epoch: int) -> None:
        """The end of an epoch: the training time so far and the cost the model has
        now (a compaction cuts both); an epoch's time is the difference of two."""
        self.records.append(
            {
                "event": "epoch",
                "epoch": epoch + 1,
                "step": self.global_step,
                "elapsed_s": self.train_time,
                **self._cost(),
            }
        )

    def _step(self, epoch: int, step: int) -> None:
        """One minibatch: forward, loss, backward, guards, update, meSimp."""
        start, end = self.bounds[step - 1]
        idx = self.shard[start:end]
        x, y = self.task.batch(self.task.x_train[idx], self.task.y_train[idx])
        if self.one_call and self._compiled_step(epoch, step, x, y):
            return
        self.path = (
            "compiled" if self.sparse_layers and kernels.kernel_name() == "cpp" else "python"
        )
        out = self.forward(x)
        loss = self.task.loss(out, y, self.reduction)
        if self.teacher is not None:
            loss = self._distilled(loss, out, x, y)
        loss_value = self._checked_loss(loss, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self._grad_check_due():
            self._check_grad(nonfinite_grad(self.named_params), epoch, step)
        self.optimizer.step()
        self._after_update(loss_value)

    def _distilled(
        self, loss: torch.Tensor, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The task loss mixed with the teacher's soft targets (``mesimp.training.distill``)."""
        assert self.teacher is not None
        with torch.no_grad():
            target = self.teacher(x)
        keep = y != 0 if self.task.tagging else None  # a tagger's padding has no target
        a, temp = self.config.distill_alpha, self.config.distill_temperature
        return (1 - a) * loss + a * kd_loss(out, target, temp, keep)

    def _compiled_step(self, epoch: int, step: int, x: torch.Tensor, y: torch.Tensor) -> bool:
        """The whole step in one compiled call (``mesimp.nn.fused``) where it applies: the
        same update as the steps in ``_step``, the same guards. False: not taken."""
        check = self._grad_check_due()
        done = fused_train_step(self.model, x, y, self.optimizer, check_grads=check)
        if done is None:
            return False
        self.path = "train_step"
        loss, bad = done
        loss_value = self._checked_loss(loss, epoch, step)
        if bad is not None:
            self._check_grad(next(n for n, p in self.named_params if p is bad), epoch, step)
        self._after_update(loss_value)
        return True

    def _grad_check_due(self) -> bool:
        return (self.global_step + 1) % GRAD_CHECK_EVERY == 0

    def _checked_loss(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        """The loss value; a non-finite one stops the run. Every rank must take the same
        branch (DDP's backward all-reduces), so they agree on it and on a stop signal."""
        loss_value = loss.item()
        self.stopping, nonfinite = self.ranks.agree(
            self.stop.signum is not None, not math.isfinite(loss_value)
        )
        if nonfinite:
            raise self._diverged(f"loss is {loss_value}", epoch, step, self.global_step + 1)
        return loss_value

    def _check_grad(self, bad: str | None, epoch: int, step: int) -> None:
        """``bad``: the parameter whose gradient holds NaN/Inf, if any."""
        if bad is not None:
            raise self._diverged(
                f"the gradient of {bad} holds NaN/Inf", epoch, step, self.global_step + 1
            )

    def _after_update(self, loss_value: float) -> None:
        self.global_step += 1
        self.loss_sum += loss_value
        if self.simplifier is not None:
            self._simplifier_events(self.simplifier.step())

    def _simplifier_events(self, events: list[dict[str, Any]]) -> None:
        """What the Simplifier did: its records (with the cost from here on), a new best
        when the widths changed, and the loop's views of a compacted model."""
        for e in events:
            if e["event"] == "compact":
                self._compacted()
            if e["event"] in ("simplify", "compact"):
                e.update(self._cost())
            if e["event"] == "simplify" and e["widths"] != self.widths:
                self.widths = e["widths"]
                self.best = None  # a new architecture: its best starts fresh
        self.records.extend(events)

    def _checkpoint(self, epoch: int, step: int, is_eval: bool, final: bool) -> None:
        """At an evaluation: evaluate, keep the best, rewrite the log; then RUN.last.pt."""
        # The loss and gradients were finite, but an update can still overflow: never
        # evaluate, log or save such weights (save_checkpoint would refuse them anyway).
        bad = first_nonfinite(dict(self.named_params))
        if bad is not None:
            raise self._diverged(f"the update made {bad} NaN/Inf", epoch, step, self.global_step)
        try:
            if is_eval:
                self._evaluate(epoch, step)
                if isinstance(self.simplifier, ReferenceSimplifier):
                    # the C# order: the chunk's dev check, then its Adam reset and prune
                    self._simplifier_events(self.simplifier.after_check(epoch))
                    self._write_log()
            if not final or self.config.keep_last:
                # the end of a run needs no resume state: the file is removed after it
                self._save_resume(epoch, step, complete=final)
        except NonFiniteError as e:  # e.g. Adam's second moment overflowed
            raise self._diverged(str(e), epoch, step, self.global_step) from e

    def _evaluate(self, epoch: int, step: int) -> None:
        task, model = self.task, self.model
        rec = {
            "event": "eval",
            "epoch": epoch + step / self.steps_per_epoch,
            "step": self.global_step,
            "train_loss": self.loss_sum / step,
            "dev_accuracy": task.accuracy(model, task.x_dev, task.y_dev),
            "test_accuracy": task.accuracy(model, task.x_test, task.y_test),
            "widths": active_widths(model),
            "elapsed_s": self.train_time,
        }
        if task.metrics is not None:  # e.g. a parser's UAS/LAS, by parsing dev and test
            rec.update(task.metrics(model))
        self.records.append(rec)
        self.last_eval = rec
        score = rec["dev_accuracy"]
        if math.isnan(score):  # no dev split: the lowest training loss is best
            score = -rec["train_loss"]
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, **rec}
            self.best_widths = rec["widths"]
            if self.ranks.main:
                save_checkpoint(self.out, self._make_checkpoint(rec["epoch"], rec))
        self._write_log()
        self.bar.set_postfix(loss=f"{rec['train_loss']:.4f}", dev=f"{rec['dev_accuracy']:.4f}")

    # ---------------------------------------------------------------- files
    def _write_log(self) -> None:
        if not self.ranks.main:
            return
        atomic_write_text(self.mlog, "".join(json.dumps(r) + "\n" for r in self.records))

    def _make_checkpoint(self, epoch_float: float, metrics: dict[str, Any]) -> dict[str, Any]:
        """The model as a checkpoint, with the run's metadata (best and resume alike)."""
        return make_checkpoint(
            self.model,
            self.arch,
            _meprop_config(self.model),
            train={
                "config": self.config.to_dict(),
                "epoch": epoch_float,
                "step": self.global_step,
                "seed": self.config.seed,
                "data": self.task.summary,
                "metrics": {
                    k: metrics[k]
                    for k in ("dev_accuracy", "test_accuracy", "train_loss", *_TASK_METRICS)
                    if k in metrics
                },
                "optimizer_resets": self._resets(),
            },
        )

    def _save_resume(self, epoch: int, step: int, complete: bool = False) -> None:
        ranks = self.ranks.gather(rank_state(self.model)) if self.ranks.world > 1 else None
        if ranks is not None:
            check_same_masks(ranks)
        if not self.ranks.main:
            self.last_saved = (epoch, step)
            return
        ckpt = self._make_checkpoint(epoch + step / self.steps_per_epoch, self.last_eval)
        ckpt["resume"] = {
            "version": RESUME_VERSION,
            "epoch": epoch,  # 0-based epoch in progress ...
            "step": step,  # ... and the steps of it that are done
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "complete": complete,
            "perm": self.perm,  # this epoch's data order
            "order_gen": self.order_gen.get_state(),
            "rng": rng_state(),
            "optimizer": self.optimizer.state_dict(),
            "msbp_memory": {
                name: mod._state.memory
                for name, mod in self.model.named_modules()
                if isinstance(mod, MePropCounters)
            },
            # the simplify schedule is a pure function of the global step and the groups'
            # starting widths
            "full_sizes": self.simplifier.full_sizes
            if isinstance(self.simplifier, Simplifier)
            else None,
            "loss_sum": self.loss_sum,
            "records": self.records,
            "best": self.best,
            "last_eval": self.last_eval,
            "best_widths": self.best_widths,
            "optimizer_resets": self._resets(),
            "train_time_s": self.train_time,
            "data_fingerprint": self.fingerprint,
        }
        if ranks is not None:  # each rank's own RNG, MSBP memory and counters
            ckpt["resume"].update(world_size=self.ranks.world, ranks=ranks)
        save_checkpoint(self.last, ckpt)
        self.last_saved = (epoch, step)

    def _interrupted(self, epoch: int, step: int) -> TrainingInterrupted:
        self._write_log()
        signum = self.stop.signum or signal.SIGTERM  # another rank may have had the signal
        name = self.stop.name or "a signal to another process"
        how = (
            f"mesimp train --resume {self.last}"
            if self.ranks.world == 1
            else f"the same torchrun command with --resume {self.last}"
        )
        return TrainingInterrupted(
            f"interrupted by {name} at {_where(epoch, step)}; resume with: {how}",
            signum,
            self.last,
        )

    def _diverged(self, what: str, epoch: int, step: int, gstep: int) -> TrainingDiverged:
        # best_widths is set once this run (or the run it resumes) wrote its best checkpoint
        wrote_best = self.best_widths is not None and self.out.exists()
        kept = [f"{self.out} (best on dev)"] if wrote_best else []
        if self.last_saved is not None and self.last.exists():
            kept.append(f"{self.last} ({_where(*self.last_saved)})")
        self._write_log()
        return TrainingDiverged(
            f"training diverged: {what} at {_where(epoch, step)} (global step {gstep}); "
            f"nothing from this step on was saved; kept {', '.join(kept) or 'no checkpoint yet'}; "
            "try a lower --lr"
        )

    # ---------------------------------------------------------------- the result
    def _resets(self) -> int:
        return self.simplifier.resets if self.simplifier is not None else 0

    def _summary(self) -> dict[str, Any]:
        """The ``train --json`` document (docs/file-formats.md), the same for every model family."""
        best = self.best or self.last_eval
        return {
            "model": self.arch["model"],
            "checkpoint": str(self.out),
            "metrics_log": str(self.mlog),
            "hidden_sizes": hidden_sizes(self.model),
            "active_widths": self.best_widths,
            "params": count_params(self.model),
            "macs": count_macs(self.model),
            "best": {
                k: best[k]
                for k in ("epoch", "step", "dev_accuracy", "test_accuracy", *_TASK_METRICS)
                if k in best
            },
            "final": {
                k: self.last_eval[k]
                for k in ("dev_accuracy", "test_accuracy", *_TASK_METRICS)
                if k in self.last_eval
            },
            "train_time_s": self.train_time,
            "epoch_times_s": _epoch_times(self.records),
            "wall_time_s": time.perf_counter() - self.t0,
            "optimizer_resets": self._resets(),
            # the meProp kernels: "cpp" (compiled, mesimp.nn.kernels) or "python"; the
            # last step's path: "train_step" (one compiled call), "compiled" (the
            # kernels behind loss.backward()) or "python"
            "kernel": kernels.kernel_name(),
            "step_path": self.path,
            "config": self.config.to_dict(),
            "data": self.task.summary,
        }


def _epoch_times(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of training per epoch, from the epoch records' running totals."""
    ends = [r["elapsed_s"] for r in records if r["event"] == "epoch"]
    return [b - a for a, b in zip([0.0, *ends], ends, strict=False)]


def _custom_macs(run: _Run) -> int:
    """MACs of one example of a user's model (measured on two, halved)."""
    from mesimp.models.macs import layer_macs

    return sum(layer_macs(run.model, run._example()).values()) // 2


def _where(epoch: int, step: int) -> str:
    return f"epoch {epoch + 1} step {step}"


def _kernels_serve(m: nn.Module) -> bool:
    """Whether the compiled kernels run this layer's backward (on float32 CPU, kernels on):
    a ``MePropLinear`` with unified, per-example top-k or random-k, a ``MePropLSTM`` with
    unified selection; Conv2d, the reference heap and a per-example LSTM run the Python
    path."""
    if isinstance(m, MePropLinear):
        return m.k > 0 and m.meprop_config.backward_selection in kernels.SELECTION_CODE
    if isinstance(m, MePropLSTM):
        return m.k > 0 and m.meprop_config.selection == "unified" and lstm_op_built()
    return False


def _meprop_config(model: nn.Module) -> Any:
    for mod in model.modules():
        if isinstance(mod, MePropCounters):
            return mod.meprop_config
    return None
