"""Why per-example top-k trails dense on MNIST: layer by layer, chunk by chunk.

    python -m benchmarks.topk_collapse [--epochs 2] [--k 20]

The reference-faithful semantics (summed loss, clip 5, dense bias, the C# Adam, its init,
8-chunk epochs, batch 100) on MNIST 784-500-500-10, built from mesimp's own pieces
(``meprop_``, ``ReferenceAdam``, ``reference_init_``, ``chunked_batches``), with variants
that each change one thing. After every chunk it logs dev accuracy and, per layer, the
weight norm and the size of the chunk's update ``||W_after - W_before|| / ||W_before||``.

Variants: dense; per-example top-k; top-k with the first layer's learning rate / 10;
top-k with SGD (no Adam normalisation); unified top-k. It prints one Markdown table of
dev accuracy and update sizes at the end of each epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from mesimp.data.tasks import image_task
from mesimp.models import MLP, MLPConfig
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.reference import ReferenceAdam, chunked_batches, reference_init_

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def variant_setup(name: str, model: torch.nn.Module, k: int) -> torch.optim.Optimizer:
    if name != "dense":
        selection = "unified" if name == "unified" else "topk"
        meprop_(model, MePropConfig(k=k, selection=selection, dense_bias=True))
    if name == "topk, SGD":
        return torch.optim.SGD(model.parameters(), lr=1e-3)  # summed loss: lr per example
    if name == "topk, layer-1 lr / 10":
        first = list(model[0].parameters())
        rest = [p for m in list(model)[1:] for p in m.parameters()]
        return ReferenceAdam([{"params": first, "lr": 1e-4}, {"params": rest}])
    return ReferenceAdam(model.parameters())


def run(name: str, task, epochs: int, k: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = reference_init_(MLP(MLPConfig()))
    opt = variant_setup(name, model, k)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    bounds = chunked_batches(len(task.y_train), 100, 8)
    per_chunk = len(bounds) // 8
    gen = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(epochs):
        perm = torch.randperm(len(task.y_train), generator=gen)
        before = [m.weight.detach().clone() for m in linears]
        for i, (s, e) in enumerate(bounds):
            idx = perm[s:e]
            loss = F.cross_entropy(model(task.x_train[idx]), task.y_train[idx], reduction="sum")
            opt.zero_grad()
            loss.backward()
            if isinstance(opt, torch.optim.SGD):  # the clip the reference Adam does inside
                for p in model.parameters():
                    p.grad.clamp_(-5, 5)
            opt.step()
            if (i + 1) % per_chunk == 0:
                dev = task.accuracy(model, task.x_dev, task.y_dev)
                upd = [
                    float((m.weight - b).norm() / b.norm())
                    for m, b in zip(linears, before, strict=True)
                ]
                norms = [float(m.weight.norm()) for m in linears]
                log.append(
                    {"epoch": epoch + (i + 1) / len(bounds), "dev": dev, "upd": upd, "norm": norms}
                )
                before = [m.weight.detach().clone() for m in linears]
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=str(MNIST))
    a = p.parse_args()
    torch.set_num_threads(1)
    task = image_task(a.data, dev_size=5000)
    names = ["dense", "topk", "topk, layer-1 lr / 10", "topk, SGD", "unified"]
    print(f"MNIST 784-500-500-10, reference semantics, k={a.k}, seed {a.seed}\n")
    print("| variant | epoch | dev % | update size W1 / W2 / W3 (chunk mean) | norm W1 / W2 / W3 |")
    print("|---|---:|---:|---|---|")
    for name in names:
        log = run(name, task, a.epochs, a.k, a.seed)
        for epoch in range(a.epochs):
            rows = [r for r in log if epoch < r["epoch"] <= epoch + 1]
            upd = [sum(r["upd"][j] for r in rows) / len(rows) for j in range(3)]
            last = rows[-1]
            print(
                f"| {name} | {epoch + 1} | {100 * last['dev']:.2f} | "
                + " / ".join(f"{u:.4f}" for u in upd)
                + " | "
                + " / ".join(f"{n:.1f}" for n in last["norm"])
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
