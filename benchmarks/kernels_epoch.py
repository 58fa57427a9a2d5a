"""Training time per epoch, dense vs meProp k=20 vs meSimp, as ``mesimp train --json``
reports it (``train_time_s``), Fashion-MNIST MLP 784-500-500-10, one thread.

Run::

    python -m benchmarks.kernels_epoch [--rounds 3] [--epochs 1] [--data DIR] [--json FILE]

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


def run_one(data: str, out: Path, epochs: int, mode: str, overrides: dict) -> dict:
    cfg = TrainConfig(
        data=data, epochs=epochs, output=str(out), threads=1, seed=1, evals_per_epoch=1
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
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    vs = variants()
    runs: dict[str, list[dict]] = {name: [] for name in vs}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(vs) if r % 2 == 0 else list(vs)[::-1]
            for name in names:
                mode, overrides = vs[name]
                out = Path(tmp) / f"{r}-{len(runs[name])}.pt"
                runs[name].append(run_one(args.data, out, args.epochs, mode, overrides))
                print(f"  round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    best = {name: min(x["per_epoch_s"] for x in rs) for name, rs in runs.items()}
    dense = best["dense"]
    print("| variant | kernel / step path | s per epoch (best round) | speed-up vs dense |")
    print("|:---|:---|---:|---:|")
    for name, rs in runs.items():
        print(
            f"| {name} | {rs[0]['kernel']} / {rs[0]['step_path']} | {best[name]:.2f} "
            f"| {dense / best[name]:.2f}x |"
        )
    print(
        f"\n{args.rounds} rounds x {args.epochs} epoch(s) per variant, 1 thread; "
        f"1-min load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"{os.cpu_count()} CPUs"
    )
    if args.json:
        meta = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        meta |= {"cpus": os.cpu_count(), "rounds": args.rounds, "epochs": args.epochs}
        doc = {"meta": meta, "runs": runs, "best_per_epoch_s": best}
        atomic_write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
