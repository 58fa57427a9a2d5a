"""Wall time per epoch of ``mesimp train`` on 1 process vs 2 (torchrun), interleaved.

    python -m benchmarks.ddp_epoch [--rounds 3] [--epochs 1] [--data DIR]

Fashion-MNIST, MLP 784-500-500-10, meSimp (unified k=60, --simplify), run as real
``mesimp train`` processes, configurations interleaved round by round (the machine is
shared and noisy). Per configuration: the median of ``train_time_s / epochs`` (the
loop's own clock: steps, evaluations and saves, not start-up) and of the whole
process's wall time, and both as a ratio to 1 process x 1 thread.

* ``1p x 1t``: one process, one thread, batch 50, row-sparse updates (the default);
* ``1p x 1t dense``: the same with dense updates (what DDP runs);
* ``1p x 2t``: one process, two threads;
* ``2p x 1t, b25``: two processes, one thread each, batch 25 each (global batch 50: the
  same training as one process with batch 50);
* ``2p x 1t, b50``: two processes, batch 50 each (global batch 100: half the steps).

The communication share of a DDP step is measured by ``benchmarks.ddp_comm``.
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

CONFIGS = {
    "1p x 1t": ["--threads", "1"],
    "1p x 1t dense": ["--threads", "1", "--dense-update"],
    "1p x 2t": ["--threads", "2"],
    "2p x 1t, b25": ["--nproc", "2", "--threads", "1", "--batch-size", "25"],
    "2p x 1t, b50": ["--nproc", "2", "--threads", "1"],
}


def run_once(args: list[str], out: Path, common: list[str]) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "mesimp.cli", "train", *common, *args, "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(proc.stdout)
    return doc["train_time_s"], wall, doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default=None)
    a = p.parse_args()
    common = ["--k", "60", "--simplify", "--epochs", str(a.epochs), "--no-progress"]
    if a.data:
        common += ["--data", a.data]
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    walls: dict[str, list[float]] = {n: [] for n in CONFIGS}
    acc: dict[str, list[float]] = {n: [] for n in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, args in CONFIGS.items():
                out = Path(tmp) / f"{r}-{name.replace(' ', '_').replace(',', '')}.pt"
                train_s, wall, doc = run_once(args, out, common)
                times[name].append(train_s / a.epochs)
                walls[name].append(wall)
                acc[name].append(doc["best"]["test_accuracy"])
                print(f"round {r + 1}: {name}: {train_s / a.epochs:.2f} s/epoch", file=sys.stderr)
    base_t = statistics.median(times["1p x 1t"])
    base_w = statistics.median(walls["1p x 1t"])
    print(f"\nmedian of {a.rounds} interleaved rounds, {a.epochs} epoch(s) each\n")
    print("| configuration | s / epoch | ÷ 1p x 1t | process wall s | ÷ 1p x 1t | test acc |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        t, w = statistics.median(times[name]), statistics.median(walls[name])
        print(
            f"| {name} | {t:.2f} | {t / base_t:.2f} | {w:.1f} | {w / base_w:.2f} "
            f"| {statistics.mean(acc[name]):.4f} |"
        )


if __name__ == "__main__":
    main()
