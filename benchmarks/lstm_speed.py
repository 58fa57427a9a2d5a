"""MePropLSTM speed benchmark on CPU: nn.LSTM vs the meProp LSTM, POS-tagging shapes.

Run::

    python -m benchmarks.lstm_speed [--quick] [--json FILE] [--threads N] [--no-onednn]
                                    [--ks 10,20,50]

One single-layer LSTM, input 100 (word embeddings), hidden 500, batch 32, 25 steps,
the upstream gradient a fixed random tensor (the loss head is left out so the ratios
are the LSTM's own). The input requires grad, as an embedding's output does. Variants:

* ``nn.LSTM``: torch's fused kernel (oneDNN on x86 CPUs), forward and backward;
* ``fused k=0``: ``MePropLSTM(k=0)``, which calls the same kernel (a parity check);
* ``manual dense``: ``MePropLSTM`` forced through its whole-sequence autograd Function
  with ``k = hidden`` (every unit selected, so no selection): the cost of the manual
  BPTT itself, the fair base for the meProp variants' k/h saving;
* ``unified k``: one unit set per step for the batch (GEMMs on 4k gate rows), the
  Python BPTT loop (``MESIMP_KERNELS=python``);
* ``unified k (compiled)``: the same through the compiled op
  (``torch.ops.mesimp.lstm_backward``: the whole BPTT in one call), where the kernels
  are built;
* ``topk k``: per-example unit sets (dense GEMMs on a zeroed gradient; no GEMM saving).

Two timings per variant: **fwd+bwd** (forward, then ``backward``) and **bwd**
(``backward`` alone; the forward runs outside the timed region). The machines are
noisy (shared cores), so all variants run interleaved in one process: ``rounds``
rounds, each running every variant for ``iters`` iterations (order alternating). A
variant's time is the median over rounds of its per-iteration mean; a ratio is
``baseline / variant`` (above 1 = faster than the baseline). The JSON also has each
variant's best round and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import mesimp.nn.lstm as mlstm
from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.nn import kernels
from mesimp.nn.lstm import MePropLSTM, lstm_op_built
from mesimp.nn.meprop import MePropConfig

EMB, HID, BATCH, STEPS = 100, 500, 32, 25
UNIFIED_KS = (10, 20, 50)
TOPK_KS = (20,)
N_BATCHES = 4  # distinct random inputs, cycled


class ManualDense(MePropLSTM):
    """``k = hidden`` through the manual BPTT (the module itself would run fused)."""

    def _use_sparse(self, k: int, masked: bool, tensors: list[torch.Tensor]) -> bool:
        return torch.is_grad_enabled()


def make_variants(seed: int, unified_ks: tuple[int, ...] = UNIFIED_KS) -> dict[str, nn.Module]:
    """The models by variant name; a name ending in ``(compiled)`` runs on the kernels."""
    torch.manual_seed(seed)
    base = nn.LSTM(EMB, HID, batch_first=True)
    out: dict[str, nn.Module] = {"nn.LSTM": base}
    out["fused k=0"] = MePropLSTM.from_lstm(base, MePropConfig(k=0))
    out["manual dense"] = ManualDense.from_lstm(base, MePropConfig(k=HID))
    for k in unified_ks:
        cfg = MePropConfig(k=k, selection="unified")
        out[f"unified k={k}"] = MePropLSTM.from_lstm(base, cfg)
        if lstm_op_built():
            out[f"unified k={k} (compiled)"] = MePropLSTM.from_lstm(base, cfg)
    for k in TOPK_KS:
        out[f"topk k={k}"] = MePropLSTM.from_lstm(base, MePropConfig(k=k, selection="topk"))
    for m in out.values():
        if isinstance(m, MePropLSTM):
            m.counting = False  # meSimp counting is cheap, but not what is measured here
    return out


Runner = Callable[[int], float]  # runs n iterations, returns the seconds to count


def runner(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    bwd_only: bool,
    path: str = "python",
) -> Runner:
    """Runs ``n`` iterations under the kernel mode ``path`` (set at each call, since the
    variants interleave)."""
    params = list(model.parameters())
    state = {"i": 0}

    def run(n: int) -> float:
        kernels.set_kernels(path)
        total = 0.0
        for _ in range(n):
            state["i"] = (state["i"] + 1) % len(data)
            x, g = data[state["i"]]
            x = x.detach().requires_grad_(True)
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            out = model(x)[0]
            if bwd_only:
                t0 = time.perf_counter()
            out.backward(g)
            total += time.perf_counter() - t0
        return total

    return run


def interleaved(
    runners: dict[str, Runner], rounds: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Per-iteration seconds of each runner in each round, runners interleaved (the
    runners switch the kernel mode; the caller's is restored at the end)."""
    names = list(runners)
    before = kernels.mode()
    try:
        for name in names:
            runners[name](warmup)
        out: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                out[name].append(runners[name](iters) / iters)
    finally:
        kernels.set_kernels(before)
    return out


def summarize(times: dict[str, list[float]]) -> dict[str, dict]:
    """Median ms, best-round ms and ratios vs nn.LSTM and vs the manual dense path."""
    res: dict[str, dict] = {}
    for name, ts in times.items():
        row = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
        for base_key, base in (("nn", "nn.LSTM"), ("manual", "manual dense")):
            bt = times[base]
            row[f"ratio_{base_key}"] = statistics.median(bt) / statistics.median(ts)
            row[f"paired_ratio_{base_key}"] = statistics.median(
                [a / b for a, b in zip(bt, ts, strict=True)]
            )
        res[name] = row
    return res


def markdown(fb: dict[str, dict], bw: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "| variant | fwd+bwd ms | vs nn.LSTM | vs manual dense | bwd ms | vs nn.LSTM "
        "| vs manual dense |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in fb:
        a, b = fb[name], bw[name]
        lines.append(
            f"| {name} | {a['median_ms']:.2f} | {a['ratio_nn']:.2f}x | {a['ratio_manual']:.2f}x "
            f"| {b['median_ms']:.2f} | {b['ratio_nn']:.2f}x | {b['ratio_manual']:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"h={HID}, input {EMB}, batch {BATCH}, T={STEPS}, float32, {args.threads} thread(s), "
        f"oneDNN GEMMs in MePropLSTM {'on' if args.onednn else 'off'}; median over "
        f"{args.rounds} interleaved rounds x {args.iters} iterations; ratio = baseline "
        "time / variant time (above 1 = faster)."
    )
    l0, l1 = args.loadavg
    lines.append(
        f"1-min load average {l0:.2f} at start, {l1:.2f} at end, on {os.cpu_count()} CPUs "
        f"(above {args.threads}: other processes competed for the cores)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny repetition counts (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds")
    p.add_argument("--iters", type=int, help="iterations per variant per round")
    p.add_argument("--warmup", type=int, help="warm-up iterations per variant")
    p.add_argument(
        "--no-onednn",
        dest="onednn",
        action="store_false",
        help="MePropLSTM's GEMMs through torch (MKL) instead of oneDNN",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ks",
        type=lambda v: [int(k) for k in v.split(",")],
        default=list(UNIFIED_KS),
        help="unified k values, comma-separated (default %(default)s)",
    )
    args = p.parse_args(argv)
    rounds, iters, warmup = (3, 2, 2) if args.quick else (25, 4, 5)
    args.rounds = args.rounds or rounds
    args.iters = args.iters or iters
    args.warmup = args.warmup if args.warmup is not None else warmup
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mlstm._USE_ONEDNN = args.onednn
    models = make_variants(args.seed, tuple(args.ks))
    g = torch.Generator().manual_seed(args.seed + 1)
    data = [
        (torch.randn(BATCH, STEPS, EMB, generator=g), torch.randn(BATCH, STEPS, HID, generator=g))
        for _ in range(N_BATCHES)
    ]
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    times = {}
    for mode, bwd_only in (("fwd_bwd", False), ("bwd", True)):
        runners = {
            name: runner(m, data, bwd_only, "cpp" if name.endswith("(compiled)") else "python")
            for name, m in models.items()
        }
        times[mode] = interleaved(runners, args.rounds, args.iters, args.warmup)
        print(f"  done {mode} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    args.loadavg = (load_start[0], os.getloadavg()[0])
    fb, bw = summarize(times["fwd_bwd"]), summarize(times["bwd"])
    print(markdown(fb, bw, args))
    elapsed = time.perf_counter() - t_start
    print(f"\n(total {elapsed:.0f} s)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "onednn": args.onednn and mlstm._onednn_works(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "shape": {"input": EMB, "hidden": HID, "batch": BATCH, "steps": STEPS},
            "rounds": args.rounds,
            "compiled_lstm": lstm_op_built(),
            "iters": args.iters,
            "warmup": args.warmup,
            "elapsed_s": elapsed,
            "loadavg_start": args.loadavg[0],
            "loadavg_end": args.loadavg[1],
            "cpus": os.cpu_count(),
        }
        doc = {"meta": meta, "fwd_bwd": fb, "bwd": bw, "raw_s": times}
        atomic_write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
