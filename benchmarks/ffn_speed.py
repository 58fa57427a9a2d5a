"""The FFN blocks of a small transformer made meProp with ``meprop_``, against dense.

Run::

    python -m benchmarks.ffn_speed [--threads 1,2] [--k 64] [--quick] [--json FILE]

A pre-norm transformer encoder as a user writes one: token embeddings, 2 blocks of
``x + attn(norm(x))`` (``nn.MultiheadAttention``, 4 heads) and ``x + ffn(norm(x))`` with
``ffn = nn.Sequential(Linear(256, 1024), GELU(), Dropout(0.1), Linear(1024, 256))``, a
mean-pooled classification head; batch 16 of 64 tokens, so each FFN Linear sees 1024
rows. ``meprop_(model, MePropConfig(k, "unified"))`` swaps the FFN Linears (the head stays
dense, attention's projections are not ``nn.Linear`` modules) and makes each FFN a
``MePropSequential``: its chain runs as one fused node. Variants, interleaved
(``benchmarks.meprop_speed.interleaved``, best round): dense; the drop-in (fused FFNs,
dense gradients in their buffers); the drop-in with one node per layer; backward alone
and the whole step with stock ``torch.optim.AdamW``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

from benchmarks.meprop_speed import _ratios, backward_runner, interleaved, step_runner
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.nn import kernels
from mesimp.nn.fused import MePropSequential
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

D, HEADS, FF, BLOCKS, VOCAB, CLASSES = 256, 4, 1024, 2, 1000, 10
B, T = 16, 64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Dropout(0.1), nn.Linear(FF, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(tokens)).mean(1))


class _Data:
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.randint(0, VOCAB, (B, T), generator=g),
                torch.randint(0, CLASSES, (B,), generator=g),
            )
            for _ in range(4)
        ]
        self.i = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]


def variants(base: nn.Module, k: int) -> dict[str, nn.Module]:
    fused = meprop_(copy.deepcopy(base), MePropConfig(k=k, selection="unified"))
    layer = copy.deepcopy(fused)
    for m in layer.modules():
        if isinstance(m, MePropSequential):
            m.__class__ = nn.Sequential  # one autograd node per layer
    return {"dense": copy.deepcopy(base), "drop-in": fused, "drop-in, per layer": layer}


def measure(k: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    models = variants(Encoder(), k)
    data = _Data(0)
    runners = {n: backward_runner(m, data, "auto") for n, m in models.items()}
    bwd = interleaved(runners, rounds, iters, 1)
    torch.manual_seed(0)
    models = variants(Encoder(), k)
    runners = {
        n: step_runner(m, torch.optim.AdamW(m.parameters(), lr=1e-4), data, "auto")
        for n, m in models.items()
    }
    step = interleaved(runners, rounds, iters, 1)
    return {
        "k": k,
        "backward_s": bwd,
        "step_s": step,
        "backward": {n: _ratios(bwd["dense"], v) for n, v in bwd.items() if n != "dense"},
        "step": {n: _ratios(step["dense"], v) for n, v in step.items() if n != "dense"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1")
    p.add_argument("--k", type=int, default=64, help="unified k of each FFN Linear")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    rounds, iters = (1, 1) if args.quick else (args.rounds, 2)
    out = {}
    lines = [
        "| threads | dense backward ms | backward: drop-in | per layer | dense step ms | "
        "step: drop-in | per layer |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(t)
        r = measure(args.k, rounds, iters)
        out[str(t)] = r
        db, ds = min(r["backward_s"]["dense"]) * 1e3, min(r["step_s"]["dense"]) * 1e3
        cells = [str(t), f"{db:.1f}"]
        cells += [f"{r['backward'][n]['min']:.2f}x" for n in ("drop-in", "drop-in, per layer")]
        cells.append(f"{ds:.1f}")
        cells += [f"{r['step'][n]['min']:.2f}x" for n in ("drop-in", "drop-in, per layer")]
        lines.append("| " + " | ".join(cells) + " |")
        print(f"  threads={t} done", file=sys.stderr)
    print(
        f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), kernels "
        f"{kernels.kernel_name()}, FFN {D}-{FF}-{D} x {BLOCKS} blocks, unified k={args.k}, "
        f"batch {B}x{T}; 1-min load {os.getloadavg()[0]:.2f}\n"
    )
    print("\n".join(lines))
    if args.json:
        meta = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        meta |= {"k": args.k, "batch": [B, T], "d": D, "ff": FF, "blocks": BLOCKS}
        atomic_write_text(args.json, json.dumps({"meta": meta, "threads": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
