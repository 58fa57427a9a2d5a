"""The meProp paper's MNIST table, on MNIST, in the reference-faithful mode and in mesimp's.

    python -m benchmarks.mnist_paper [--seeds 1,2,3] [--epochs 20] [--workers 2] [--out FILE.json]

MLP 784-500-500-10 on ``../shared/data/mnist`` (the papers' data), the reference's
protocol: batch 100, 20 epochs, dev = the first 5,000 training images checked 8 times an
epoch (160 checks), test accuracy at the best dev check. Rows, each over the seeds:

* ``reference``: ``TrainConfig(reference=True)`` (summed loss, clip 5, dense bias
  gradient, the C# Adam, its init, 8-chunk epochs): dense, per-example top-k k=20 and
  k=80 (the paper's meProp), unified k=20, random k=20, MSBP (per-example k=20, 0.8);
* ``mesimp``: mesimp's defaults on the same protocol (mean loss, no clip, selected-bias
  gradient, lazy row-sparse Adam): dense, per-example k=20 and k=80, unified k=20, and
  meSimp with mesimp's settings (unified k=60, prune rate 0.01, 4 points an epoch).

Runs go to ``--workers`` processes (one torch thread each); it prints a Markdown table
(mean ± sd over seeds, and the paper's number where it has one) and writes every run's
result to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
ROWS: dict[str, dict[str, Any]] = {
    "ref dense": dict(reference=True, k=0),
    "ref topk20": dict(reference=True, k=20, selection="topk"),
    "ref topk80": dict(reference=True, k=80, selection="topk"),
    "ref unified20": dict(reference=True, k=20, selection="unified"),
    "ref random20": dict(reference=True, k=20, selection="random"),
    "ref msbp topk20 0.8": dict(reference=True, k=20, selection="topk", msbp=0.8),
    "mesimp dense": dict(k=0),
    "mesimp topk20": dict(k=20, selection="topk"),
    "mesimp topk80": dict(k=80, selection="topk"),
    "mesimp unified20": dict(k=20, selection="unified"),
    "mesimp meSimp unified60 r0.01": dict(k=60, selection="unified", simplify=True),
}


def run(name: str, seed: int, epochs: int, data: str) -> dict[str, Any]:
    import torch

    from mesimp import MesimpError, SimplifyConfig, TrainConfig, train

    torch.set_num_threads(1)
    kw = dict(ROWS[name])
    if kw.pop("simplify", False):
        kw["simplify"] = SimplifyConfig(prune_rate=0.01, points_per_epoch=4)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=data,
            hidden=500,
            layers=2,
            epochs=epochs,
            batch_size=100,
            evals_per_epoch=8,
            seed=seed,
            output=str(Path(tmp) / "m.pt"),
            save_every=0,
            **kw,
        )
        try:
            r = train(cfg, progress=False, log=lambda _m: None)
        except MesimpError as e:  # a diverged run is a result too
            return {"row": name, "seed": seed, "error": str(e).splitlines()[0]}
    return {
        "row": name,
        "seed": seed,
        "test": r["best"]["test_accuracy"],
        "dev": r["best"]["dev_accuracy"],
        "best_epoch": r["best"]["epoch"],
        "widths": r["active_widths"],
        "train_time_s": r["train_time_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--data", default=str(MNIST))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = a.rows.split(",") if a.rows else list(ROWS)
    jobs = [(name, seed) for seed in seeds for name in rows]
    results = []
    with ProcessPoolExecutor(a.workers) as pool:
        futures = [pool.submit(run, n, s, a.epochs, a.data) for n, s in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    head = f"MNIST, 784-500-500-10, batch 100, {a.epochs} epochs, 8 dev checks an epoch"
    print(f"\n{head}, seeds {seeds}\n")
    print("| row | test % (mean ± sd) | seeds | widths | train s |")
    print("|---|---:|---:|---|---:|")
    for name in rows:
        ok = [r for r in results if r["row"] == name and "test" in r]
        bad = [r for r in results if r["row"] == name and "error" in r]
        accs = [100 * r["test"] for r in ok]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean = f"{statistics.mean(accs):.2f} ± {sd:.2f}" if accs else "-"
        widths = " / ".join("-".join(map(str, r["widths"] or [])) for r in ok)
        t = statistics.mean(r["train_time_s"] for r in ok) if ok else float("nan")
        note = f" ({len(bad)} diverged)" if bad else ""
        print(f"| {name} | {mean}{note} | {len(ok)} | {widths} | {t:.0f} |")


if __name__ == "__main__":
    main()
