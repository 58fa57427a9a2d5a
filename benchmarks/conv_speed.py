"""``MePropConv2d`` (unified) against ``nn.Conv2d`` on resnet18's 3x3 convolutions, b=32.

Run::

    python -m benchmarks.conv_speed [--threads 1,2] [--ks 0.125,0.25] [--quick] [--json FILE]

resnet18 at 224x224 has one 3x3 convolution shape per stage: 64 channels at 56x56, 128 at
28x28, 256 at 14x14, 512 at 7x7 (stride 1, padding 1, no bias: each is followed by a
BatchNorm). For each, at batch 32, interleaved (``benchmarks.meprop_speed.interleaved``,
best round): the backward of ``nn.Conv2d`` and of ``MePropConv2d`` (unified, k a fraction
of the channels), the input needing its gradient as inside a network; the whole step
(forward, backward, SGD step); and where the meProp backward's time goes: the channel
scores (``|dy|`` summed over batch and positions), the gather of the k channels' gradient,
and the convolution backward on the k selected filters (``dx`` and ``dW``), each timed
alone on the same tensors. The verdict on a compiled path is in the README: the time is
oneDNN's convolution backward and full passes over ``dy`` that ATen already runs at
memory speed, not dispatch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from benchmarks.meprop_speed import Runner, _ratios, interleaved
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.meprop import MePropConfig

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, side): resnet18's 3x3 convs
B = 32


def _conv(c: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, bias=False)


def backward_runner(conv: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Runner:
    """``loss.backward()`` alone: the forward (graph built) outside the timed region."""

    def run(n: int) -> float:
        total = 0.0
        for _ in range(n):
            conv.weight.grad = None
            xg = x.detach().requires_grad_()
            out = conv(xg)
            t0 = time.perf_counter()
            out.backward(dy)
            total += time.perf_counter() - t0
        return total

    return run


def step_runner(conv: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Runner:
    opt = torch.optim.SGD(conv.parameters(), lr=1e-3)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            xg = x.detach().requires_grad_()
            conv(xg).backward(dy)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return run


def parts_runners(conv: nn.Conv2d, x: torch.Tensor, dy: torch.Tensor, k: int) -> dict:
    """The meProp backward's parts, each alone: scores + top-k, the gather of the selected
    channels, the convolution backward on them."""
    sel = dy.abs().sum((0, 2, 3)).topk(k).indices.sort().values
    g_sel = dy.index_select(1, sel)
    w_sel = conv.weight.detach().index_select(0, sel)

    def timed(fn) -> Runner:
        def run(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - t0

        return run

    def conv_bwd() -> None:
        torch.ops.aten.convolution_backward(
            g_sel, x, w_sel, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        )

    return {
        "scores + top-k": timed(lambda: dy.abs().sum((0, 2, 3)).topk(k)),
        "gather dy[:, S]": timed(lambda: dy.index_select(1, sel)),
        "conv backward on S": timed(conv_bwd),
    }


def measure(c: int, side: int, frac: float, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    k = max(1, round(frac * c))
    dense = _conv(c)
    mp = MePropConv2d.from_conv(_conv(c), MePropConfig(k=k, selection="unified"))
    mp.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, c, side, side, generator=g)
    dy = torch.randn(B, c, side, side, generator=g)
    bwd = interleaved(
        {"dense": backward_runner(dense, x, dy), "meprop": backward_runner(mp, x, dy)},
        rounds, iters, 1,
    )  # fmt: skip
    step = interleaved(
        {"dense": step_runner(dense, x, dy), "meprop": step_runner(mp, x, dy)}, rounds, iters, 1
    )
    parts = interleaved(parts_runners(dense, x, dy, k), rounds, iters, 1)
    return {
        "channels": c,
        "side": side,
        "k": k,
        "backward_s": bwd,
        "step_s": step,
        "parts_s": parts,
        "backward": _ratios(bwd["dense"], bwd["meprop"]),
        "step": _ratios(step["dense"], step["meprop"]),
    }


def markdown(results: list[dict], threads: int) -> str:
    lines = [
        f"{threads} thread(s), batch {B}:",
        "",
        "| layer | k | dense backward ms | meProp backward ms | backward | whole step | "
        "scores + top-k ms | gather ms | conv backward on k ms |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = [min(v) * 1e3 for v in r["parts_s"].values()]
        dense, mp = (min(r["backward_s"][n]) * 1e3 for n in ("dense", "meprop"))
        cells = [f"{r['channels']}ch {r['side']}x{r['side']}", str(r["k"]), f"{dense:.1f}"]
        cells += [f"{mp:.1f}", f"{r['backward']['min']:.2f}x", f"{r['step']['min']:.2f}x"]
        lines.append("| " + " | ".join(cells + [f"{v:.1f}" for v in p]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1")
    p.add_argument("--ks", default="0.125,0.25", help="k as fractions of the channels")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels", help="only these stages, e.g. 64,128 (default: all four)")
    p.add_argument("--quick", action="store_true", help="one small round (smoke test)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    fracs = [float(f) for f in args.ks.split(",")]
    args.channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    rounds, iters = (1, 1) if args.quick else (args.rounds, 2)
    shapes = (
        SHAPES[-1:]
        if args.quick
        else [s for s in SHAPES if args.channels is None or s[0] in args.channels]
    )
    out: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for t in threads:
        torch.set_num_threads(t)
        rs = []
        for c, side in shapes:
            for frac in fracs:
                rs.append(measure(c, side, frac, rounds, iters))
                print(f"  threads={t} {c}ch k={rs[-1]['k']} ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr)  # fmt: skip
        out[str(t)] = rs
        print(markdown(rs, t) + "\n")
    print(f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), 1-min load "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    if args.json:
        meta = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        meta |= {"torch": torch.__version__, "python": platform.python_version(), "batch": B}
        atomic_write_text(args.json, json.dumps({"meta": meta, "threads": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
