"""Bring your own model: torchvision resnet18 and a small ViT on Fashion-MNIST.

    python -m benchmarks.byom [--models resnet18,vit] [--seeds 1,2,3] [--quick]
        [--train N] [--epochs E] [--finetune F] [--json FILE]

Each model is a user's: built by a torchvision factory (1-channel stem), trained in
a plain PyTorch loop (Adam, batch 64), with mesimp added in the few lines a user
would add. Rows, every one with E epochs of training in total:

* ``dense``: E epochs. Its weights after E - F epochs are kept for ``tp``.
* ``mesimp``: ``meprop_`` (unified top-k, k = 25 % of each layer's width) and a
  ``Simplifier`` for E - F epochs, ``mesimp.shrink``, then F epochs of plain fine-tuning.
* ``scratch``: the shrunk architecture, freshly initialised, trained E epochs.
* ``tp``: Torch-Pruning L2-magnitude pruning of the dense net after E - F epochs to
  exactly the meSimp widths (same layers), then F epochs of fine-tuning.

Per row: test accuracy on the 10,000 test images (mean ± sd over seeds), params, MACs
per image (counted with forward hooks: conv, linear and attention matmuls), and the
onnxruntime fp32 speed-up of the shrunk model over the dense one at batch 1 and 256
(P50 ratio, 1 thread, one interleaved ``mesimp.bench`` run per seed; ``scratch`` and
``tp`` have the same graph as ``mesimp``). Torch runs on 1 thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mesimp
from benchmarks.torchvision_cpu import load as load_torchvision
from mesimp.data import find_image_data, load_idx
from mesimp.deploy.bench import bench
from mesimp.files.atomic import atomic_write_text
from mesimp.simplify.tracing import trace
from mesimp.simplify.width_attrs import refresh_width_attributes

BATCH = 64
LR = 1e-3
MEAN, STD = 0.286, 0.353


# -- the user's models (torchvision factories, 1-channel input) --------------------------
def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return m


def vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    m = VisionTransformer(
        image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=256,
        num_classes=10,
    )  # fmt: skip
    m.conv_proj = nn.Conv2d(1, 64, 7, 7)
    return m


MODELS = {"resnet18": resnet18, "vit": vit}


# -- data ----------------------------------------------------------------------------------
def fashion_mnist(n_train: int) -> dict[str, torch.Tensor]:
    root = find_image_data(None)

    def images(stem: str, n: int | None) -> torch.Tensor:
        x = torch.from_numpy(load_idx(root / f"{stem}-images-idx3-ubyte.gz")[:n].copy())
        return ((x.float() / 255.0 - MEAN) / STD).unsqueeze(1)

    def labels(stem: str, n: int | None) -> torch.Tensor:
        return torch.from_numpy(
            load_idx(root / f"{stem}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
        )

    return {
        "x_train": images("train", n_train),
        "y_train": labels("train", n_train),
        "x_test": images("t10k", None),
        "y_test": labels("t10k", None),
    }


# -- a user's plain loop -------------------------------------------------------------------
def train(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    epochs: int,
    seed: int,
    simplifier_fn: Any = None,
) -> mesimp.Simplifier | None:
    """Adam, batch 64, shuffled per epoch; with ``simplifier_fn(model, opt, steps)``
    returning a ``Simplifier``, ``simp.step()`` after every optimizer step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    n = len(data["y_train"])
    steps = (n + BATCH - 1) // BATCH
    simp = simplifier_fn(model, opt, steps) if simplifier_fn else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if simp is not None:
                simp.step()
    return simp


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data["y_test"]), 1000):
        out = model(data["x_test"][i : i + 1000])
        correct += int((out.argmax(1) == data["y_test"][i : i + 1000]).sum())
    return correct / len(data["y_test"])


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``x[:1]``: conv, linear, attention."""
    total = 0

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += (
                out.numel()
                * mod.in_channels
                // mod.groups
                * mod.kernel_size[0]
                * mod.kernel_size[1]
            )
        elif isinstance(mod, nn.Linear):
            total += out.numel() // mod.out_features * mod.in_features * mod.out_features
        elif isinstance(mod, nn.MultiheadAttention):
            q = inp[0]
            tokens, e = q.shape[-2], mod.embed_dim
            total += q.numel() // e * 4 * e * e + 2 * tokens * tokens * e * (
                q.numel() // e // tokens
            )

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def reinit(model: nn.Module) -> nn.Module:
    """Fresh parameters for the same architecture (each module's own init)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def tp_prune(
    dense: nn.Module, widths: dict[str, int], x: torch.Tensor
) -> tuple[nn.Module, list[str]]:
    """Torch-Pruning L2 magnitude: in each named layer keep the ``widths[name]`` units
    with the largest weight norm, pruning the coupled group with the dependency graph.

    A group named ``module:kind`` (``...self_attention:heads``) counts whole heads, which
    Torch-Pruning's dependency graph does not prune (its attention pruner cuts the
    embedding channels): such groups are left at full width and returned as skipped,
    so the row says that its model keeps every head."""
    model = copy.deepcopy(dense)
    dg = trace(model, x[:2])
    modules = dict(model.named_modules())
    skipped = []
    for name, keep in widths.items():
        if ":" in name:
            skipped.append(name)
            continue
        layer = modules[name]
        norms = layer.weight.detach().flatten(1).norm(dim=1)
        drop = torch.argsort(norms)[: len(norms) - keep].tolist()
        prune_out = dg.get_pruner_of_module(layer).prune_out_channels
        dg.get_pruning_group(layer, prune_out, idxs=drop).prune()
    refresh_width_attributes(model)  # e.g. the ViT's hidden_dim, read in its forward
    return model, skipped


# -- one seed ------------------------------------------------------------------------------
def one_seed(
    name: str, data: dict, seed: int, epochs: int, finetune: int, k: float, rate: float
) -> dict:
    factory = MODELS[name]
    x0 = data["x_train"][:8]
    rows: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    torch.manual_seed(seed)
    dense = factory()
    train(dense, data, epochs - finetune, seed)
    snapshot = copy.deepcopy(dense)
    train(dense, data, finetune, seed + 1000)
    rows["dense"] = {"acc": accuracy(dense, data), "time_s": time.perf_counter() - t}

    t = time.perf_counter()
    torch.manual_seed(seed)
    model = mesimp.meprop_(factory(), mesimp.MePropConfig(k=k, selection="unified"))

    def make_simplifier(m: nn.Module, opt: torch.optim.Optimizer, steps: int) -> mesimp.Simplifier:
        cfg = mesimp.SimplifyConfig(prune_rate=rate, points_per_epoch=1, min_width=8)
        return mesimp.Simplifier(
            m, cfg, opt, steps_per_epoch=steps, epochs=epochs - finetune, example_inputs=x0
        )

    simp = train(model, data, epochs - finetune, seed, make_simplifier)
    small = mesimp.shrink(model, x0)
    widths = {n: len(kept) for n, kept in mesimp.simplify.graph_shrink.kept_units(small).items()}
    rows["mesimp_before_ft"] = {"acc": accuracy(small, data)}
    train(small, data, finetune, seed + 1000)
    rows["mesimp"] = {"acc": accuracy(small, data), "time_s": time.perf_counter() - t}

    t = time.perf_counter()
    torch.manual_seed(seed)
    scratch = reinit(copy.deepcopy(small))
    train(scratch, data, epochs, seed)
    rows["scratch"] = {"acc": accuracy(scratch, data), "time_s": time.perf_counter() - t}

    t = time.perf_counter()
    pruned, skipped = tp_prune(snapshot, widths, data["x_train"])
    try:  # Torch-Pruning's model may not run (an embedding width that the heads do not divide)
        with torch.no_grad():
            pruned.eval()(x0)
    except (RuntimeError, AssertionError) as e:  # the outcome is the row's result
        rows["tp"] = {"acc": float("nan"), "error": f"{type(e).__name__}: {e}"[:200]}
    else:
        train(pruned, data, finetune, seed + 1000)
        rows["tp"] = {"acc": accuracy(pruned, data), "time_s": time.perf_counter() - t}
    rows["tp"]["skipped_groups"] = skipped  # kept at full width (heads)

    for key, m in (("dense", dense), ("mesimp", small), ("scratch", scratch), ("tp", pruned)):
        rows[key]["params"] = sum(p.numel() for p in m.parameters())
        rows[key]["macs"] = count_macs(m, x0) if key != "tp" or "error" not in rows[key] else 0
    speed = ort_speedups(dense, small, x0)
    return {"rows": rows, "widths": widths, "simplifier_widths": simp.widths, "speedup": speed}


def ort_speedups(dense: nn.Module, small: nn.Module, x0: torch.Tensor) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        a = mesimp.export_onnx(dense.eval(), x0, Path(tmp) / "dense.onnx")["path"]
        b = mesimp.export_onnx(small.eval(), x0, Path(tmp) / "small.onnx")["path"]
        r = bench([a, b], batch_sizes=[1, 256], threads=[1], progress=False)
    return {f"b{row['batch_size']}": row["speedup"] for row in r["results"] if row["model"] == b}


def mean_sd(v: list[float]) -> str:
    return (
        f"{100 * statistics.mean(v):.2f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f}"
    )


def report(name: str, runs: list[dict], epochs: int, finetune: int, n_train: int) -> str:
    lines = [
        f"### {name} (Fashion-MNIST, {n_train} training images, {epochs} epochs per row, "
        f"{len(runs)} seeds)",
        "",
        "| row | test acc % | params | MACs/image | MAC ratio | ORT fp32 b=1 / b=256 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    d = runs[0]["rows"]["dense"]
    labels = {
        "dense": "dense",
        "mesimp": f"meSimp ({epochs - finetune} ep) + shrink + {finetune} ep fine-tune",
        "scratch": "dense from scratch at the meSimp widths",
        "tp": f"Torch-Pruning L2, same widths ({epochs - finetune} ep dense + {finetune} ep)",
    }
    for key, label in labels.items():
        errors = [r["rows"][key]["error"] for r in runs if "error" in r["rows"][key]]
        if errors:
            lines.append(f"| {label} | **failed**: {errors[0]} | | | | |")
            continue
        accs = [r["rows"][key]["acc"] for r in runs]
        params = statistics.mean(r["rows"][key]["params"] for r in runs)
        macs = statistics.mean(r["rows"][key]["macs"] for r in runs)
        if key == "dense":
            sp = "1 / 1"
        else:
            b1 = statistics.mean(r["speedup"]["b1"] for r in runs)
            b256 = statistics.mean(r["speedup"]["b256"] for r in runs)
            sp = f"{b1:.2f}× / {b256:.2f}×"
        lines.append(
            f"| {label} | {mean_sd(accs)} | {params:,.0f} | {macs:,.0f} | "
            f"{d['macs'] / macs:.2f}× | {sp} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,vit")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--train", type=int, default=None, help="training images (default per model)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--finetune", type=int, default=1)
    p.add_argument("--k", type=float, default=0.25)
    p.add_argument("--prune-rate", type=float, default=None, help="default per model")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="500 images, 2 epochs, 1 seed")
    a = p.parse_args()
    load_torchvision()
    torch.set_num_threads(1)
    defaults = {"resnet18": (5000, 5, 0.2), "vit": (10000, 6, 0.1)}  # BYOM.md's main runs
    out: dict[str, Any] = {}
    for name in a.models.split(","):
        n_train, epochs, rate = defaults[name]
        n_train, epochs = a.train or n_train, a.epochs or epochs
        rate = a.prune_rate if a.prune_rate is not None else rate
        seeds = [int(s) for s in a.seeds.split(",")]
        if a.quick:
            n_train, epochs, seeds = 500, 2, seeds[:1]
        data = fashion_mnist(n_train)
        runs = []
        for seed in seeds:
            t = time.perf_counter()
            runs.append(one_seed(name, data, seed, epochs, a.finetune, a.k, rate))
            print(
                f"{name} seed {seed}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True
            )
        out[name] = {"runs": runs, "train": n_train, "epochs": epochs, "finetune": a.finetune}
        print(report(name, runs, epochs, a.finetune, n_train) + "\n", flush=True)
        print(f"meSimp widths, seed {seeds[0]}: {runs[0]['widths']}\n", flush=True)
    if a.json:
        atomic_write_text(a.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
