"""meSimp on Fashion-MNIST: dense 500 vs meSimp vs dense from scratch at the meSimp widths.

    python -m benchmarks.mesimp_fmnist [--epochs 8] [--seeds 1,2,3] [--k 60]
        [--prune-rate 0.01] [--selection unified] [--finetune-epochs 0] [--quick]

Every run uses the same epochs, batch size, optimizer and seed. With
``--finetune-epochs F`` meSimp trains ``epochs - F`` epochs, is shrunk, then trains F
more epochs with plain backprop at the shrunk widths (same total epochs). Prints a
markdown table; ``--json FILE`` keeps the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from mesimp.simplify.checkpoint_shrink import shrink_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.loop import TrainConfig, train


def _run(out: Path, name: str, **kw) -> dict:
    r = train(TrainConfig(output=str(out / f"{name}.pt"), **kw), progress=False, log=lambda m: None)
    return {
        "widths": r["active_widths"],
        "test": r["best"]["test_accuracy"],
        "dev": r["best"]["dev_accuracy"],
        "time": r["train_time_s"],
    }


def one_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, dict]:
    common = dict(
        epochs=args.epochs,
        seed=seed,
        batch_size=args.batch_size,
        data=args.data,
        hidden=args.hidden,
    )
    rows = {"dense 500": _run(out, f"dense-{seed}", **common)}
    simp = SimplifyConfig(
        prune_rate=args.prune_rate, points_per_epoch=args.points, cycle_epochs=args.cycle_epochs
    )
    e1 = args.epochs - args.finetune_epochs
    ms = _run(
        out,
        f"mesimp-{seed}",
        **{**common, "epochs": e1},
        k=args.k,
        selection=args.selection,
        simplify=simp,
    )
    if args.finetune_epochs:
        rep = shrink_checkpoint(
            out / f"mesimp-{seed}.pt",
            out / f"mesimp-{seed}.small.pt",
            data=args.data,
            round_to=args.round_to,
        )
        ft = _run(
            out,
            f"mesimp-ft-{seed}",
            **{**common, "epochs": args.finetune_epochs},
            init=str(out / f"mesimp-{seed}.small.pt"),
        )
        ms = {**ft, "time": ms["time"] + ft["time"], "widths": rep["after"]["hidden_sizes"]}
    rows["meSimp"] = ms
    rows["dense at meSimp widths"] = _run(out, f"same-{seed}", **{**common, "hidden": ms["widths"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="1")
    p.add_argument("--k", type=int, default=60)
    p.add_argument("--selection", default="unified")
    p.add_argument("--prune-rate", type=float, default=0.01)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--cycle-epochs", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--round-to", type=int, default=1, help="shrink --round-to (with fine-tune)")
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="1 epoch, for a smoke test")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs = 1, 0
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, row in one_seed(args, seed, Path(tmp)).items():
                results.setdefault(name, []).append(row)
    total = 2 * args.hidden
    print(
        f"Fashion-MNIST, MLP 784-{args.hidden}-{args.hidden}-10, {args.epochs} epochs, "
        f"b={args.batch_size}, Adam 1e-3, seeds {seeds}; meSimp: {args.selection} "
        f"k={args.k}, prune rate {args.prune_rate}, {args.points} points/epoch, "
        f"cycle {args.cycle_epochs} epoch(s), fine-tune {args.finetune_epochs} epoch(s), "
        f"round-to {args.round_to}\n"
    )
    print("| run | kept widths | kept % | test accuracy | train time (s) |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        acc = [r["test"] for r in rows]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        kept = [sum(r["widths"]) / total * 100 for r in rows]
        print(
            f"| {name} | {' / '.join(str(r['widths']) for r in rows)} | "
            f"{statistics.mean(kept):.1f} | {statistics.mean(acc):.4f} ± {sd:.4f} | "
            f"{statistics.mean(r['time'] for r in rows):.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
