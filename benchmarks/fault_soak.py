"""Fault soak: SIGKILL ``mesimp train`` at random moments, resume, compare (not run in CI).

    python -m benchmarks.fault_soak [--trials 20] [--kills 3] [--seed 0] [--data PATH]
        [--keep DIR] [--json FILE]

Each trial starts a short training run in a subprocess and kills it with SIGKILL at a
random moment (start-up, training, a checkpoint write, shutdown: anything), up to
``--kills`` times. After every kill it checks that each file the run left (RUN.pt,
RUN.last.pt, RUN.metrics.jsonl) is whole, then restarts: ``--resume RUN.last.pt`` if the
run wrote one, else the same command from scratch. At the end it compares the trial's
final files with an uninterrupted run of the same configuration: every tensor of RUN.pt
and RUN.last.pt (``--keep-last``: weights, counters, masks, optimizer state, RNG
states, MSBP memory) with ``torch.equal``, and every metrics record (wall-clock fields
aside). Three configurations take turns: unified + MSBP + meSimp, per-example top-k +
MSBP, random-k + meSimp + dropout. Everything runs with one thread (``--threads 1``),
so it is exact on CPU.

Prints: trials, kills, restarts, resumes, identical, corrupt (a file that did not load
after a kill), the kills that hit a process that had already written RUN.last.pt (so
was training; the others hit start-up or the first steps), the kills that left a temp
file (so hit a write), and the temp files left at the end (the next start removes
them). Exit code 1 unless every trial is identical and nothing was corrupt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp.files.checkpoint import load_checkpoint

FMNIST = Path("/usr/share/datasets/fashion-mnist")
COMMON = [
    "--hidden", "256,256", "--epochs", "10", "--batch-size", "50", "--dev-size", "500",
    "--evals-per-epoch", "2", "--save-every", "25", "--seed", "7", "--threads", "1",
    "--keep-last", "--no-progress",
]  # fmt: skip
CONFIGS = {
    "unified-msbp-mesimp": [
        "--k", "16", "--selection", "unified", "--msbp", "0.5",
        "--simplify", "--prune-rate", "0.05", "--simplify-per-epoch", "3",
    ],
    "topk-msbp": ["--k", "16", "--selection", "topk", "--msbp", "0.8"],
    "random-mesimp-dropout": [
        "--k", "12", "--selection", "random", "--dropout", "0.1",
        "--simplify", "--prune-rate", "0.05",
    ],
}  # fmt: skip
WALL_CLOCK = {"elapsed_s", "train_time_s", "output"}


def small_npz(path: Path) -> Path:
    """6000 training and 2000 test images of the real Fashion-MNIST."""
    from mesimp.data import load_idx

    def idx(stem: str) -> np.ndarray:
        for name in (f"{stem}.gz", stem):
            if (FMNIST / name).is_file():
                return load_idx(FMNIST / name)
        sys.exit(f"error: Fashion-MNIST not found under {FMNIST}; pass --data")

    np.savez(
        path,
        x_train=idx("train-images-idx3-ubyte")[:6000],
        y_train=idx("train-labels-idx1-ubyte")[:6000],
        x_test=idx("t10k-images-idx3-ubyte")[:2000],
        y_test=idx("t10k-labels-idx1-ubyte")[:2000],
    )
    return path


def command(data: Path, config: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from mesimp.cli.main import main; main()",
        "train",
        "--data",
        str(data),
        *COMMON,
        *CONFIGS[config],
        "-o",
        str(out),
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as f:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)


def files_whole(out: Path) -> list[str]:
    """The run's files that exist but do not load (empty list: all whole)."""
    bad = []
    for p in (out, out.with_name(out.stem + ".last.pt")):
        if p.exists():
            try:
                load_checkpoint(p)
            except Exception as e:  # noqa: BLE001 - any failure to load is corruption
                bad.append(f"{p.name}: {e}")
    log = out.with_name(out.stem + ".metrics.jsonl")
    if log.exists():
        try:
            for line in log.read_text().splitlines():
                json.loads(line)
        except ValueError as e:
            bad.append(f"{log.name}: {e}")
    return bad


def same(a: Any, b: Any, where: str = "") -> str | None:
    """None if equal (tensors bit for bit), else where they first differ."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return None if ok else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return where
        for k in a:
            if k not in WALL_CLOCK and (d := same(a[k], b[k], f"{where}.{k}")):
                return d
        return None
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if d := same(x, y, f"{where}[{i}]"):
                return d
        return None
    return None if (a == b or (a != a and b != b)) else where


def final_state(out: Path) -> dict[str, Any]:
    log = out.with_name(out.stem + ".metrics.jsonl")
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return {
        "best": torch.load(out, weights_only=True),
        "last": torch.load(out.with_name(out.stem + ".last.pt"), weights_only=True),
        "records": records,
    }


def mtime(p: Path) -> int | None:
    return p.stat().st_mtime_ns if p.exists() else None


def trial(
    data: Path, config: str, out: Path, kills: int, horizon: float, rng: random.Random
) -> dict[str, Any]:
    cmd = command(data, config, out)
    last = out.with_name(out.stem + ".last.pt")
    stats: dict[str, Any] = {"kills": 0, "kills_after_a_save": 0, "kills_mid_write": 0}
    stats.update(restarts=0, resumes=0, corrupt=[])
    proc = start(cmd, out.with_name("stderr.log"))
    started = mtime(last)
    while True:
        if stats["kills"] < kills:
            try:
                # a whole run takes ~horizon s: 0.9 so that the first kill nearly always lands
                rc = proc.wait(timeout=rng.uniform(0.0, 0.9 * horizon))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                stats["kills"] += 1
                # the killed process was training: it had written RUN.last.pt at least once
                stats["kills_after_a_save"] += mtime(last) != started
                # a temp file left behind: the kill landed in the middle of a write
                stats["kills_mid_write"] += bool(list(out.parent.glob(".*.tmp")))
                stats["corrupt"] += files_whole(out)
                resume = last.exists()
                stats["restarts"] += 1
                stats["resumes"] += resume
                proc = start(
                    cmd[:4] + ["--resume", str(last), "--no-progress"] if resume else cmd,
                    out.with_name("stderr.log"),
                )
                started = mtime(last)
                continue
        else:
            rc = proc.wait()
        if rc != 0:
            tail = out.with_name("stderr.log").read_text().strip().splitlines()[-1:]
            raise RuntimeError(f"{config}: run exited {rc}: {tail}")
        return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (at most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None, help="default: 6000 Fashion-MNIST images")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this directory")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mesimp-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    data = args.data or small_npz(root / "data.npz")
    t0 = time.perf_counter()

    refs, horizon = {}, {}
    for config in CONFIGS:
        out = root / "ref" / config / "m.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        rc = start(command(data, config, out), out.with_name("stderr.log")).wait()
        if rc != 0:
            sys.exit(f"error: reference run {config} exited {rc}; see {out.parent}/stderr.log")
        horizon[config] = time.perf_counter() - t  # kill anywhere in a whole run's time
        refs[config] = final_state(out)
        print(f"reference {config}: {horizon[config]:.1f} s", flush=True)

    totals = dict.fromkeys(
        ["kills", "kills_after_a_save", "kills_mid_write", "restarts", "resumes", "stray_tmp"], 0
    )
    identical, corrupt, rows = 0, 0, []
    for i in range(args.trials):
        config = list(CONFIGS)[i % len(CONFIGS)]
        out = root / f"trial{i:03d}" / "m.pt"
        out.parent.mkdir(parents=True)
        st = trial(data, config, out, args.kills, horizon[config], rng)
        got = final_state(out)
        st["stray_tmp"] = len(list(out.parent.glob(".*.tmp")))  # kill -9 litter left behind
        diff = same(refs[config], got)
        identical += diff is None
        corrupt += bool(st["corrupt"])
        for k in totals:
            totals[k] += st[k]
        rows.append({"trial": i, "config": config, **st, "identical": diff is None, "diff": diff})
        print(
            f"trial {i:3d} {config:22s} kills {st['kills']} "
            f"(after a save {st['kills_after_a_save']}, mid-write {st['kills_mid_write']})"
            f" resumes {st['resumes']} -> {'identical' if diff is None else 'DIFFERS at ' + diff}"
            + (f" CORRUPT {st['corrupt']}" if st["corrupt"] else ""),
            flush=True,
        )
    summary = {
        "trials": args.trials,
        **totals,
        "identical": identical,
        "corrupt": corrupt,
        "wall_s": round(time.perf_counter() - t0, 1),
        "runs": str(root),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({**summary, "rows": rows}, indent=2))
    sys.exit(0 if identical == args.trials and corrupt == 0 else 1)


if __name__ == "__main__":
    main()
