"""The suite's PNGs, drawn from ``results.json`` alone (matplotlib is optional).

* accuracy vs parameters: every method of both comparisons, one point per seed;
* meSimp's active width over training: every hidden layer, every seed (MLP and LSTM);
* the papers' tasks (``benchmarks.suite.paper_tasks``): each row's test metric per seed
  next to the paper's number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.suite.paper_tasks import BENCH_DIR, done_tasks
from benchmarks.suite.results import LSTM_ROWS, MLP_ROWS, ok_runs
from mesimp.files.atomic import atomic_path

MISSING = "matplotlib not installed (pip install '.[bench]')"


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _thousands(value: float, _pos: int) -> str:
    return f"{value / 1e6:.4g}M" if value >= 1e6 else f"{value / 1e3:.4g}k"


def acc_vs_params(results: dict[str, Any], path: Path, plt: Any) -> None:
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    markers = "osD^v<>PX*"
    for ax, (section, order, title) in zip(
        axes,
        (("mlp", MLP_ROWS, "MLP, Fashion-MNIST"), ("lstm", LSTM_ROWS, "LSTM POS, UD EWT")),
        strict=True,
    ):
        rows = {r["key"]: r for r in results["rows"] if r["section"] == section}
        params = [r["params"] for row in rows.values() for r in ok_runs(row)]
        for i, (key, label) in enumerate(order):
            runs = ok_runs(rows[key]) if key in rows else []
            if not runs:
                continue
            ax.scatter(
                [r["params"] for r in runs],
                [100 * r["test_accuracy"] for r in runs],
                marker=markers[i % len(markers)],
                label=label,
                alpha=0.8,
            )
        log_x = bool(params) and max(params) > 3 * min(params)  # else log ticks crowd
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_thousands))
        ax.set_xlabel("parameters" + (" (log scale)" if log_x else ""))
        ax.set_ylabel("test accuracy %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(plt, fig, path)


def widths(results: dict[str, Any], path: Path, plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for ax, section, title in zip(
        axes, ("mlp", "lstm"), ("MLP meSimp", "LSTM meSimp"), strict=True
    ):
        hist = (results.get(section) or {}).get("width_history") or {}
        for seed, h in hist.items():
            if not h.get("widths"):
                continue
            for j in range(len(h["widths"][0])):
                ax.step(
                    h["step"],
                    [w[j] for w in h["widths"]],
                    where="post",
                    label=f"seed {seed}, layer {j + 1} (final {h['final_widths'][j]})",
                )
        ax.set_xlabel("training step")
        ax.set_ylabel("active width")
        ax.set_ylim(bottom=0)
        ax.set_title(title + ("" if hist else " (no data)"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(plt, fig, path)


def paper_tasks(path: Path, plt: Any, bench_dir: Path = BENCH_DIR) -> bool:
    """One panel per paper task with a runs file; False (nothing drawn) when there is none."""
    done = done_tasks(bench_dir)
    if not done:
        return False
    fig, axes = plt.subplots(1, len(done), figsize=(6 * len(done), 4.8), dpi=110, squeeze=False)
    for ax, (task, runs) in zip(axes[0], done, strict=True):
        rows = [row for row in task.rows if any(r["row"] == row.name for r in runs)]
        labelled = False
        for i, row in enumerate(rows):
            vals = [
                100 * r[task.metric]
                for r in runs
                if r["row"] == row.name and r.get(task.metric) is not None
            ]
            ax.scatter([i] * len(vals), vals, color="C0", s=18, label="ours" if i == 0 else None)
            if row.paper_acc is not None:
                ax.scatter(
                    [i],
                    [row.paper_acc],
                    color="C3",
                    marker="*",
                    s=90,
                    label=None if labelled else "paper (its data)",
                )
                labelled = True
        ax.set_xticks(range(len(rows)), [row.label for row in rows], rotation=60, ha="right")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel(task.metric_label)
        ax.set_title(task.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def draw(results: dict[str, Any], out_dir: Path, names: dict[str, str]) -> dict[str, Any]:
    """Writes the PNGs into ``out_dir``; returns ``{key: file name}`` or ``{"note": why}``."""
    plt = _pyplot()
    if plt is None:
        return {"note": MISSING}
    acc_vs_params(results, out_dir / names["acc_vs_params"], plt)
    widths(results, out_dir / names["widths"], plt)
    drawn = dict(names)
    if not paper_tasks(out_dir / names["paper_tasks"], plt):
        del drawn["paper_tasks"]
    return drawn
