"""What ``train_step``'s Python checks cost, and how close the step is to its GEMMs.

``mesimp.nn.fused.train_step(model, x, y, optimizer)`` checks at every call that the
compiled step still applies (grad mode, tracing, export, autocast, hooks, the cached
arguments' keys, the optimizer's state) and then makes one call of
``torch.ops.mesimp.mlp_train_step``. This times, interleaved in one process, at one
(b, k, selection):

- ``dense``: the dense step with torch's fused Adam (the whole-step baseline);
- ``train_step``: the public call;
- ``op alone``: the same op with the arguments ``train_step`` caches, called directly
  with no checks at all (the most that removing every Python check could give);
- ``gemm floor``: the GEMMs alone of a unified step (``meprop_speed``'s step ceiling).

So ``train_step - op alone`` is the price of the checks, and ``op alone - gemm floor``
what the op spends beyond the GEMMs (selection, cross-entropy, the optimizer's rows).

    python -m benchmarks.step_overhead [--k 20] [--batch-size 50] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from benchmarks.meprop_speed import (
    LR,
    Runner,
    _Batches,
    gemm_floor_runner,
    interleaved,
    kernel_mode,
    make_mlp,
    meprop_copy,
    step_runner,
    train_step_runner,
)
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.nn import fused, kernels
from mesimp.training.optim import RowSparseAdam

VARIANTS = ("dense", "train_step", "op alone", "gemm floor")


def op_runner(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: _Batches) -> Runner:
    """Times ``torch.ops.mesimp.mlp_train_step`` with the arguments ``train_step`` caches
    (taken after one real ``train_step``, which builds them), and nothing else."""
    with kernel_mode("cpp"):
        x, y = batches.next()
        fused.train_step(model, x, y, opt)
        stack = fused._stack(model)
        opt_args = None if stack is None else fused._optimizer_args(opt, stack.params)
    if stack is None or opt_args is None:
        raise RuntimeError("the compiled train_step does not apply to this model")
    args = (stack.params, *stack.args, *opt_args, False)
    op = torch.ops.mesimp.mlp_train_step.default

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                x, y = batches.next()
                op(x, y, *args)
        return time.perf_counter() - t0

    return run


def measure(b: int, k: int, selection: str, rounds: int, iters: int, seed: int) -> dict:
    """Per variant the per-step seconds of every round; the runners interleaved."""
    torch.manual_seed(seed)
    base = make_mlp()
    batches = _Batches(b, seed)
    dense = copy.deepcopy(base)
    adam = torch.optim.Adam(dense.parameters(), lr=LR, fused=True)
    one, raw = (meprop_copy(base, k, selection, fused=True) for _ in range(2))
    runners = {
        "dense": step_runner(dense, adam, batches),
        "train_step": train_step_runner(one, RowSparseAdam(one.parameters(), lr=LR), batches),
        "op alone": op_runner(raw, RowSparseAdam(raw.parameters(), lr=LR), batches),
        "gemm floor": gemm_floor_runner(base, batches, k),
    }
    return interleaved(runners, rounds, iters, warmup=max(iters, 10))


def markdown(times: dict[str, list[float]]) -> str:
    best = {name: min(ts) for name, ts in times.items()}
    lines = ["| variant | ms (best round) | speed-up vs dense |", "|:---|---:|---:|"]
    for name in VARIANTS:
        ratio = best["dense"] / best[name]
        lines.append(f"| {name} | {best[name] * 1e3:.3f} | {ratio:.2f}x |")
    checks = (best["train_step"] - best["op alone"]) * 1e6
    beyond = (best["op alone"] - best["gemm floor"]) * 1e6
    lines += ["", f"- train_step's Python checks: {checks:.0f} µs a step"]
    lines.append(f"- the op beyond its GEMMs: {beyond:.0f} µs a step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--selection", default="unified", choices=sorted(kernels.SELECTION_CODE))
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    p.add_argument("--iters", type=int, default=20, help="steps per variant per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.k < 1 or args.rounds < 1 or args.iters < 1:
        p.error("--batch-size, --k, --rounds and --iters must be at least 1")
    if not kernels.available():
        print("error: the compiled kernels are not built (make setup)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    times = measure(args.batch_size, args.k, args.selection, args.rounds, args.iters, args.seed)
    cpu, capability = cpu_model(), torch.backends.cpu.get_cpu_capability()
    where = f"{cpu} ({capability}, {os.cpu_count()} CPUs), {args.threads} thread(s)"
    print(f"{where}; b={args.batch_size}, k={args.k}, {args.selection}, {args.rounds} rounds\n")
    print(markdown(times))
    print(f"- 1-min load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if args.json:
        meta = {"cpu_model": cpu, "cpu_capability": capability, "cpus": os.cpu_count()}
        meta |= {k: v for k, v in vars(args).items() if k != "json"}
        doc = {"meta": meta, "step_s": times}
        atomic_write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
