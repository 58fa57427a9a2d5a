"""Training time per epoch, dense vs meProp k=20 vs meSimp, as ``mesimp train --json``
reports it (``train_time_s``), Fashion-MNIST MLP 784-500-500-10, at each thread count
(``mesimp train --threads N``).

Run::

    python -m benchmarks.kernels_epoch [--threads 1,2] [--rounds 3] [--epochs 1] [--data DIR]
                                       [--json FILE]

Each round trains every variant for ``--epochs`` epochs, one after another (the order
alternates by round), through the same public ``mesimp.train`` that ``mesimp train``
calls; a variant's time per epoch is its fastest round (competing processes only add
time). Variants: dense; meProp k=20 (unified) on the compiled path (the trainer's
default: ``train_step``); the same on the pure-Python path (``MESIMP_KERNELS=python``);
meSimp (unified k=20, ``--simplify``, prune rate 0.05) on the default path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.meprop_speed import kernel_mode
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.loop import train

DATA = "/usr/share/datasets/fashion-mnist"


def variants() -> dict[str, tuple[str, dict]]:
    """name -> (kernel mode, TrainConfig overrides)."""
    return {
        "dense": ("auto", {"k": 0}),
        "meprop k=20 (compiled)": ("auto", {"k": 20, "selection": "unified"}),
        "meprop k=20 (python)": ("python", {"k": 20, "selection": "unified"}),
        "mesimp k=20 (compiled)": (
            "auto",
            {"k": 20, "selection": "unified", "simplify": SimplifyConfig(prune_rate=0.05)},
        ),
    }


def run_one(data: str, out: Path, epochs: int, mode: str, overrides: dict, threads: int) -> dict:
    cfg = TrainConfig(
        data=data, epochs=epochs, output=str(out), threads=threads, seed=1, evals_per_epoch=1
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with kernel_mode(mode):
        summary = train(cfg, progress=False, log=lambda _msg: None)
    return {
        "train_time_s": summary["train_time_s"],
        "per_epoch_s": summary["train_time_s"] / epochs,
        "kernel": summary["kernel"],
        "step_path": summary["step_path"],
        "test_accuracy": summary["final"]["test_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", default="1", help="thread counts, e.g. 1,2 (default 1)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    vs = variants()
    keys = [(name, t) for t in threads for name in vs]
    runs: dict[tuple[str, int], list[dict]] = {key: [] for key in keys}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # every variant and thread count in each round
            for name, t in keys if r % 2 == 0 else keys[::-1]:
                mode, overrides = vs[name]
                out = Path(tmp) / f"{r}-{t}-{len(runs[name, t])}.pt"
                runs[name, t].append(run_one(args.data, out, args.epochs, mode, overrides, t))
                print(f"  round {r + 1} {name} threads={t}: {runs[name, t][-1]}", file=sys.stderr)
    best = {key: min(x["per_epoch_s"] for x in rs) for key, rs in runs.items()}
    print("| variant | threads | kernel / step path | s per epoch (best round) | vs dense |")
    print("|:---|---:|:---|---:|---:|")
    for (name, t), rs in runs.items():
        print(
            f"| {name} | {t} | {rs[0]['kernel']} / {rs[0]['step_path']} | {best[name, t]:.2f} "
            f"| {best['dense', t] / best[name, t]:.2f}x |"
        )
    print(
        f"\n{args.rounds} rounds x {args.epochs} epoch(s) per variant and thread count; "
        f"1-min load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"{os.cpu_count()} CPUs"
    )
    if args.json:
        meta = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        meta |= {"cpus": os.cpu_count(), "rounds": args.rounds, "epochs": args.epochs}
        meta["threads"] = threads
        flat = {f"{name} @{t}": rs for (name, t), rs in runs.items()}
        doc = {
            "meta": meta,
            "runs": flat,
            "best_per_epoch_s": {f"{n} @{t}": v for (n, t), v in best.items()},
        }
        atomic_write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
