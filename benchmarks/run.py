"""Regenerate benchmarks/RESULTS.md, its plots and results.json: every comparison, one command.

    python -m benchmarks.run [--quick] [--seeds 1,2,3] [--out benchmarks/RESULTS.md]
    python -m benchmarks.run --render   # redraw RESULTS.md + plots from the JSON files

A. MLP 784-500-500-10 on Fashion-MNIST: dense, meProp top-k (per example, unified),
   random-k, MSBP, meSimp (+ shrink + fine-tune), dense at the meSimp widths,
   Torch-Pruning to the meSimp widths (+ fine-tune); equal epochs, several seeds.
B. LSTM POS tagger on UD English EWT: dense, meProp, meSimp, dense at the meSimp
   width, Torch-Pruning (attempted).
C. Per row: test accuracy, widths, params, training time and its ratio to dense,
   backward-time ratio, onnxruntime speed-ups (fp32 / int8, batch 1 / 256).
D. Plots; E. the papers' claims and the project goals with computed verdicts;
F. the papers' own tasks (MNIST, full-EWT tagging, the parser), drawn from the runs
   files their long commands commit (``benchmarks.suite.paper_tasks``).

``--render`` runs nothing: it rebuilds RESULTS.md and the plots from ``results.json``
and the paper tasks' runs files (seconds), e.g. after a paper task's long run.

``--out`` is the Markdown file (or a directory for RESULTS.md); the PNGs and
results.json go next to it. ``--quick`` is CI-sized (about a minute on 2 cores, 1
seed, tiny subsets and widths) and refuses to write into benchmarks/, so it can
never overwrite the committed results. Exit status 1 when the results are
incomplete (a row or seed missing, a number not finite); RESULTS.md then lists the
problems at the top.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite import tp
from benchmarks.suite.config import SuiteConfig, full_config, quick_config
from benchmarks.suite.lstm import run_lstm
from benchmarks.suite.mlp import run_mlp
from benchmarks.suite.plots import draw
from benchmarks.suite.report import PLOTS, build_report
from benchmarks.suite.results import check_results
from benchmarks.suite.speed import BACKWARD_METHOD
from mesimp.deploy.bench import machine_info
from mesimp.files.atomic import atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "RESULTS.md"
SECTIONS = ("mlp", "lstm")


class UsageError(ValueError):
    pass


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--seeds takes integers like 1,2,3, got {text!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run (needs --out)")
    p.add_argument("--seeds", type=_seeds, help="default 1,2,3 (full) or 1 (quick)")
    p.add_argument("--out", help=f"RESULTS.md path or a directory (default {DEFAULT_OUT})")
    p.add_argument("--sections", default=",".join(SECTIONS), help="mlp,lstm (default both)")
    p.add_argument("--mlp-epochs", type=int, help="override the MLP epochs (budgeting)")
    p.add_argument("--lstm-epochs", type=int, help="override the LSTM epochs (budgeting)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--render", action="store_true", help="redraw from results.json, run nothing")
    p.add_argument("--work", help="keep checkpoints and ONNX files here (default: a temp dir)")
    return p.parse_args(argv)


def resolve_out(out: str | None, quick: bool) -> Path:
    """The RESULTS.md path; a quick run may not write into benchmarks/ at all."""
    path = Path(out) if out else DEFAULT_OUT
    if path.suffix.lower() != ".md":
        path = path / "RESULTS.md"
    if quick and path.resolve().parent == BENCH_DIR:
        raise UsageError(
            "--quick never writes into benchmarks/ (the committed results): give --out DIR"
        )
    return path


def make_config(args: argparse.Namespace) -> SuiteConfig:
    cfg = quick_config(args.seeds) if args.quick else full_config(args.seeds)
    cfg.threads = args.threads
    if args.mlp_epochs:
        cfg.mlp.epochs = args.mlp_epochs
    if args.lstm_epochs:
        cfg.lstm.epochs = args.lstm_epochs
    return cfg


def _jsonable(x: Any) -> Any:
    """NaN/Inf become None, so results.json is strict JSON (check_results flags them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _logger() -> Callable[[str], None]:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    return log


def run_suite(
    cfg: SuiteConfig, sections: list[str], work: Path, command: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run the comparisons; returns the results dict (no files written but ``work``)."""
    torch.set_num_threads(cfg.threads)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "format": "mesimp.benchmark-suite",
        "version": 1,
        "command": command,
        "started": started,
        "config": {**cfg.to_dict(), "sections": sections},
        "backward_method": BACKWARD_METHOD,
        "rows": [],
    }
    for name, fn in (("mlp", run_mlp), ("lstm", run_lstm)):
        if name in sections:
            (work / name).mkdir(parents=True, exist_ok=True)
            part = fn(cfg, work / name, log)
            results["rows"] += part.pop("rows")
            results[name] = part
    results["elapsed_s"] = time.perf_counter() - t0
    results["machine"] = {
        **machine_info(),
        "torch": torch.__version__,
        "torch_pruning": tp.version(),
        "threads": cfg.threads,
        "loadavg_start": [round(v, 2) for v in load0],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    return results


def write_outputs(results: dict[str, Any], md: Path) -> list[str]:
    """Plots, RESULTS.md and results.json (in that order; all atomic); returns problems."""
    out_dir = md.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = draw(results, out_dir, PLOTS)
    problems = check_results(results)
    results["problems"] = problems
    text = build_report(results, strict=False)  # lists the problems at the top, if any
    atomic_write_text(out_dir / "results.json", json.dumps(_jsonable(results), indent=1))
    atomic_write_text(md, text)
    return problems


def render(md: Path, log: Callable[[str], None]) -> int:
    """RESULTS.md and the plots again from ``results.json`` next to ``md``; runs nothing."""
    src = md.parent / "results.json"
    if not src.is_file():
        print(f"error: --render needs {src} (run the suite first)", file=sys.stderr)
        return 2
    problems = write_outputs(json.loads(src.read_text()), md)
    log(f"redrew {md} and the plots from {src}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        md = resolve_out(args.out, args.quick)
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if not sections or any(s not in SECTIONS for s in sections):
            raise UsageError(f"--sections takes a subset of {','.join(SECTIONS)}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = _logger()
    if args.render:
        return render(md, log)
    cfg = make_config(args)
    command = "python -m benchmarks.run" + (" " + shlex.join(argv) if argv else "")
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results = run_suite(cfg, sections, work, command, log)
    else:
        with tempfile.TemporaryDirectory(prefix="mesimp-bench-") as tmp:
            results = run_suite(cfg, sections, Path(tmp), command, log)
    problems = write_outputs(results, md)
    log(f"wrote {md}, {md.parent / 'results.json'} and the plots")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
