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
  meSimp with mesimp's settings (unified k=60, prune rate 0.01, 4 points an epoch);
* ``ref meSimp``: ``--reference --simplify``, the C# meSimp (per-example top-k through
  its heap, k=160 fixed, prune rate 0.1 after every dev check of a simplifying 5-epoch
  cycle, Adam's moments zeroed at every check of a cycle's last epoch), and the same
  with ``reference_zero_fills=False`` (the heap's zero-gradient fills not counted). Their
  results add the widths after the last prune and ``mesimp_diagnosis`` of the final
  state (why the widths stopped where they did).

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
    # the C# meSimp (--reference --simplify): per-example top-k through its heap, k=160
    # fixed, prune rate 0.1 after every dev check of a simplifying 5-epoch cycle
    "ref meSimp topk160 r0.1": dict(reference=True, k=160, selection="topk", simplify="ref"),
    # the same, but the heap's zero-gradient fills do not count as hits (the ablation)
    "ref meSimp topk160 r0.1 no-fill": dict(
        reference=True, k=160, selection="topk", simplify="ref", reference_zero_fills=False
    ),
    # the same, with Adam's resets changed: never reset, or a fresh Adam (t = 0 as well)
    "ref meSimp topk160 r0.1 no-reset": dict(
        reference=True, k=160, selection="topk", simplify="ref", extra={"reference_reset": "none"}
    ),
    "ref meSimp topk160 r0.1 fresh-adam": dict(
        reference=True, k=160, selection="topk", simplify="ref", extra={"reference_reset": "fresh"}
    ),
    # dense from scratch at the C# meSimp's final widths (seed 1's 149-124)
    "ref dense 149-124": dict(reference=True, k=0, hidden=[149, 124]),
    "mesimp dense": dict(k=0),
    "mesimp topk20": dict(k=20, selection="topk"),
    "mesimp topk80": dict(k=80, selection="topk"),
    "mesimp unified20": dict(k=20, selection="unified"),
    "mesimp meSimp unified60 r0.01": dict(k=60, selection="unified", simplify=True),
}


def mesimp_diagnosis(last: Path, config: Any, n: int = 10000) -> dict[str, Any]:
    """Why a meSimp run stopped where it did, from its final weights, masks and counts.

    Per hidden layer, on ``n`` training images: the active width; how many units have a
    gradient (ReLU on) per example (mean, and the share of examples with fewer than k,
    where the C# heap fills the rest of the k slots with zero-gradient units of columns
    0..k-1 and counts them); each active unit's ReLU-on rate and its counted hit rate
    since the last prune (a plain cycle's 5 epochs at the end of a 20-epoch run); the
    units a prune now would keep by counts but not by gradients (kept by fills); the
    kept units in columns < k.
    """
    import torch

    from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint
    from mesimp.simplify.reference_schedule import reference_keep
    from mesimp.simplify.rule import prunable_layers
    from mesimp.training.build import load_task

    task = load_task(config)
    model = model_from_checkpoint(load_checkpoint(last)).eval()
    layers = prunable_layers(model)
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for _, m in layers]
    x, _ = task.batch(task.x_train[:n], task.y_train[:n])
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    k, rate = int(config.k), config.simplify.prune_rate
    diag = {}
    for (name, layer), z in zip(layers, outs, strict=True):
        on = (z > 0) & layer.mask  # the units with a gradient, per example
        nnz = on.sum(1)
        on_rate = on.double().mean(0)
        ref = int(layer.ref)
        by_counts = reference_keep(layer.hits, ref, rate) & layer.mask
        by_grads = (on_rate >= rate) & layer.mask
        cols = torch.arange(layer.mask.numel())
        diag[name] = {
            "width": int(layer.mask.sum()),
            "nnz_mean": float(nnz.double().mean()),
            "share_below_k": float((nnz < k).double().mean()),
            "counted_examples": ref,
            "keep_by_counts": int(by_counts.sum()),
            "keep_by_gradients": int(by_grads.sum()),
            "kept_by_fills": int((by_counts & ~by_grads).sum()),
            "active_below_k_cols": int((layer.mask & (cols < k)).sum()),
        }
    return diag


def run(name: str, seed: int, epochs: int, data: str) -> dict[str, Any]:
    import torch

    from mesimp import MesimpError, SimplifyConfig, TrainConfig, train

    torch.set_num_threads(1)
    from mesimp.training.loop import metrics_path

    kw = dict(ROWS[name])
    simplify = kw.pop("simplify", False)
    if simplify == "ref":  # the C# default.json: Prune 0.1, IterPerEpoch 8, TrainCycle 5
        kw["simplify"] = SimplifyConfig(prune_rate=0.1, points_per_epoch=8, cycle_epochs=5)
    elif simplify:
        kw["simplify"] = SimplifyConfig(prune_rate=0.01, points_per_epoch=4)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=data,
            hidden=kw.pop("hidden", 500),
            layers=2,
            epochs=epochs,
            batch_size=100,
            evals_per_epoch=8,
            seed=seed,
            output=str(Path(tmp) / "m.pt"),
            save_every=0,
            keep_last=simplify == "ref",  # its final state, for mesimp_diagnosis
            **kw,
        )
        try:
            r = train(cfg, progress=False, log=lambda _m: None)
        except MesimpError as e:  # a diverged run is a result too
            return {"row": name, "seed": seed, "error": str(e).splitlines()[0]}
        records = [json.loads(line) for line in metrics_path(cfg.output).read_text().splitlines()]
        diag = mesimp_diagnosis(Path(tmp) / "m.last.pt", cfg) if simplify == "ref" else None
    evals = [r for r in records if r["event"] == "eval"]
    simp = [r for r in records if r["event"] == "simplify"]
    return {
        "row": name,
        "seed": seed,
        "test": r["best"]["test_accuracy"],
        "dev": r["best"]["dev_accuracy"],
        "best_epoch": r["best"]["epoch"],
        "widths": r["active_widths"],
        "train_time_s": r["train_time_s"],
        # meSimp: the widths after the last prune, and at the end of every epoch
        "final_widths": simp[-1]["widths"] if simp else None,
        "epoch_widths": [e["widths"] for e in evals[7::8]] if simp else None,
        "final_test": r["final"]["test_accuracy"],
        "diagnosis": diag,
        # meSimp: every dev check, [epoch, dev, test, widths...] (the widths it saw)
        "evals": [[e["epoch"], e["dev_accuracy"], e["test_accuracy"], *e["widths"]] for e in evals]
        if simp
        else None,
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
    print("| row | test % (mean ± sd) | seeds | widths at best dev | final widths | train s |")
    print("|---|---:|---:|---|---|---:|")
    for name in rows:
        ok = [r for r in results if r["row"] == name and "test" in r]
        bad = [r for r in results if r["row"] == name and "error" in r]
        accs = [100 * r["test"] for r in ok]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean = f"{statistics.mean(accs):.2f} ± {sd:.2f}" if accs else "-"
        widths = " / ".join("-".join(map(str, r["widths"] or [])) for r in ok)
        final = " / ".join("-".join(map(str, r.get("final_widths") or [])) for r in ok)
        t = statistics.mean(r["train_time_s"] for r in ok) if ok else float("nan")
        note = f" ({len(bad)} diverged)" if bad else ""
        print(f"| {name} | {mean}{note} | {len(ok)} | {widths} | {final} | {t:.0f} |")


if __name__ == "__main__":
    main()
