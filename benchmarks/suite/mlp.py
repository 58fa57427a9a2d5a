"""Comparison A: MLP 784-500-500-10 on Fashion-MNIST, every method at the same epochs.

Per seed: dense, meSimp (``epochs - F`` simplifying epochs, shrink, ``F`` fine-tuning
epochs) and dense from scratch at the meSimp widths come from
``benchmarks.mesimp_fmnist.one_seed`` (so they are exactly that benchmark's runs);
meProp top-k (per example and unified), random-k and MSBP train with
``mesimp_fmnist._run``; Torch-Pruning prunes a dense net trained ``epochs - F``
epochs to the meSimp widths and fine-tunes it ``F`` epochs (equal total epochs).
A divergence (mesimp's NaN guard) becomes a ``diverged`` run, never a crash.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.mesimp_fmnist import _run, one_seed
from benchmarks.suite import tp
from benchmarks.suite.config import FMNIST, MLPSettings, SuiteConfig
from benchmarks.suite.results import (
    DIVERGED,
    FAILED,
    MLP_ROWS,
    ORT_KEYS,
    bad_run,
    finish_row,
    new_row,
    ok_run,
    set_time_ratios,
    skipped_row,
)
from benchmarks.suite.speed import mlp_backward_ratios, mlp_model, ort_speedups
from mesimp.data import find_image_data, load_idx
from mesimp.data.images import IDX_FILES
from mesimp.errors import MesimpError
from mesimp.files.atomic import atomic_write
from mesimp.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.nn.meprop import MePropConfig
from mesimp.training.loop import TrainingDiverged
from mesimp.training.report import read_metrics, width_history

Log = Callable[[str], None]
IN_FEATURES, CLASSES = 784, 10
FULL_WIDTH_NOTE = "1 by construction: the same 784-{h}-{h}-10 graph as dense"


def mlp_params(widths: list[int], in_features: int = IN_FEATURES, out: int = CLASSES) -> int:
    sizes = [in_features, *widths, out]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def diverged_epoch(e: BaseException) -> int | None:
    m = re.search(r"epoch (\d+)", str(e))
    return int(m.group(1)) if m else None


def prepare_data(s: MLPSettings, work: Path) -> str:
    """The data path every run uses: the IDX directory, or (with subsets) an ``.npz`` of
    the first ``train_subset`` / ``test_subset`` images, written once into ``work``."""
    src = find_image_data(s.data if s.data else (FMNIST if FMNIST.is_dir() else None))
    if s.train_subset is None and s.test_subset is None:
        return str(src)
    if not src.is_dir():
        raise MesimpError(f"subsets need an IDX directory, got {src}")
    arrays = {}
    for key, stem in IDX_FILES.items():
        gz = src / f"{stem}.gz"
        a = load_idx(gz if gz.is_file() else src / stem)
        n = s.train_subset if key.endswith("train") else s.test_subset
        arrays[key] = a[:n] if n else a
    path = work / "fmnist-subset.npz"

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return str(path)


def _args(s: MLPSettings, data: str) -> argparse.Namespace:
    """The namespace ``mesimp_fmnist.one_seed`` reads its settings from."""
    return argparse.Namespace(
        epochs=s.epochs,
        batch_size=s.batch_size,
        data=data,
        hidden=s.hidden,
        k=s.mesimp_k,
        selection=s.mesimp_selection,
        prune_rate=s.prune_rate,
        points=s.points,
        cycle_epochs=s.cycle_epochs,
        finetune_epochs=s.finetune_epochs,
        round_to=s.round_to,
    )


def _as_run(seed: int, r: dict[str, Any]) -> dict[str, Any]:
    return ok_run(seed, r["test"], r["widths"], mlp_params(r["widths"]), r["time"])


def _train(out: Path, name: str, seed: int, **kw: Any) -> dict[str, Any]:
    """One ``mesimp_fmnist._run`` as a result run; a divergence is a result too."""
    try:
        return _as_run(seed, _run(out, name, seed=seed, **kw))
    except TrainingDiverged as e:
        return bad_run(seed, DIVERGED, first_line(e), diverged_epoch(e))


def methods(s: MLPSettings) -> dict[str, str]:
    h, k = s.hidden, s.k
    e, f = s.epochs, s.finetune_epochs
    return {
        "dense": f"784-{h}-{h}-10, plain backprop, {e} epochs",
        "meprop_topk": f"k={k} of {h} ({k / h:.0%}) per example (the paper's meProp)",
        "meprop_unified": f"k={k} of {h} ({k / h:.0%}), one set per minibatch",
        "random_k": f"k={k} random units per example",
        "msbp": f"{s.msbp_selection} k={k}, memory ratio alpha={s.msbp_alpha}",
        "mesimp": f"{s.mesimp_selection} k={s.mesimp_k}, prune rate {s.prune_rate}, "
        f"{s.points} points/epoch, {e - f} epochs; shrink (round-to {s.round_to}); "
        f"{f} epoch(s) plain fine-tuning",
        "dense_same": f"plain backprop at the meSimp widths of the same seed, {e} epochs",
        "tp": f"dense {e - f} epochs; Torch-Pruning L2 magnitude to the meSimp widths; "
        f"{f} epoch(s) fine-tuning",
    }


def run_mlp(cfg: SuiteConfig, work: Path, log: Log) -> dict[str, Any]:
    s = cfg.mlp
    if s.finetune_epochs < 1 or s.finetune_epochs >= s.epochs:
        raise MesimpError("MLP finetune_epochs must be in [1, epochs)")
    data = prepare_data(s, work)
    desc = methods(s)
    rows = {key: new_row("mlp", key, desc[key]) for key, _ in MLP_ROWS}
    have_tp = tp.available()
    if not have_tp:
        rows["tp"] = skipped_row("mlp", "tp", desc["tp"], tp.NOT_INSTALLED)
    common = dict(epochs=s.epochs, batch_size=s.batch_size, data=data, hidden=s.hidden)
    history: dict[str, Any] = {}
    ort_runs: dict[int, dict[str, Any]] = {}
    ort_errors: list[str] = []
    first_widths: list[int] | None = None
    width_seed = cfg.seeds[0]
    for seed in cfg.seeds:
        out = work / f"mlp-seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        log(f"MLP seed {seed}: dense, meSimp (+ shrink + fine-tune), dense at meSimp widths")
        try:
            trio: dict[str, Any] | None = one_seed(_args(s, data), seed, out)
        except MesimpError as e:  # e.g. a divergence in one of its four trainings
            trio = None
            for key in ("dense", "mesimp", "dense_same"):
                rows[key]["runs"].append(bad_run(seed, FAILED, first_line(e), diverged_epoch(e)))
        if trio is not None:
            rows["dense"]["runs"].append(_as_run(seed, trio["dense 500"]))
            rows["mesimp"]["runs"].append(_as_run(seed, trio["meSimp"]))
            rows["dense_same"]["runs"].append(_as_run(seed, trio["dense at meSimp widths"]))
            widths = trio["meSimp"]["widths"]
            if first_widths is None:
                first_widths, width_seed = widths, seed
            history[str(seed)] = {
                **width_history(read_metrics(out / f"mesimp-{seed}.metrics.jsonl")),
                "final_widths": widths,
            }
        for key, kw in (
            ("meprop_topk", dict(k=s.k, selection="topk")),
            ("meprop_unified", dict(k=s.k, selection="unified")),
            ("random_k", dict(k=s.k, selection="random")),
            ("msbp", dict(k=s.k, selection=s.msbp_selection, msbp=s.msbp_alpha)),
        ):
            log(f"MLP seed {seed}: {key}")
            rows[key]["runs"].append(_train(out, f"{key}-{seed}", seed, **common, **kw))
        if trio is None:
            if have_tp:
                rows["tp"]["runs"].append(bad_run(seed, FAILED, "no meSimp widths to prune to"))
            continue
        if have_tp:
            log(f"MLP seed {seed}: Torch-Pruning to {widths}")
            rows["tp"]["runs"].append(_tp_run(out, seed, widths, common, s))
        log(f"MLP seed {seed}: onnxruntime (dense vs meSimp {widths})")
        try:
            ort_runs[seed] = ort_speedups(
                out / f"dense-{seed}.pt",
                {"small": out / f"mesimp-ft-{seed}.pt"},
                out,
                data,
                cfg.speed.ort_batch_sizes,
                cfg.speed.ort_threads,
                cfg.speed.ort_repeat,
            )
        except MesimpError as e:  # export verification or onnxruntime refused
            ort_errors.append(f"seed {seed}: {first_line(e)}")
        log(f"MLP seed {seed} done in {time.perf_counter() - t0:.0f} s")
    ordered = [finish_row(rows[key]) for key, _ in MLP_ROWS]
    set_time_ratios(ordered)
    _add_ort(rows, ort_runs, ort_errors, s.hidden)
    log("MLP: backward-time ratios")
    _add_backward(rows, s, first_widths or [s.hidden, s.hidden], width_seed, cfg)
    return {"rows": ordered, "data": data, "width_history": history}


def _tp_run(
    out: Path, seed: int, widths: list[int], common: dict[str, Any], s: MLPSettings
) -> dict[str, Any]:
    """Dense ``epochs - F`` epochs -> Torch-Pruning to ``widths`` -> fine-tune ``F``."""
    base = _train(
        out, f"tp-base-{seed}", seed, **{**common, "epochs": s.epochs - s.finetune_epochs}
    )
    if base["status"] != "ok":
        return base
    t0 = time.perf_counter()
    try:
        ckpt = load_checkpoint(out / f"tp-base-{seed}.pt")
        model = tp.prune_mlp_to_widths(model_from_checkpoint(ckpt, meprop=False), widths)
    except Exception as e:  # Torch-Pruning's failure is a result of this row
        return bad_run(seed, FAILED, f"{type(e).__name__}: {first_line(e)}")
    arch = {**ckpt["arch"], "hidden_sizes": list(widths)}
    pruned = out / f"tp-pruned-{seed}.pt"
    save_checkpoint(pruned, make_checkpoint(model, arch, None, {"pruned_by": "torch-pruning"}))
    prune_s = time.perf_counter() - t0
    ft = _train(
        out,
        f"tp-ft-{seed}",
        seed,
        **{**common, "epochs": s.finetune_epochs},
        init=str(pruned),
    )
    if ft["status"] == "ok":
        ft["train_time_s"] += base["train_time_s"] + prune_s
    return ft


def _add_ort(
    rows: dict[str, dict[str, Any]],
    ort_runs: dict[int, dict[str, Any]],
    errors: list[str],
    h: int,
) -> None:
    """meSimp's measured speed-ups (mean over seeds); the rows at the same widths share
    them; the full-width rows are 1 by construction."""
    per_seed = {seed: r["small"] for seed, r in ort_runs.items()}
    for key in ("dense", "meprop_topk", "meprop_unified", "random_k", "msbp"):
        rows[key]["ort_note"] = FULL_WIDTH_NOTE.format(h=h)
    for key in ("mesimp", "dense_same", "tp"):
        row = rows[key]
        if not per_seed:
            row["ort_note"] = "not measured: " + ("; ".join(errors) or "no trained model")
            continue
        if row["status"] == "skipped" or not any(r["status"] == "ok" for r in row["runs"]):
            row["ort_note"] = "not measured (no trained model)"
            continue
        mean = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in ORT_KEYS}
        row["ort"] = dict(mean)
        row["ort_runs"] = {str(k): v for k, v in per_seed.items()}
        if key != "mesimp":
            row["ort_note"] = "same widths as meSimp (same graph shape): meSimp's measurement"
        if errors:
            row["notes"].append("onnxruntime failed for " + "; ".join(errors))
    rows["dense"]["ort_runs"] = {str(k): v["dense"] for k, v in ort_runs.items()}
    if ort_runs:
        rows["dense"]["ort_config"] = next(iter(ort_runs.values()))["_config"]


def _add_backward(
    rows: dict[str, dict[str, Any]],
    s: MLPSettings,
    widths: list[int],
    width_seed: int,
    cfg: SuiteConfig,
) -> None:
    import copy

    from mesimp.nn.swap import meprop_

    full = [s.hidden, s.hidden]
    base = mlp_model(full)

    def mp(**kw: Any) -> Any:
        return meprop_(copy.deepcopy(base), MePropConfig(**kw))

    variants = {
        "dense": base,
        "meprop_topk": mp(k=s.k, selection="topk"),
        "meprop_unified": mp(k=s.k, selection="unified"),
        "random_k": mp(k=s.k, selection="random"),
        "msbp": mp(k=s.k, selection=s.msbp_selection, msbp_alpha=s.msbp_alpha),
        "mesimp_train": mp(k=s.mesimp_k, selection=s.mesimp_selection),
        "small": mlp_model(widths),
    }
    sp = cfg.speed
    r = mlp_backward_ratios(variants, sp.rounds, sp.iters, sp.warmup)
    w = "-".join(map(str, widths)) + f" (seed {width_seed}'s widths)"
    for key in ("dense", "meprop_topk", "meprop_unified", "random_k", "msbp"):
        rows[key]["backward"] = [{"phase": "training", "ratio": r[key]}]
    rows["mesimp"]["backward"] = [
        {
            "phase": f"meSimp epochs (k={s.mesimp_k} at width {s.hidden})",
            "ratio": r["mesimp_train"],
        },
        {"phase": f"fine-tune (dense at {w})", "ratio": r["small"]},
    ]
    rows["dense_same"]["backward"] = [{"phase": f"training (dense at {w})", "ratio": r["small"]}]
    if rows["tp"]["status"] != "skipped":
        rows["tp"]["backward"] = [
            {"phase": "dense epochs", "ratio": r["dense"]},
            {"phase": f"fine-tune (dense at {w})", "ratio": r["small"]},
        ]
