"""Issue 29's bars over several runs, each in a fresh process; the verdict on the medians.

The ratios move by about ±10 % from one process to the next, with the dense step they are
divided into (README, "Compiled meProp kernels"), so one run cannot say whether a bar
holds. Each run here is two fresh processes:

* ``benchmarks.meprop_speed --batch-sizes 50 --ks 20 --selections unified,topk
  --threads 1,2`` (mesimp's MLP 784-500-500-10: the fused path, ``train_step``);
* ``benchmarks.dropin_speed --hidden 500,4000 --threads 1,2 --fused-adamw`` (a user's
  ``nn.Sequential`` made meProp with ``meprop_``, dense gradients, stock AdamW).

It prints each run's values, then per bar the median over the runs and whether it meets
the target. The 2-thread bars compare each ratio with its own 1-thread value, measured in
the same process.

    python -m benchmarks.bar_runs --runs 5 --json benchmarks/bar_runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text

# the meProp ratios that must keep 0.9 of their 1-thread value at 2 threads
SCALING = ("backward", "step_fused", "step_train_step", "topk_backward")
WIDTHS = (500, 4000)  # the drop-in's narrow and wide H


def bars(widths: tuple[int, int] = WIDTHS) -> tuple[tuple[str, str, float], ...]:
    """(label, value key in a run's "values", target); a value is a ratio or a share."""
    small, large = widths
    return (
        ("train_step ÷ step ceiling (1 thread)", "train_step_of_ceiling/1", 0.85),
        ("backward, loss.backward() (1 thread)", "backward/1", 5.0),
        ("whole step, fused, loss.backward() (1 thread)", "step_fused/1", 2.2),
        ("per-example top-k backward (1 thread)", "topk_backward/1", 3.0),
        (f"drop-in backward, H={small} (1 thread)", f"dropin_backward_{small}/1", 4.0),
        (f"drop-in backward, H={small} (2 threads)", f"dropin_backward_{small}/2", 3.0),
        (f"drop-in backward, H={large} (1 thread)", f"dropin_backward_{large}/1", 20.0),
        (f"drop-in whole step ÷ its cap, H={small} (1 thread)", f"dropin_of_cap_{small}/1", 0.8),
        (f"drop-in whole step ÷ its cap, H={large} (1 thread)", f"dropin_of_cap_{large}/1", 0.8),
        *((f"{name} at 2 threads ÷ at 1", f"{name}/2÷1", 0.9) for name in SCALING),
    )


BARS = bars()


def _speed_run(quick: bool, rounds: int, threads: str) -> dict:
    """One ``meprop_speed`` process; the values the bars read, per thread count."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "benchmarks.meprop_speed", "--batch-sizes", "50"]
        cmd += ["--ks", "20", "--selections", "unified,topk", "--threads", threads]
        cmd += ["--json", str(out), *(["--quick"] if quick else ["--rounds", str(rounds)])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    values: dict[str, float | None] = {}
    for r in data["results"]:
        t = r["threads"]
        s = r["speedup"]
        if r["selection"] == "topk":
            values[f"topk_backward/{t}"] = s.get("backward_fused")
            continue
        values[f"backward/{t}"] = s.get("backward_fused")
        values[f"step_fused/{t}"] = s.get("step_fused")
        values[f"step_train_step/{t}"] = s.get("step_train_step")
        dense = min(r["step_s"][r["dense_baseline"]])
        values[f"dense_step_ms/{t}"] = dense * 1e3
        values[f"step_ceiling/{t}"] = r["step_ceiling"]
        train = s.get("step_train_step")
        values[f"train_step_of_ceiling/{t}"] = None if train is None else train / r["step_ceiling"]
    return values


def _dropin_run(quick: bool, rounds: int, widths: tuple[int, int], threads: str) -> dict:
    """One ``dropin_speed`` process at the two widths."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "benchmarks.dropin_speed"]
        cmd += ["--hidden", ",".join(map(str, widths))]
        cmd += ["--threads", threads, "--fused-adamw", "--json", str(out)]
        cmd += ["--quick"] if quick else ["--rounds", str(rounds)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    values: dict[str, float | None] = {}
    for t, rs in data["threads"].items():
        for r in rs:
            h = r["hidden"]
            values[f"dropin_backward_{h}/{t}"] = r["backward"]["drop-in"]["min"]
            values[f"dropin_step_{h}/{t}"] = r["step"]["drop-in"]["min"]
            values[f"dropin_cap_{h}/{t}"] = r["cap"]
            values[f"dropin_of_cap_{h}/{t}"] = r["of_cap"]["drop-in"]
    return values


def one_run(
    rounds: int,
    quick: bool,
    dropin_rounds: int,
    widths: tuple[int, int] = WIDTHS,
    threads: str = "1,2",
) -> dict:
    values = _speed_run(quick, rounds, threads)
    values |= _dropin_run(quick, dropin_rounds, widths, threads)
    for name in SCALING:
        one, two = values.get(f"{name}/1"), values.get(f"{name}/2")
        values[f"{name}/2÷1"] = None if one is None or two is None else two / one
    return {"values": values, "loadavg": os.getloadavg()[0]}


def _median(runs: list[dict], key: str) -> float | None:
    got = [r["values"].get(key) for r in runs]
    got = [v for v in got if v is not None]
    return statistics.median(got) if got else None


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown(runs: list[dict], widths: tuple[int, int] = WIDTHS) -> str:
    head = ["bar", "target", *(f"run {i}" for i in range(1, len(runs) + 1)), "median", "met"]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for label, key, target in bars(widths):
        med = _median(runs, key)
        met = "n/a" if med is None else ("yes" if med >= target else "**no**")
        cells = [label, f"≥ {target}", *(_cell(r["values"].get(key)) for r in runs)]
        lines.append("| " + " | ".join([*cells, _cell(med), met]) + " |")
    lines.append("")
    for key, what in (
        ("dense_step_ms/1", "dense step ms (MLP, 1 thread)"),
        ("step_ceiling/1", "step ceiling (1 thread)"),
        ("dense_step_ms/2", "dense step ms (MLP, 2 threads)"),
        (f"dropin_cap_{widths[0]}/1", f"drop-in step cap, H={widths[0]} (1 thread)"),
        (f"dropin_cap_{widths[1]}/1", f"drop-in step cap, H={widths[1]} (1 thread)"),
    ):
        vals = ", ".join(_cell(r["values"].get(key)) for r in runs)
        lines.append(f"- {what}: {vals}")
    loads = ", ".join(f"{r['loadavg']:.2f}" for r in runs)
    lines.append(f"- 1-min load average after each run: {loads}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="runs, each in fresh processes")
    p.add_argument("--rounds", type=int, default=25, help="meprop_speed's interleaved rounds")
    p.add_argument("--dropin-rounds", type=int, default=8, help="dropin_speed's rounds")
    p.add_argument("--quick", action="store_true", help="smoke test: --quick children")
    p.add_argument(
        "--dropin-hidden", default="500,4000", help="the drop-in's two widths (default 500,4000)"
    )
    p.add_argument(
        "--threads",
        default="1,2",
        choices=["1", "2", "1,2"],
        help="thread counts to measure (default 1,2; the 2-thread bars need both)",
    )
    p.add_argument("--json", metavar="FILE", help="write the runs here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.dropin_rounds < 1:
        p.error("--runs, --rounds and --dropin-rounds must be at least 1")
    try:
        small, large = (int(v) for v in args.dropin_hidden.split(","))
    except ValueError:
        p.error("--dropin-hidden takes two widths, e.g. 500,4000")
    args.widths = (small, large)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.rounds, args.quick, args.dropin_rounds, args.widths, args.threads))
        print(f"  run {i + 1}/{args.runs} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    cpu, capability = cpu_model(), torch.backends.cpu.get_cpu_capability()
    print(f"{cpu} ({capability}, {os.cpu_count()} CPUs)\n")
    print(markdown(runs, args.widths))
    if args.json:
        meta = {"runs": args.runs, "rounds": args.rounds, "dropin_rounds": args.dropin_rounds}
        meta["dropin_hidden"] = list(args.widths)
        meta["threads"] = args.threads
        meta |= {"quick": args.quick, "cpus": os.cpu_count(), "cpu_model": cpu}
        meta["cpu_capability"] = capability
        meta["elapsed_s"] = time.perf_counter() - t0
        atomic_write_text(args.json, json.dumps({"meta": meta, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
