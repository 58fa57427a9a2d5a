"""Issue 15's bar at k=20, b=50 over several runs, each in a fresh process.

The whole-step ratios move by about ±10 % from one process to the next, with the dense
step they are divided into (README, "Compiled meProp kernels"). So one run cannot say
whether a bar holds. This runs ``benchmarks.meprop_speed --batch-sizes 50 --ks 20
--selections unified,topk`` N times in turn, each in its own process. It prints, per
run, the four bars, the dense step, the step ceiling and ``train_step``'s share of that
ceiling, then how many runs met each bar.

    python -m benchmarks.bar_runs --runs 5 --json benchmarks/bar_runs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text

# (label, selection, speedup key in meprop_speed's JSON, target)
BARS = (
    ("backward, loss.backward()", "unified", "backward_fused", 4.5),
    ("whole step, loss.backward()", "unified", "step_fused", 2.2),
    ("whole step, train_step", "unified", "step_train_step", 3.0),
    ("per-example top-k backward", "topk", "backward_fused", 2.0),
)


def one_run(rounds: int, quick: bool) -> dict:
    """One ``meprop_speed`` process at k=20, b=50; its bar values and context."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "benchmarks.meprop_speed", "--batch-sizes", "50"]
        cmd += ["--ks", "20", "--selections", "unified,topk", "--json", str(out)]
        cmd += ["--quick"] if quick else ["--rounds", str(rounds)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    by_sel = {r["selection"]: r for r in data["results"]}
    uni = by_sel["unified"]
    values = {label: by_sel[sel]["speedup"].get(key) for label, sel, key, _ in BARS}
    dense = min(uni["step_s"][uni["dense_baseline"]])
    train = min(uni["step_s"]["train_step"]) if "train_step" in uni["step_s"] else None
    return {
        "bars": values,
        "dense_step_ms": dense * 1e3,
        "gemm_floor_ms": min(uni["step_s"]["gemm_floor"]) * 1e3,
        "train_step_ms": None if train is None else train * 1e3,
        "step_ceiling": uni["step_ceiling"],
        "train_step_of_ceiling": None if train is None else (dense / train) / uni["step_ceiling"],
        "loadavg": [data["meta"]["loadavg_start"][0], data["meta"]["loadavg_end"][0]],
    }


def _cell(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(runs: list[dict]) -> str:
    head = ["run", *(f"{label} (≥ {t}×)" for label, _, _, t in BARS)]
    head += ["dense step ms", "ceiling", "train_step ÷ ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for i, r in enumerate(runs, 1):
        cells = [str(i), *(_cell(r["bars"][label], ".2f") + "x" for label, *_ in BARS)]
        cells += [f"{r['dense_step_ms']:.3f}", f"{r['step_ceiling']:.2f}x"]
        cells.append(_cell(r["train_step_of_ceiling"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, _, _, target in BARS:
        vals = [r["bars"][label] for r in runs]
        met = sum(v is not None and v >= target for v in vals)
        got = [v for v in vals if v is not None]
        span = f"{min(got):.2f}–{max(got):.2f}x" if got else "n/a"
        lines.append(f"- {label} ≥ {target}×: met in {met} of {len(runs)} runs ({span})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="processes, run in turn (default 5)")
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds per run")
    p.add_argument("--quick", action="store_true", help="meprop_speed --quick (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the runs here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1:
        p.error("--runs and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.rounds, args.quick))
        print(f"  run {i + 1}/{args.runs} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    cpu, capability = cpu_model(), torch.backends.cpu.get_cpu_capability()
    print(f"{cpu} ({capability}, {os.cpu_count()} CPUs)\n")
    print(markdown(runs))
    if args.json:
        meta = {"runs": args.runs, "rounds": args.rounds, "quick": args.quick}
        meta["cpus"] = os.cpu_count()
        meta["cpu_model"] = cpu
        meta["cpu_capability"] = capability
        atomic_write_text(args.json, json.dumps({"meta": meta, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
