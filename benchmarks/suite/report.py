"""RESULTS.md from ``results.json``: tables, claims and goals with computed verdicts.

``build_report`` refuses incomplete results (a missing row or seed, a NaN, a skip
without a reason) with ``IncompleteResults``, unless ``strict=False``, which writes
the report with the list of problems at the top (so a broken run is still legible
but can never pass for a clean one).
"""

from __future__ import annotations

from typing import Any

from benchmarks.suite.claims import ACC_TOL, judge
from benchmarks.suite.paper_tasks import section_md
from benchmarks.suite.results import (
    DIVERGED,
    LSTM_ROWS,
    MLP_ROWS,
    OK,
    IncompleteResults,
    check_results,
    ok_runs,
)
from benchmarks.suite.stats import kept_fraction, row_stat

PLOTS = {
    "acc_vs_params": "results_acc_vs_params.png",
    "widths": "results_widths.png",
    "paper_tasks": "results_paper_tasks.png",
}


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def _pm(stat: Any, scale: float = 1.0, nd: int = 2) -> str:
    if stat is None:
        return "-"
    if stat.n < 2:
        return _f(stat.mean * scale, nd)
    return f"{_f(stat.mean * scale, nd)} ± {_f(stat.sd * scale, nd)}"


def _seed_note(row: dict[str, Any]) -> str:
    bad = [r for r in row["runs"] if r["status"] != OK]
    if not bad:
        return ""
    parts = []
    for r in bad:
        where = f", epoch {r['epoch']}" if r.get("epoch") is not None else ""
        parts.append(f"seed {r['seed']} {r['status']}{where}")
    return f" ({len(ok_runs(row))}/{len(row['runs'])} seeds ok; {', '.join(parts)})"


def _acc_cell(row: dict[str, Any]) -> str:
    stat = row_stat(row, "test_accuracy")
    if stat is None:
        if row["status"] == DIVERGED:
            eps = sorted({r.get("epoch") for r in row["runs"] if r.get("epoch") is not None})
            where = f" in epoch {', '.join(map(str, eps))}" if eps else ""
            return f"**diverged**{where} (all {len(row['runs'])} seeds)"
        reasons = list(dict.fromkeys(r.get("reason") or "" for r in row["runs"]))
        why = f": {reasons[0]}" if len(reasons) == 1 and reasons[0] else " (see below)"
        return f"**{row['status']}**{why}"
    return _pm(stat, 100) + _seed_note(row)


def _widths_cell(row: dict[str, Any], full: int) -> str:
    runs = ok_runs(row)
    if not runs:
        return "-"
    shapes = list(dict.fromkeys("-".join(map(str, r["widths"])) for r in runs))
    kept = kept_fraction(row, full)
    pct = f" ({100 * kept.mean:.1f}%)" if kept is not None and kept.mean < 0.999 else ""
    return " / ".join(shapes) + pct


def _params_cell(row: dict[str, Any], dense_params: float | None) -> str:
    stat = row_stat(row, "params")
    if stat is None:
        return "-"
    ratio = (
        f" (÷{dense_params / stat.mean:.1f})" if dense_params and stat.mean < dense_params else ""
    )
    return f"{stat.mean:,.0f}{ratio}"


def _backward_cell(row: dict[str, Any]) -> str:
    parts = row.get("backward") or []
    if not parts:
        return "-"
    if len(parts) == 1 and parts[0]["phase"] == "training":
        return f"{parts[0]['ratio']:.1f}x"
    return "; ".join(f"{p['ratio']:.1f}x {p['phase']}" for p in parts)


def _ort_cells(row: dict[str, Any], notes: list[str]) -> list[str]:
    ort = row.get("ort")
    note = row.get("ort_note")
    mark = ""
    if note:
        if note not in notes:
            notes.append(note)
        mark = f" [{notes.index(note) + 1}]"
    if ort:
        return [f"{ort[k]:.2f}x{mark}" for k in ("fp32_b1", "fp32_b256", "int8_b1", "int8_b256")]
    if note and note.startswith("1 by construction"):
        return [f"1{mark}"] * 4
    return [f"n/a{mark}"] * 4


def section_table(results: dict[str, Any], section: str, full: int) -> str:
    if section not in (results["config"].get("sections") or [section]):
        return f"Not run (`--sections {','.join(results['config']['sections'])}`)."
    rows = [r for r in results["rows"] if r["section"] == section]
    order = [k for k, _ in (MLP_ROWS if section == "mlp" else LSTM_ROWS)]
    rows.sort(key=lambda r: order.index(r["key"]) if r["key"] in order else len(order))
    dense = next((r for r in rows if r["key"] == "dense"), None)
    dense_params = row_stat(dense, "params").mean if dense and row_stat(dense, "params") else None
    head = (
        "| method | setting | test acc % (mean ± sd) | kept widths | params | train time s "
        "| time / dense | backward speed-up | ORT fp32 b1 | ORT fp32 b256 | ORT int8 b1 "
        "| ORT int8 b256 |"
    )
    lines = [head, "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    notes: list[str] = []
    extra: list[str] = []
    for row in rows:
        if row["status"] in ("skipped", "failed") and not row["runs"]:
            lines.append(f"| {row['label']} | {row['method']} | **{row['reason']}** |" + " |" * 9)
            continue
        t, r = row_stat(row, "train_time_s"), row_stat(row, "time_ratio")
        cells = [
            row["label"],
            row["method"],
            _acc_cell(row),
            _widths_cell(row, full),
            _params_cell(row, dense_params),
            _pm(t, nd=1),
            _pm(r, nd=2),
            _backward_cell(row),
            *_ort_cells(row, notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        bad = [x for x in row["runs"] if x["status"] != OK]
        if bad:
            extra.append(
                f"- {row['label']}: "
                + "; ".join(f"seed {x['seed']}: {x['status']}: {x['reason']}" for x in bad)
            )
        extra += [f"- {row['label']}: {n}" for n in row.get("notes") or []]
        run_notes = sorted({x["note"] for x in ok_runs(row) if x.get("note")})
        extra += [f"- {row['label']}: {n}" for n in run_notes]
    lines.append("")
    lines += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)


def _verdict_mark(holds: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "open"}[holds]


def claims_md(verdicts: dict[str, Any]) -> str:
    out = []
    for c in verdicts["claims"]:
        out += [f"### {c['title']}", "", f"Paper: {c['paper']}.", ""]
        out += ["| setting | ours (method vs reference) | verdict |", "|---|---|---|"]
        out += [f"| {i['setting']} | {i['ours']} | {i['verdict']} |" for i in c["items"]]
        out.append("")
    return "\n".join(out)


def goals_md(verdicts: dict[str, Any]) -> str:
    out = ["| goal | ours | met |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['ours']} | {_verdict_mark(g['met'])} |" for g in verdicts["goals"]]
    return "\n".join(out)


def _machine_md(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    keys = (
        "cpu_model",
        "cpu_count",
        "affinity_cpus",
        "platform",
        "python",
        "torch",
        "onnxruntime",
        "numpy",
        "torch_pruning",
        "threads",
        "loadavg_start",
        "loadavg_end",
    )
    return "\n".join(f"- {k}: {m[k]}" for k in keys if k in m)


def build_report(results: dict[str, Any], strict: bool = True) -> str:
    """The Markdown report; raises IncompleteResults on problems when ``strict``."""
    problems = check_results(results)
    if problems and strict:
        raise IncompleteResults(problems)
    cfg = results["config"]
    verdicts = judge(results)
    results["verdicts"] = verdicts
    mc, lc = cfg["mlp"], cfg["lstm"]
    quick = " (QUICK MODE: CI-sized smoke run, the numbers mean nothing)" if cfg["quick"] else ""
    out = [f"# Benchmark results{quick}", ""]
    if problems:
        out += ["**INCOMPLETE RESULTS** - these problems were found:", ""]
        out += [f"- {p}" for p in problems] + [""]
    out += [
        f"Regenerate with `{results['command']}` "
        f"({results['elapsed_s'] / 60:.1f} min on the machine below, {results['started']}). "
        "Raw numbers: `results.json` next to this file.",
        "",
        "## Project goals",
        "",
        goals_md(verdicts),
        "",
        "## A. MLP on Fashion-MNIST",
        "",
        f"784-{mc['hidden']}-{mc['hidden']}-10, Adam lr 1e-3, batch {mc['batch_size']}, "
        f"{mc['epochs']} epochs for every method (meSimp: {mc['epochs'] - mc['finetune_epochs']} "
        f"simplifying + {mc['finetune_epochs']} fine-tuning; Torch-Pruning: "
        f"{mc['epochs'] - mc['finetune_epochs']} dense + {mc['finetune_epochs']} fine-tuning), "
        f"seeds {cfg['seeds']}, dev = first 5000 training images, test accuracy of the "
        f"best-on-dev checkpoint. Data: `{results.get('mlp', {}).get('data')}`.",
        "",
        section_table(results, "mlp", mc["hidden"]),
        "",
        "## B. LSTM POS tagging on UD English EWT",
        "",
        f"Embedding 100 -> LSTM {lc['hidden']} -> Linear, Adam lr {lc['lr']:g}, batch 32, "
        f"{lc['epochs']} epochs for every method, seeds {cfg['seeds']}; trained on "
        "en_ewt-ud-dev (10% held out picks the best epoch), tested on en_ewt-ud-test "
        "(UPOS token accuracy).",
        "",
        section_table(results, "lstm", lc["hidden"]),
        "",
        "## How each column is measured",
        "",
        "- **test acc**: mean ± sample sd over the seeds that finished; a diverged seed "
        "(NaN/Inf loss or gradient, mesimp's guard) is reported, not averaged.",
        "- **kept widths**: hidden widths per seed (distinct shapes), and kept % of units.",
        "- **train time**: seconds inside the training loop (evaluation excluded); for "
        "meSimp and Torch-Pruning all phases added. **time / dense**: per seed against "
        "the same seed's dense run (same process, run back to back).",
        f"- **backward speed-up**: {results.get('backward_method', '')}",
        "- **ORT**: onnxruntime speed-up over dense (P50 latency ratio, "
        f"{cfg['speed']['ort_threads']} thread, same precision: int8 vs int8 dense), "
        "models exported with `mesimp.export` and timed interleaved in one "
        "`mesimp.bench` run per seed; mean over seeds.",
        "",
        "## Plots",
        "",
        _plots_md(results),
        "",
        "## The papers' claims",
        "",
        "Rules (computed, not written by hand): *no loss* = mean test accuracy within "
        f"{100 * ACC_TOL:.1f} points of dense (a larger drop inside 2 standard errors of "
        "the difference is *inconclusive*); *A beats B* = difference above 2 standard "
        "errors (Welch), *does not hold* below -2 SE, otherwise *inconclusive*. The papers "
        "used MNIST and Penn Treebank, so the relative claims are compared, not raw "
        "accuracies.",
        "",
        claims_md(verdicts),
        section_md(plot=(results.get("plots") or {}).get("paper_tasks")),
        "## Machine",
        "",
        _machine_md(results),
        "",
    ]
    return "\n".join(out)


def _plots_md(results: dict[str, Any]) -> str:
    plots = results.get("plots") or {}
    if plots.get("note"):
        return f"Not drawn: {plots['note']}"
    out = []
    for key, title in (("acc_vs_params", "Accuracy vs parameters"), ("widths", "meSimp widths")):
        if plots.get(key):
            out.append(f"![{title}]({plots[key]})")
    return "\n\n".join(out) or "none"
