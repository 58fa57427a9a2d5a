"""The drop-in path: a user's ``nn.Sequential`` 784-H-H-10 made meProp with ``meprop_``,
against the same model with ``nn.Linear``, for H in {500, 1000, 2000, 4000}.

Run::

    python -m benchmarks.dropin_speed [--hidden 500,1000,2000,4000] [--threads 1,2]
                                      [--k 20] [--batch-size 50] [--quick] [--json FILE]

Unified k=20, b=50 by default. Per thread count and width, every variant in one
interleaved run (``benchmarks.meprop_speed.interleaved``: each variant's best round):

* ``dense``: ``nn.Linear`` layers, stock ``torch.optim.AdamW`` (the baseline; its
  default for-loop step, or ``fused=True`` with ``--fused-adamw``);
* ``drop-in``: ``meprop_(model, MePropConfig(k, "unified"))`` and nothing else: dense
  gradients (kept in each weight's buffer, ``mesimp.nn.grad_buffer``), the chain fused
  into one node (``MePropSequential``), stock ``AdamW``;
* ``drop-in, per layer``: the same with one autograd node per layer (the Sequential's
  class set back), to show what the fused node adds;
* ``drop-in, fresh grads``: per layer, buffers off: what the drop-in cost before them
  (a zero-filled out x in gradient every backward);
* ``RowSparseAdamW``: the drop-in with the one-line optimizer swap (lazy rows);
* ``row-sparse``: ``sparse_grad=True`` COO gradients and ``RowSparseAdam``, fused;
* ``train_step``: ``mesimp.nn.fused.train_step`` with ``RowSparseAdam`` (one call a step).

Ratios are dense time / variant time, for ``loss.backward()`` alone and for the whole step
(forward, loss, backward, ``step()``, ``zero_grad()``). The *cap* of a whole step that
keeps the dense forward and a dense stock optimizer is dense step / (forward + loss +
``AdamW.step()``), those two phases timed inside the dense steps of the same run (how the
issue computes it); ``of cap`` is a variant's step ratio over it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.meprop_speed import (
    IN,
    OUT,
    Runner,
    _Batches,
    _ratios,
    backward_runner,
    interleaved,
    step_runner,
    train_step_runner,
)
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.nn import grad_buffer, kernels
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import RowSparseAdam, RowSparseAdamW

HIDDEN = (500, 1000, 2000, 4000)
LR = 1e-3
BACKWARD = ("dense", "drop-in", "drop-in, per layer", "drop-in, fresh grads", "row-sparse")
STEP = (
    "dense",
    "drop-in",
    "drop-in, per layer",
    "RowSparseAdamW",
    "row-sparse",
    "train_step",
)


def make_mlp(h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, OUT))


def dropin(base: nn.Module, k: int, sparse_grad: bool = False, chain: bool = True) -> nn.Module:
    """``meprop_`` on a copy of ``base``; ``chain=False`` keeps one node per layer."""
    model = meprop_(
        copy.deepcopy(base), MePropConfig(k=k, selection="unified", sparse_grad=sparse_grad)
    )
    if not chain:
        model.__class__ = nn.Sequential
    return model


def without_buffers(run: Runner) -> Runner:
    """``run`` with the gradient buffers off: a fresh zero-filled gradient every backward."""

    def wrapped(n: int) -> float:
        with grad_buffer.enabled(False):
            return run(n)

    return wrapped


class PhasedStep:
    """The dense baseline's whole step, timed as a whole and by phase: forward + loss and
    ``opt.step()`` per round, the two phases a step that keeps the dense forward and the
    stock optimizer must still pay (the cap is the dense step over their sum, as the issue
    computes it from the dense step's own phases)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, batches: _Batches) -> None:
        self.model, self.opt, self.batches = model, opt, batches
        self.kept: list[float] = []  # per timed call: forward + loss + step, per iteration

    def __call__(self, n: int) -> float:
        kept = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = self.batches.next()
            a = time.perf_counter()
            loss = F.cross_entropy(self.model(x), y)
            b = time.perf_counter()
            loss.backward()
            c = time.perf_counter()
            self.opt.step()
            d = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            kept += (b - a) + (d - c)
        total = time.perf_counter() - t0
        self.kept.append(kept / n)
        return total


def measure(
    h: int, b: int, k: int, rounds: int, iters: int, warmup: int, seed: int, fused_adamw: bool
) -> dict:
    torch.manual_seed(seed)
    base = make_mlp(h)
    cpp = kernels.available()
    path = "cpp" if cpp else "python"
    batches = _Batches(b, seed)
    bwd = {
        "dense": backward_runner(copy.deepcopy(base), batches, path),
        "drop-in": backward_runner(dropin(base, k), batches, path),
        "drop-in, per layer": backward_runner(dropin(base, k, chain=False), batches, path),
        "drop-in, fresh grads": without_buffers(
            backward_runner(dropin(base, k, chain=False), batches, path)
        ),
        "row-sparse": backward_runner(dropin(base, k, sparse_grad=True), batches, path),
    }
    backward = interleaved(bwd, rounds, iters, warmup)

    batches = _Batches(b, seed)

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=LR, fused=fused_adamw or None)

    models = {
        "dense": copy.deepcopy(base),
        "drop-in": dropin(base, k),
        "drop-in, per layer": dropin(base, k, chain=False),
        "RowSparseAdamW": dropin(base, k),
        "row-sparse": dropin(base, k, sparse_grad=True),
    }
    opts = {name: adamw(m) for name, m in models.items()}
    opts["RowSparseAdamW"] = RowSparseAdamW(models["RowSparseAdamW"].parameters(), lr=LR)
    opts["row-sparse"] = RowSparseAdam(models["row-sparse"].parameters(), lr=LR)
    runners = {n: step_runner(models[n], opts[n], batches, path) for n in models}
    dense = PhasedStep(models["dense"], opts["dense"], batches)
    runners["dense"] = dense
    if cpp:
        one = dropin(base, k, sparse_grad=True)
        runners["train_step"] = train_step_runner(
            one, RowSparseAdam(one.parameters(), lr=LR), batches
        )
    step = interleaved(runners, rounds, iters, warmup)
    # the rounds' kept phases (interleaved() calls each runner once untimed per round, and
    # warmup times first: keep the timed calls, every other one after the warm-up)
    kept = dense.kept[1:][1::2]

    dense_b, dense_s = backward["dense"], step["dense"]
    out = {
        "hidden": h,
        "b": b,
        "k": k,
        "backward_s": backward,
        "step_s": step,
        "backward": {n: _ratios(dense_b, v) for n, v in backward.items() if n != "dense"},
        "step": {n: _ratios(dense_s, v) for n, v in step.items() if n != "dense"},
        "forward_and_step_s": kept,
        "cap": min(dense_s) / min(kept),
    }
    out["of_cap"] = {n: r["min"] / out["cap"] for n, r in out["step"].items()}
    return out


def markdown(results: list[dict], threads: int) -> str:
    head = "| H | " + " | ".join(f"backward: {n}" for n in BACKWARD[1:])
    head += " | " + " | ".join(f"step: {n}" for n in STEP[1:]) + " | step cap | drop-in of cap |"
    ncols = 1 + len(BACKWARD) - 1 + len(STEP) - 1 + 2
    lines = [f"{threads} thread(s):", "", head, "|---:" * ncols + "|"]
    for r in results:
        cells = [str(r["hidden"])]
        cells += [_cell(r["backward"].get(n)) for n in BACKWARD[1:]]
        cells += [_cell(r["step"].get(n)) for n in STEP[1:]]
        cells += [f"{r['cap']:.2f}x", f"{r['of_cap']['drop-in']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Dense ms (best round): "
        + "; ".join(
            f"H={r['hidden']}: backward {min(r['backward_s']['dense']) * 1e3:.2f}, "
            f"step {min(r['step_s']['dense']) * 1e3:.2f}, "
            f"of which forward + loss + step {min(r['forward_and_step_s']) * 1e3:.2f}"
            for r in results
        )
    )
    return "\n".join(lines)


def _cell(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['min']:.2f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", default=",".join(map(str, HIDDEN)), help="widths H")
    p.add_argument("--threads", default="1", help="torch thread counts, e.g. 1,2")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 15; --quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fused-adamw",
        action="store_true",
        help="the stock optimizer as AdamW(fused=True) (default: AdamW(), torch's for-loop "
        "step on CPU tensors)",
    )
    p.add_argument("--quick", action="store_true", help="tiny repetition counts (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    args = p.parse_args(argv)
    try:
        args.hidden = [int(v) for v in args.hidden.split(",")]
        args.threads = [int(v) for v in args.threads.split(",")]
    except ValueError:
        p.error("--hidden and --threads take comma-separated integers")
    if min(args.hidden) < 1 or min(args.threads) < 1 or args.k < 1 or args.batch_size < 1:
        p.error("--hidden, --threads, --k and --batch-size must be positive")
    args.rounds = args.rounds or (2 if args.quick else 15)
    return args


def iterations(h: int, quick: bool) -> tuple[int, int]:
    """(iterations per round, warm-up): ~0.1-0.2 s of dense steps per timed block."""
    return (1, 1) if quick else (max(2, 3000 // h), 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    texts = []
    for t in args.threads:
        torch.set_num_threads(t)
        rs = []
        for h in args.hidden:
            iters, warmup = iterations(h, args.quick)
            rs.append(
                measure(
                    h,
                    args.batch_size,
                    args.k,
                    args.rounds,
                    iters,
                    warmup,
                    args.seed,
                    args.fused_adamw,
                )  # fmt: skip
            )
            print(f"  done threads={t} H={h} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        runs[str(t)] = rs
        texts.append(markdown(rs, t))
    load_end = os.getloadavg()
    print(
        f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs), "
        f"kernels: {kernels.kernel_name()}, unified k={args.k}, b={args.batch_size}; "
        f"1-min load {load_start[0]:.2f} -> {load_end[0]:.2f}\n"
    )
    print("\n\n".join(texts))
    if args.json:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(),
            "kernels": kernels.kernel_name(),
            "rounds": args.rounds,
            "k": args.k,
            "b": args.batch_size,
            "adamw": "fused" if args.fused_adamw else "default",
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "elapsed_s": time.perf_counter() - t0,
        }
        atomic_write_text(args.json, json.dumps({"meta": meta, "threads": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
