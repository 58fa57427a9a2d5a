"""Result rows, the rows a run must produce, and the completeness check.

Everything is a plain JSON-able dict, so ``results.json`` is the single source the
report and the plots are drawn from (and can be redrawn from).

A *row* is one method of one comparison::

    {"section": "mlp"|"lstm", "key": str, "label": str, "method": str,
     "status": "ok"|"diverged"|"skipped"|"failed", "reason": str|None,
     "runs": [run, ...], "backward": [{"phase": str, "ratio": float}, ...]|None,
     "ort": {"fp32_b1": float, ...}|None, "ort_note": str|None, "notes": [str]}

A *run* is one seed of a row::

    {"seed": int, "status": "ok"|"diverged"|"failed", "reason": str|None,
     "test_accuracy": float, "widths": [int], "params": int, "train_time_s": float,
     "time_ratio": float, "epoch": int?  (diverged: the epoch it diverged in)}

``check_results`` is what stops a broken run from being written up as a result: a
missing row, a missing seed, a NaN, or a skip without a reason is an error.
"""

from __future__ import annotations

import math
from typing import Any

OK, DIVERGED, SKIPPED, FAILED = "ok", "diverged", "skipped", "failed"
STATUSES = (OK, DIVERGED, SKIPPED, FAILED)

# (key, label) in table order; every full or quick run produces all of them.
MLP_ROWS: tuple[tuple[str, str], ...] = (
    ("dense", "dense"),
    ("meprop_topk", "meProp top-k (per example)"),
    ("meprop_unified", "meProp top-k (unified)"),
    ("random_k", "random-k"),
    ("msbp", "MSBP"),
    ("mesimp", "meSimp (+ shrink + fine-tune)"),
    ("dense_same", "dense at meSimp widths (scratch)"),
    ("tp", "Torch-Pruning magnitude (+ fine-tune)"),
)
LSTM_ROWS: tuple[tuple[str, str], ...] = (
    ("dense", "dense"),
    ("meprop", "meProp top-k (unified)"),
    ("mesimp", "meSimp (+ shrink)"),
    ("dense_same", "dense at meSimp width (scratch)"),
    ("tp", "Torch-Pruning magnitude"),
)
EXPECTED: dict[str, tuple[str, ...]] = {
    "mlp": tuple(k for k, _ in MLP_ROWS),
    "lstm": tuple(k for k, _ in LSTM_ROWS),
}
ORT_KEYS = ("fp32_b1", "fp32_b256", "int8_b1", "int8_b256")
_RUN_NUMBERS = ("test_accuracy", "params", "train_time_s", "time_ratio")


class IncompleteResults(ValueError):
    """The results miss a row or a seed, or hold a number that is not finite."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("incomplete results: " + "; ".join(problems))
        self.problems = problems


def new_row(section: str, key: str, method: str) -> dict[str, Any]:
    labels = dict(MLP_ROWS if section == "mlp" else LSTM_ROWS)
    return {
        "section": section,
        "key": key,
        "label": labels[key],
        "method": method,
        "status": OK,
        "reason": None,
        "runs": [],
        "backward": None,
        "ort": None,
        "ort_note": None,
        "notes": [],
    }


def skipped_row(section: str, key: str, method: str, reason: str) -> dict[str, Any]:
    row = new_row(section, key, method)
    row.update(status=SKIPPED, reason=reason)
    return row


def ok_run(
    seed: int, test_accuracy: float, widths: list[int], params: int, train_time_s: float
) -> dict[str, Any]:
    return {
        "seed": seed,
        "status": OK,
        "reason": None,
        "test_accuracy": float(test_accuracy),
        "widths": [int(w) for w in widths],
        "params": int(params),
        "train_time_s": float(train_time_s),
        "time_ratio": None,  # filled in by set_time_ratios, against the same seed's dense
    }


def bad_run(seed: int, status: str, reason: str, epoch: int | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {"seed": seed, "status": status, "reason": reason}
    if epoch is not None:
        run["epoch"] = epoch
    return run


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row's status from its runs: diverged/failed if any seed was."""
    if row["status"] in (SKIPPED, FAILED) and not row["runs"]:
        return row
    bad = [r for r in row["runs"] if r["status"] != OK]
    if bad:
        status = DIVERGED if any(r["status"] == DIVERGED for r in bad) else FAILED
        row["status"] = status
        row["reason"] = f"{len(bad)}/{len(row['runs'])} seeds {status}: " + "; ".join(
            f"seed {r['seed']}: {r['reason']}" for r in bad
        )
    return row


def set_time_ratios(rows: list[dict[str, Any]]) -> None:
    """``time_ratio`` = run's training time / the same seed's dense training time."""
    dense = next((r for r in rows if r["key"] == "dense"), None)
    base = {
        run["seed"]: run["train_time_s"]
        for run in (dense or {"runs": []})["runs"]
        if run["status"] == OK
    }
    for row in rows:
        for run in row["runs"]:
            if run["status"] == OK:
                b = base.get(run["seed"])
                run["time_ratio"] = run["train_time_s"] / b if b else None


def ok_runs(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in row["runs"] if r["status"] == OK]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_results(results: dict[str, Any]) -> list[str]:
    """Every problem that makes ``results`` unfit to report (empty list: fit)."""
    problems: list[str] = []
    seeds = results.get("config", {}).get("seeds") or []
    rows = results.get("rows")
    if not isinstance(rows, list):
        return ["no rows"]
    have = {(r.get("section"), r.get("key")): r for r in rows if isinstance(r, dict)}
    sections = results.get("config", {}).get("sections") or list(EXPECTED)
    for section, keys in EXPECTED.items():
        if section not in sections:
            continue
        for key in keys:
            row = have.get((section, key))
            where = f"{section}/{key}"
            if row is None:
                problems.append(f"{where}: row missing")
                continue
            problems += [f"{where}: {p}" for p in _check_row(row, seeds)]
    return problems


def _check_row(row: dict[str, Any], seeds: list[int]) -> list[str]:
    problems = []
    status = row.get("status")
    if status not in STATUSES:
        problems.append(f"unknown status {status!r}")
    if status != OK and not (isinstance(row.get("reason"), str) and row["reason"].strip()):
        problems.append(f"status {status} without a reason")
    runs = row.get("runs") or []
    if status in (SKIPPED, FAILED) and not runs:
        return problems  # explicitly not run, with a reason
    got = sorted(r.get("seed") for r in runs)
    if got != sorted(seeds):
        problems.append(f"runs for seeds {got}, expected {sorted(seeds)}")
    for run in runs:
        s = run.get("seed")
        if run.get("status") == OK:
            for name in _RUN_NUMBERS:
                if not _finite(run.get(name)):
                    problems.append(f"seed {s}: {name} = {run.get(name)!r} is not a finite number")
            widths = run.get("widths")
            if not (
                isinstance(widths, list)
                and widths
                and all(isinstance(w, int) and w > 0 for w in widths)
            ):
                problems.append(f"seed {s}: widths {widths!r}")
        elif run.get("status") in (DIVERGED, FAILED):
            if not (isinstance(run.get("reason"), str) and run["reason"].strip()):
                problems.append(f"seed {s}: {run.get('status')} without a reason")
        else:
            problems.append(f"seed {s}: unknown status {run.get('status')!r}")
    for b in row.get("backward") or []:
        if not _finite(b.get("ratio")):
            problems.append(f"backward ratio {b.get('phase')!r} = {b.get('ratio')!r}")
    ort = row.get("ort")
    if ort is not None:
        for k in ORT_KEYS:
            if not _finite(ort.get(k)):
                problems.append(f"ORT {k} = {ort.get(k)!r} is not a finite number")
    elif status == OK and not row.get("ort_note"):
        problems.append("no ORT numbers and no note saying why")
    return problems
