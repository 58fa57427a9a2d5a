"""A picture of a run: active width per hidden layer over training, with accuracy, and
the training cost (MACs per example) falling with the widths when meSimp compacts.

Drawn from the JSONL metrics log that ``train`` writes next to the checkpoint, so
it works for any finished or interrupted run. matplotlib is an optional extra
(``pip install 'mesimp[plot]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mesimp.errors import BadInputError, MesimpError
from mesimp.files.atomic import atomic_path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics log; ``path`` may also be the run's checkpoint."""
    p = Path(path)
    if p.suffix == ".pt":
        p = p.with_name(p.stem + ".metrics.jsonl")
    if not p.is_file():
        raise BadInputError(f"{p}: no such metrics log (train writes RUN.metrics.jsonl)")
    records = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{p}:{i}: not JSON ({e.msg})") from e
        if not isinstance(rec, dict) or "event" not in rec:
            raise BadInputError(f"{p}:{i}: not a mesimp metrics record")
        records.append(rec)
    if not any(r["event"] == "eval" for r in records):
        raise BadInputError(f"{p}: no evaluation records yet")
    return records


def width_history(records: list[dict[str, Any]]) -> dict[str, list]:
    """Steps and widths per layer at every eval and simplification point."""
    pts = [r for r in records if r["event"] in ("start", "eval", "simplify") and "widths" in r]
    return {"step": [r["step"] for r in pts], "widths": [r["widths"] for r in pts]}


def cost_history(records: list[dict[str, Any]]) -> dict[str, list]:
    """Steps and MACs per example of the training model, from the records that carry
    them (the start, simplification points, compactions)."""
    pts = [r for r in records if r["event"] in ("start", "simplify", "compact") and "macs" in r]
    steps, macs = [], []
    for r in pts:
        steps.append(r["step"])
        macs.append(r["macs"])
    return {"step": steps, "macs": macs}


def plot_run(metrics: str | os.PathLike, output: str | os.PathLike | None = None) -> dict:
    """Write a PNG of widths (and dev accuracy) over steps; returns a summary."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MesimpError("matplotlib is needed for plots: pip install 'mesimp[plot]'") from e
    records = read_metrics(metrics)
    hist = width_history(records)
    evals = [r for r in records if r["event"] == "eval"]
    src = Path(metrics)
    base = src.name.removesuffix(".metrics.jsonl").removesuffix(".pt")
    out = Path(output) if output else src.with_name(base + ".widths.png")
    cost = cost_history(records)
    rows = 2 if cost["step"] else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 4 + 2.2 * (rows - 1)), dpi=120, squeeze=False)
    ax = axes[0][0]
    n_layers = len(hist["widths"][0]) if hist["widths"] else 0
    for j in range(n_layers):
        ax.step(
            hist["step"],
            [w[j] for w in hist["widths"]],
            where="post",
            label=f"hidden layer {j + 1}",
        )
    for r in records:
        if r["event"] == "cycle_start":
            ax.axvline(r["step"], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("active width")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(
        [r["step"] for r in evals],
        [r["dev_accuracy"] for r in evals],
        "k:",
        marker=".",
        label="dev accuracy",
    )
    ax2.set_ylabel("dev accuracy")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    final = hist["widths"][-1] if hist["widths"] else []
    ax.set_title(f"meSimp: active width per layer (final {final})")
    if cost["step"]:
        cx = axes[1][0]
        cx.step(cost["step"], cost["macs"], where="post", color="C3")
        cx.set_xlabel("training step")
        cx.set_ylabel("MACs per example")
        cx.set_ylim(bottom=0)
        cx.set_title("training cost of the model at each step")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {
        "path": str(out),
        "final_widths": final,
        "points": len(hist["step"]),
        "final_macs": cost["macs"][-1] if cost["macs"] else None,
        "best_dev_accuracy": max(r["dev_accuracy"] for r in evals),
    }
