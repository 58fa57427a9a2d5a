"""The papers' own tasks on the papers' data: MNIST, POS tagging on full UD EWT, the parser.

Each task is trained by its own long command (``python -m benchmarks.mnist_paper``,
``benchmarks.tagger_paper``, ``benchmarks.parser_paper``), which writes a *runs file*
next to this package: a JSON list with one object per (row, seed)::

    {"row": str, "seed": int, "test": float (fraction), "widths": [int]?, "error": str?,
     ...other metrics (e.g. "las")}

This module turns those files into the "Papers' tasks" section of RESULTS.md (its plot
is ``benchmarks.suite.plots.paper_tasks``), with the verdicts computed by the same rules
as the Fashion-MNIST claims (``benchmarks.suite.claims``). It runs nothing, so
``python -m benchmarks.run --render`` redraws everything in seconds.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.suite.claims import beats, no_loss, smaller_than
from benchmarks.suite.results import DIVERGED, OK

BENCH_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    name: str  # the "row" field of the runs file
    label: str
    paper: str = ""  # the paper's number on its data, as printed there
    paper_acc: float | None = None  # its metric, for the plot

    @classmethod
    def with_paper(cls, name: str, label: str, paper: str) -> Row:
        """A row whose paper text starts with the paper's metric (e.g. "98.31 at ...")."""
        return cls(name, label, paper, float(paper.split()[0]))


@dataclass(frozen=True)
class Claim:
    kind: str  # "no_loss" (a vs b), "beats" (a vs b) or "smaller" (a's kept share, no loss vs b)
    title: str  # groups items under the claims of benchmarks.suite.claims.PAPER
    setting: str
    a: str
    b: str
    paper_kept: float = 0.0  # "smaller": the paper's kept share


@dataclass(frozen=True)
class PaperTask:
    key: str
    title: str
    runs_file: str
    detail: str  # the long command's own write-up
    protocol: str
    metric: str  # the run field the verdicts judge
    metric_label: str
    full_width: int
    rows: tuple[Row, ...]
    claims: tuple[Claim, ...]
    extra_metrics: tuple[tuple[str, str], ...] = ()  # (run field, column label)
    # where the runs file keeps its runs and names their fields (the scripts differ)
    runs_at: str | None = None  # the key of the runs in a JSON object (default "runs")
    more_files: tuple[str, ...] = ()  # further runs files of the same task
    row_field: str = "row"
    widths_field: str = "widths"


NO_LOSS = "meProp: a few % of the gradient loses no accuracy"
SMALLER = "meSimp: a much smaller model with no accuracy loss"
MSBP = "MSBP beats plain sparse backprop at the same k"
RANDOM = "top-k beats random-k"
SAME = "meSimp beats a dense net of the same size trained from scratch"

TASKS: tuple[PaperTask, ...] = (
    PaperTask(
        key="mnist",
        title="MNIST (meProp, meSimp)",
        runs_file="mnist_paper.json",
        more_files=("mnist_mesimp_ref.json",),
        detail="MNIST.md",
        protocol="MLP 784-500-500-10 on the original MNIST, batch 100, 20 epochs, dev = the "
        "first 5,000 training images checked 8 times an epoch, test accuracy at the best dev "
        "check. `ref` rows: `--reference` (the C# code's semantics; its meSimp: per-example "
        "top-160 through the C# heap, rate 0.1, 5-epoch cycles, Adam's moments zeroed in each "
        "cycle's last epoch); `mesimp` rows: mesimp's defaults. Kept widths are those of the "
        "checkpoint tested (best dev); the C# meSimp's final widths (149-153 / 119-137) and "
        "the ablations' are in MNIST.md.",
        metric="test",
        metric_label="test accuracy %",
        full_width=500,
        rows=(
            Row.with_paper("ref dense", "ref dense", "98.20"),
            Row("ref topk20", "ref per-example top-20"),
            Row.with_paper("ref topk80", "ref per-example top-80", "98.27"),
            Row("ref unified20", "ref unified top-20"),
            Row("ref random20", "ref random-20"),
            Row("ref msbp topk20 0.8", "ref MSBP (top-20, alpha 0.8)"),
            Row.with_paper(
                "ref meSimp topk160 r0.1", "ref meSimp (the C# code)", "98.31 at 500 -> 154"
            ),
            Row("ref meSimp topk160 r0.1 no-fill", "ref meSimp, heap fills not counted"),
            Row("ref meSimp topk160 r0.1 no-reset", "ref meSimp, no Adam resets"),
            Row("ref meSimp topk160 r0.1 fresh-adam", "ref meSimp, resets zero t too"),
            Row("ref dense 149-124", "ref dense at 149-124 (from scratch)"),
            Row("mesimp dense", "mesimp dense"),
            Row("mesimp topk20", "mesimp per-example top-20"),
            Row("mesimp topk80", "mesimp per-example top-80"),
            Row("mesimp unified20", "mesimp unified top-20"),
            Row("mesimp meSimp unified60 r0.01", "mesimp meSimp (unified 60, rate 0.01)"),
        ),
        claims=(
            Claim(
                "no_loss",
                NO_LOSS,
                "ref top-80 vs ref dense (the paper's)",
                "ref topk80",
                "ref dense",
            ),
            Claim("no_loss", NO_LOSS, "ref top-20 vs ref dense", "ref topk20", "ref dense"),
            Claim(
                "no_loss", NO_LOSS, "ref unified top-20 vs ref dense", "ref unified20", "ref dense"
            ),
            Claim(
                "no_loss",
                NO_LOSS,
                "mesimp unified top-20 vs mesimp dense",
                "mesimp unified20",
                "mesimp dense",
            ),
            Claim(
                "smaller",
                SMALLER,
                "ref meSimp, the C# code (paper: 30.8% kept)",
                "ref meSimp topk160 r0.1",
                "ref dense",
                0.308,
            ),
            Claim(
                "smaller",
                SMALLER,
                "ref meSimp, heap fills not counted",
                "ref meSimp topk160 r0.1 no-fill",
                "ref dense",
                0.308,
            ),
            Claim(
                "smaller",
                SMALLER,
                "mesimp meSimp (paper: 30.8% kept)",
                "mesimp meSimp unified60 r0.01",
                "mesimp dense",
                0.308,
            ),
            Claim("beats", MSBP, "ref MSBP vs ref top-20", "ref msbp topk20 0.8", "ref topk20"),
            Claim("beats", RANDOM, "ref top-20 vs ref random-20", "ref topk20", "ref random20"),
            Claim(
                "beats",
                RANDOM,
                "ref unified top-20 vs ref random-20",
                "ref unified20",
                "ref random20",
            ),
            Claim(
                "beats",
                SAME,
                "ref meSimp vs ref dense at 149-124 (seed 1's final widths)",
                "ref meSimp topk160 r0.1",
                "ref dense 149-124",
            ),
        ),
    ),
    PaperTask(
        key="tagger",
        title="POS tagging on full UD EWT (meProp, meSimp)",
        runs_file="tagger.json",
        detail="TAGGER.md",
        protocol="BiLSTM tagger, 500 units per direction, word embedding 100 + suffix-3 and "
        "shape features, trained on en_ewt-ud-train, best of 6 dev checks on en_ewt-ud-dev, "
        "UPOS accuracy on en_ewt-ud-test. Dropout 0.3, Adam 2e-3, batch 32, 3 epochs, 1 seed. "
        "The paper's numbers are on its own data (Penn Treebank WSJ).",
        metric="test",
        metric_label="test UPOS %",
        full_width=500,
        runs_at="rows",
        rows=(
            Row.with_paper("dense", "dense BiLSTM 500", "97.22"),
            Row.with_paper("topk10", "meProp per-example top-10", "97.25"),
            Row("topk20", "meProp per-example top-20"),
            Row("unified10", "meProp unified top-10"),
            Row.with_paper("mesimp", "meSimp (unified top-20) + shrink", "97.25 at 500 -> 60"),
            Row("samewidth", "dense at meSimp's widths"),
        ),
        claims=(
            Claim("no_loss", NO_LOSS, "top-10 vs dense (the paper's)", "topk10", "dense"),
            Claim("no_loss", NO_LOSS, "top-20 vs dense", "topk20", "dense"),
            Claim("no_loss", NO_LOSS, "unified top-10 vs dense", "unified10", "dense"),
            Claim("smaller", SMALLER, "meSimp (paper: 12.0% kept)", "mesimp", "dense", 0.12),
            Claim("beats", SAME, "meSimp vs dense at its widths", "mesimp", "samewidth"),
        ),
    ),
    PaperTask(
        key="parser",
        title="Dependency parsing on UD EWT (meProp, meSimp)",
        runs_file="parser_paper.json",
        detail="PARSER.md",
        protocol="Chen & Manning style arc-standard parser (48 word/POS/label features, "
        "embeddings 50, one hidden layer, ReLU), trained on en_ewt-ud-train from the static "
        "oracle, picked on dev transition accuracy, UAS/LAS on en_ewt-ud-test (every token, "
        "punctuation included; gold UPOS features). Adam 1e-3, batch 256, 3 epochs, 1 seed. "
        "The paper's numbers are on the Penn Treebank.",
        metric="test_uas",
        metric_label="test UAS %",
        full_width=500,
        extra_metrics=(("test_las", "test LAS %"),),
        runs_at="runs",
        row_field="name",
        widths_field="active_widths",
        rows=(
            Row.with_paper("dense 500", "dense 500", "89.80 (PTB)"),
            Row.with_paper(
                "meProp top-20", "meProp per-example top-20", "88.94 as printed (+0.04 claimed)"
            ),
            Row("meSimp top-20", "meSimp (top-20) + shrink", "500 -> 51, no loss"),
            Row("dense 149 (same width)", "dense at meSimp's width"),
            Row("meProp top-20, unified", "unified top-20 (diagnostic)"),
            Row("meProp top-20, AdaGrad lr 0.01", "per-example top-20, AdaGrad (diagnostic)"),
        ),
        claims=(
            Claim(
                "no_loss",
                NO_LOSS,
                "top-20 vs dense 500 (the paper's)",
                "meProp top-20",
                "dense 500",
            ),
            Claim(
                "no_loss",
                NO_LOSS,
                "unified top-20 vs dense 500",
                "meProp top-20, unified",
                "dense 500",
            ),
            Claim(
                "smaller",
                SMALLER,
                "meSimp (paper: 10.2% kept)",
                "meSimp top-20",
                "dense 500",
                0.102,
            ),
            Claim(
                "beats",
                SAME,
                "meSimp vs dense at its width",
                "meSimp top-20",
                "dense 149 (same width)",
            ),
        ),
    ),
)


def _runs_in(data: Any, runs_at: str | None) -> Any:
    """A runs file's run list: the file itself, or its ``runs_at`` (default "runs") entry,
    a dict of runs by row name counting as the list of its values."""
    runs = data.get(runs_at or "runs") if isinstance(data, dict) else data
    return list(runs.values()) if isinstance(runs, dict) else runs


def load_runs(task: PaperTask, bench_dir: Path = BENCH_DIR) -> list[dict[str, Any]] | None:
    """The task's runs (from every one of its files) in the format above; None if never run."""
    out = []
    for name in (task.runs_file, *task.more_files):
        path = bench_dir / name
        if not path.is_file():
            continue
        runs = _runs_in(json.loads(path.read_text()), task.runs_at)
        if not isinstance(runs, list) or not all(
            isinstance(r, dict) and task.row_field in r for r in runs
        ):
            raise ValueError(f"{path}: expected a list of runs with a {task.row_field!r} field")
        out += [
            {
                **r,
                "row": r[task.row_field],
                "seed": r.get("seed", 1),
                "widths": r.get(task.widths_field),
            }
            for r in runs
        ]
    return out or None


def suite_row(runs: list[dict[str, Any]], name: str, metric: str) -> dict[str, Any] | None:
    """The runs of one row in the suite's row format, so the suite's verdicts apply."""
    mine = [r for r in runs if r["row"] == name]
    if not mine:
        return None
    out = []
    for r in mine:
        if r.get("error") or r.get(metric) is None or not math.isfinite(r[metric]):
            out.append({"seed": r["seed"], "status": DIVERGED, "reason": r.get("error")})
        else:
            out.append(
                {
                    "seed": r["seed"],
                    "status": OK,
                    "test_accuracy": float(r[metric]),
                    "widths": r.get("widths"),
                }
            )
    status = OK if any(r["status"] == OK for r in out) else DIVERGED
    return {
        "status": status,
        "reason": None if status == OK else "every seed diverged",
        "runs": out,
    }


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def _widths(runs: list[dict[str, Any]]) -> str:
    shapes = []
    for r in runs:
        w = "-".join(str(x) for x in r.get("widths") or [])
        if w and w not in shapes:
            shapes.append(w)
    return " / ".join(shapes) or "-"


def verdict(task: PaperTask, runs: list[dict[str, Any]], claim: Claim) -> dict[str, Any]:
    a, b = suite_row(runs, claim.a, task.metric), suite_row(runs, claim.b, task.metric)
    if claim.kind == "no_loss":
        return no_loss(a, b)
    if claim.kind == "beats":
        return beats(a, b)
    return smaller_than(a, b, task.full_width, claim.paper_kept)


def task_md(task: PaperTask, runs: list[dict[str, Any]] | None) -> str:
    """One task's table of rows (ours next to the paper's) and its verdicts."""
    out = [f"### {task.title}", ""]
    if runs is None:
        cmd = task.runs_file.replace(".json", "")
        return "\n".join(out + [f"Not run yet: `python -m benchmarks.{cmd}`.", ""])
    out += [f"{task.protocol} Details: [{task.detail}]({task.detail}).", ""]
    extra = "".join(f" {label} |" for _, label in task.extra_metrics)
    out += [
        f"| row | {task.metric_label} (mean ± sd) |{extra} seeds | kept widths | paper |",
        "|---|---:|" + "---:|" * len(task.extra_metrics) + "---:|---|---|",
    ]
    for row in task.rows:
        mine = [r for r in runs if r["row"] == row.name]
        if not mine:
            continue
        ok = [r for r in mine if not r.get("error") and r.get(task.metric) is not None]
        bad = len(mine) - len(ok)
        cells = [_mean_sd([100 * r[task.metric] for r in ok]) + (f" ({bad} failed)" if bad else "")]
        cells += [
            _mean_sd([100 * r[f] for r in ok if r.get(f) is not None])
            for f, _ in task.extra_metrics
        ]
        cells += [str(len(ok)), _widths(ok), row.paper]
        out.append(f"| {row.label} | " + " | ".join(cells) + " |")
    out += ["", "| claim | setting | ours (method vs reference) | verdict |", "|---|---|---|---|"]
    for claim in task.claims:
        v = verdict(task, runs, claim)
        out.append(f"| {claim.title} | {claim.setting} | {v['ours']} | {v['verdict']} |")
    return "\n".join(out + [""])


def done_tasks(bench_dir: Path = BENCH_DIR) -> list[tuple[PaperTask, list[dict[str, Any]]]]:
    """The tasks whose runs file exists, with their runs."""
    return [(t, r) for t in TASKS if (r := load_runs(t, bench_dir))]


def section_md(bench_dir: Path = BENCH_DIR, plot: str | None = None) -> str:
    """The whole "Papers' tasks" section of RESULTS.md."""
    out = [
        "## The papers' tasks on the papers' data",
        "",
        "Each task runs as its own long command (they do not fit in this suite's hour on 2 "
        "cores) and commits its runs file; the verdicts below use the rules of the claims "
        "section, computed from those files.",
        "",
    ]
    for task in TASKS:
        out.append(task_md(task, load_runs(task, bench_dir)))
    if plot:
        out += [f"![The papers' tasks]({plot})", ""]
    return "\n".join(out)
