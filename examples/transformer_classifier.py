"""A transformer classifier in a plain PyTorch loop, made smaller by mesimp (``# mesimp``).

    python examples/transformer_classifier.py [--quick] [--out DIR]

Each Fashion-MNIST image is a sequence of 28 rows (tokens of 28 pixels) read by two
pre-LayerNorm transformer blocks. meProp sparsifies the backward pass of every Linear
layer; meSimp removes the units that are rarely selected, each one a dependency group
(``mesimp.simplify.groups``): a feed-forward unit (its row of the first Linear and its
column of the second), an attention head (its q/k/v rows and output-projection
columns), and a channel of the residual stream (the hidden size: every writer's row,
every reader's column, the positional parameter and the LayerNorms, which then
normalise over the active channels only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mesimp  # mesimp
from mesimp.data import find_image_data, load_idx


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class RowTransformer(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, ffn: int = 256, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.pos = nn.Parameter(torch.zeros(1, 28, d))
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 28, 28]
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def load(n_train: int) -> tuple[torch.Tensor, ...]:
    root = find_image_data(None)

    def x(stem: str, n: int | None) -> torch.Tensor:
        return (
            torch.from_numpy(load_idx(root / f"{stem}-images-idx3-ubyte.gz")[:n].copy())
            .float()
            .div(255)
        )

    def y(stem: str, n: int | None) -> torch.Tensor:
        return torch.from_numpy(load_idx(root / f"{stem}-labels-idx1-ubyte.gz")[:n].astype("int64"))

    return x("train", n_train), y("train", n_train), x("t10k", 2000), y("t10k", 2000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny run for the test suite")
    p.add_argument("--out", default="models/examples")
    a = p.parse_args()
    n_train, epochs = (512, 2) if a.quick else (20000, 4)
    x_train, y_train, x_test, y_test = load(n_train)
    torch.manual_seed(0)

    model = RowTransformer()
    mesimp.meprop_(model, mesimp.MePropConfig(k=0.25, selection="unified"))  # mesimp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batch = 64
    steps = (n_train + batch - 1) // batch
    simp = mesimp.Simplifier(  # mesimp
        model, mesimp.SimplifyConfig(prune_rate=0.05, points_per_epoch=2), opt,
        steps_per_epoch=steps, epochs=epochs, example_inputs=x_train[:8],
    )  # fmt: skip
    print("meSimp simplifies:", ", ".join(f"{g.name} ({g.kind})" for g in simp.groups))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train)
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            simp.step()  # mesimp
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f}, widths {simp.widths}")

    small = mesimp.shrink(model, x_test[:8]).eval()  # mesimp: a smaller plain nn.Module
    with torch.no_grad():
        acc = (small(x_test).argmax(1) == y_test).float().mean().item()
    params = [sum(p.numel() for p in m.parameters()) for m in (model, small)]
    print(f"shrunk: test accuracy {acc:.4f}, params {params[0]:,} -> {params[1]:,}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    r = mesimp.export_onnx(small, x_test[:8], out / "transformer.small.onnx")  # mesimp
    print(f"wrote {r['path']} (onnxruntime matches PyTorch to {r['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
