"""meProp speed benchmark: MLP 784-500-500-10 on CPU, dense vs meProp.

Run::

    python -m benchmarks.meprop_speed [--quick] [--json FILE] [--threads 1,2]

For each batch size b, top-k k and selection rule it reports

* **backward speedup**: time of ``loss.backward()`` alone (forward and
  ``grad = None`` happen outside the timed region), dense ``nn.Linear`` model over
  the meProp model (hidden layers meProp, output layer dense: the paper's setting);
* **whole-step speedup** (forward + backward + ``optimizer.step()`` +
  ``zero_grad(set_to_none=True)``), dense baseline = the faster of torch's fused and
  foreach Adam, over

  - meProp with row-sparse gradients and ``RowSparseAdam`` (``sparse_update=True``);
  - meProp with the dense-exact path (``sparse_grad=False``) and fused Adam;
* the **FLOP limit** of the backward: dense backward FLOPs / meProp backward FLOPs
  (layer 1: dW only, no dx; layer 2: dx and dW; output layer dense dx and dW), and
  the mean size of the selected union |U| per hidden layer (per-example selection
  updates |U| rows; its dx/dW run as embedding_bag over the b*k selected entries).

The machines this runs on are noisy (shared cores), so all variants of one
configuration are measured in the same run, interleaved: ``rounds`` rounds, each
running every variant for ``iters`` iterations after one untimed iteration that warms
its caches again (the order alternates every round).
Competing processes only ever *add* time, and on a shared 2-core box they do so in
bursts (a sample is either clean or ~2x slow), so a variant's time is its best
round (per-iteration mean of its fastest round) and a speedup is the ratio of two
such times. Over repeated full runs on a loaded machine this was the most
reproducible estimator (mean |log| run-to-run deviation ~0.10, vs ~0.2 for the
ratio of per-variant medians); the medians and the median of per-round ratios are
in the JSON too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.models import MLP, MLPConfig
from mesimp.nn import kernels
from mesimp.nn.fused import train_step
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import build_optimizer

IN, HID, OUT = 784, 500, 10
BATCHES = (50, 100)
KS = (10, 20, 40, 80)
SELECTIONS = ("topk", "unified", "random")
N_BATCHES = 8  # distinct random minibatches, cycled (so no variant overfits one batch)
LR = 1e-3


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, HID), nn.ReLU(), nn.Linear(HID, OUT)
    )


def backward_flops(b: int, k: int | None) -> int:
    """Backward GEMM FLOPs of the MLP; ``k=None`` is dense.

    Layer 1 needs no dx (its input is data), layer 2 needs dx and dW, the output
    layer is always dense.
    """
    h = HID if k is None else min(k, HID)
    layer1 = 2 * b * h * IN  # dW
    layer2 = 2 * (2 * b * h * HID)  # dx and dW
    out = 2 * (2 * b * OUT * HID)  # dense dx and dW
    return layer1 + layer2 + out


def flop_limit(b: int, k: int) -> float:
    return backward_flops(b, None) / backward_flops(b, k)


# -- timing -------------------------------------------------------------------------------
Runner = Callable[[int], float]  # runs n iterations, returns the seconds to count


class _Batches:
    def __init__(self, b: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = [
            (torch.randn(b, IN, generator=g), torch.randint(0, OUT, (b,), generator=g))
            for _ in range(N_BATCHES)
        ]
        self.i = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i = (self.i + 1) % len(self.data)
        return self.data[self.i]


@contextlib.contextmanager
def kernel_mode(path: str) -> Iterator[None]:
    """Run under kernel mode ``path``, then restore the caller's (a runner must not move
    whoever imported it onto another path)."""
    before = kernels.mode()
    kernels.set_kernels(path)
    try:
        yield
    finally:
        kernels.set_kernels(before)


def backward_runner(model: nn.Module, batches: _Batches, path: str = "python") -> Runner:
    """Times ``loss.backward()`` only; ``path`` is the kernel mode it runs under."""
    params = list(model.parameters())

    def run(n: int) -> float:
        total = 0.0
        with kernel_mode(path):
            for _ in range(n):
                for p in params:
                    p.grad = None
                x, y = batches.next()
                loss = F.cross_entropy(model(x), y)
                t0 = time.perf_counter()
                loss.backward()
                total += time.perf_counter() - t0
        return total

    return run


def step_runner(
    model: nn.Module, opt: torch.optim.Optimizer, batches: _Batches, path: str = "python"
) -> Runner:
    """Times a whole training step: forward, backward, step, zero_grad."""

    def run(n: int) -> float:
        with kernel_mode(path):
            t0 = time.perf_counter()
            for _ in range(n):
                x, y = batches.next()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    return run


def forward_runner(model: nn.Module, batches: _Batches) -> Runner:
    """Times forward + loss alone (graph built, no backward): what every variant's step
    keeps dense, so ``dense step / this`` caps any whole-step speed-up."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = batches.next()
            F.cross_entropy(model(x), y)
        return time.perf_counter() - t0

    return run


def gemm_floor_runner(base: nn.Module, batches: _Batches, k: int) -> Runner:
    """Times the GEMMs alone of a unified meProp step at ``k``: the dense forward (three
    ``addmm`` + ReLU) and loss without autograd, then the five backward GEMMs at their
    gathered shapes (inputs made outside the timed region). No selection, gathering,
    bias gradients, engine or optimizer: what any step that keeps torch's GEMMs must
    still pay, so ``dense step / this`` is the whole-step ceiling on this machine."""
    (w1, b1), (w2, b2), (w3, b3) = [
        (m.weight.detach(), m.bias.detach()) for m in base if isinstance(m, nn.Linear)
    ]
    h = min(k, HID)
    b = batches.data[0][0].shape[0]
    g = torch.Generator().manual_seed(0)
    d_out, d2, d1 = (torch.randn(b, n, generator=g) for n in (OUT, h, h))
    w2_rows = w2[:h].contiguous()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                x, y = batches.next()
                h1 = torch.addmm(b1, x, w1.t()).relu_()
                h2 = torch.addmm(b2, h1, w2.t()).relu_()
                F.cross_entropy(torch.addmm(b3, h2, w3.t()), y)
                d_out.t().mm(h2), d_out.mm(w3)  # output layer: dW, dx (dense)
                d2.t().mm(h1), d2.mm(w2_rows)  # layer 2: dW rows, dx
                d1.t().mm(x)  # layer 1: dW rows
        return time.perf_counter() - t0

    return run


def train_step_runner(model: nn.Module, opt: torch.optim.Optimizer, batches: _Batches) -> Runner:
    """Times ``mesimp.nn.fused.train_step`` (the whole step in one compiled call)."""

    def run(n: int) -> float:
        with kernel_mode("cpp"):
            t0 = time.perf_counter()
            for _ in range(n):
                x, y = batches.next()
                train_step(model, x, y, opt)
            return time.perf_counter() - t0

    return run


def interleaved(
    runners: dict[str, Runner], rounds: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Per-iteration seconds of each runner in each round, runners interleaved.

    Each timed block follows one untimed iteration of the same runner: the variant run
    just before has evicted this one's weights and optimizer state from the caches, and
    that cold first iteration costs the dense step (~10 MB of Adam state) far more than
    a meProp one, which would inflate every speed-up by up to ~20 % over what a training
    run (one variant, caches warm) sees."""
    names = list(runners)
    for name in names:
        runners[name](warmup)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            runners[name](1)
            out[name].append(runners[name](iters) / iters)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- one configuration --------------------------------------------------------------------
def meprop_copy(
    base: nn.Module, k: int, selection: str, sparse_grad: bool = True, fused: bool = False
) -> nn.Module:
    """A meProp copy of ``base``: a plain ``nn.Sequential`` (one autograd node per layer),
    or with ``fused`` mesimp's ``MLP`` (the same weights; its forward takes the fused
    one-node path when the kernels are on)."""
    model = copy.deepcopy(base)
    if fused:
        mlp = MLP(MLPConfig(in_features=IN, hidden_sizes=[HID, HID], out_features=OUT))
        mlp.load_state_dict(base.state_dict())
        model = mlp
    return meprop_(model, MePropConfig(k=k, selection=selection, sparse_grad=sparse_grad))


def union_sizes(base: nn.Module, batches: _Batches, k: int, selection: str) -> list[float]:
    """Mean |U| (distinct selected neurons over the minibatch) per hidden layer."""
    model = meprop_copy(base, k, selection)
    hidden = [m for m in model if hasattr(m, "hits")]
    sizes: list[list[int]] = [[] for _ in hidden]
    for x, y in batches.data:
        for m in hidden:
            m.reset_counters()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for i, m in enumerate(hidden):
            sizes[i].append(int((m.hits > 0).sum()))
    return [sum(s) / len(s) for s in sizes]


def bench_config(
    base: nn.Module, b: int, k: int, selection: str, rounds: int, iters: int, warmup: int, seed: int
) -> dict:
    # Backward only: dense, the Python path, the compiled per-layer path, the fused path.
    cpp = kernels.available()
    batches = _Batches(b, seed)
    bwd_runners = {
        "dense": backward_runner(copy.deepcopy(base), batches),
        "meprop": backward_runner(meprop_copy(base, k, selection), batches),
    }
    if cpp:
        bwd_runners["layer"] = backward_runner(meprop_copy(base, k, selection), batches, "cpp")
        bwd_runners["fused"] = backward_runner(
            meprop_copy(base, k, selection, fused=True), batches, "cpp"
        )
    bwd = interleaved(bwd_runners, rounds, iters, warmup)

    # Whole step; every variant starts from the same weights.
    batches = _Batches(b, seed)
    d_fused = copy.deepcopy(base)
    d_foreach = copy.deepcopy(base)
    mp_sparse = meprop_copy(base, k, selection, sparse_grad=True)
    mp_exact = meprop_copy(base, k, selection, sparse_grad=False)

    def sparse_adam(m: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer("adam", m.parameters(), LR, sparse_update=True)

    runners = {
        "dense_fused": step_runner(
            d_fused, torch.optim.Adam(d_fused.parameters(), lr=LR, fused=True), batches
        ),
        "dense_foreach": step_runner(
            d_foreach, torch.optim.Adam(d_foreach.parameters(), lr=LR, foreach=True), batches
        ),
        "dense_forward": forward_runner(copy.deepcopy(base), batches),
        "gemm_floor": gemm_floor_runner(base, batches, k),
        "meprop_sparse": step_runner(mp_sparse, sparse_adam(mp_sparse), batches),
        "meprop_exact": step_runner(
            mp_exact,
            build_optimizer("adam", mp_exact.parameters(), LR, sparse_update=False),
            batches,
        ),
    }
    if cpp:
        layer = meprop_copy(base, k, selection)
        fused = meprop_copy(base, k, selection, fused=True)
        one = meprop_copy(base, k, selection, fused=True)
        runners["layer"] = step_runner(layer, sparse_adam(layer), batches, "cpp")
        runners["fused"] = step_runner(fused, sparse_adam(fused), batches, "cpp")
        runners["train_step"] = train_step_runner(one, sparse_adam(one), batches)
    step = interleaved(runners, rounds, iters, warmup)
    return {
        "b": b,
        "k": k,
        "selection": selection,
        "backward_s": bwd,
        "step_s": step,
        "backward_median_s": {n: median(v) for n, v in bwd.items()},
        "step_median_s": {n: median(v) for n, v in step.items()},
        "flop_limit": flop_limit(b, k),
        "union": union_sizes(base, _Batches(b, seed), k, selection),
    }


# -- driver -------------------------------------------------------------------------------
def _ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """Speedup ``num / den`` three ways: ``min`` (reported: best round over best round),
    ratio of medians, and ``paired`` (median of the per-round ratios)."""
    return {
        "min": min(num) / min(den),
        "median": median(num) / median(den),
        "paired": median([a / b for a, b in zip(num, den, strict=True)]),
    }


def summarize(results: list[dict]) -> dict[int, str]:
    """Per batch size, the dense Adam (fused or foreach) that is faster (pooled)."""
    best: dict[int, str] = {}
    for b in sorted({r["b"] for r in results}):
        rs = [r for r in results if r["b"] == b]
        pooled = {
            n: median([min(r["step_s"][n]) for r in rs]) for n in ("dense_fused", "dense_foreach")
        }
        best[b] = min(pooled, key=pooled.get)
    for r in results:
        base = r["step_s"][best[r["b"]]]
        r["dense_baseline"] = best[r["b"]]
        r["speedups"] = {
            "backward": _ratios(r["backward_s"]["dense"], r["backward_s"]["meprop"]),
            "step_sparse": _ratios(base, r["step_s"]["meprop_sparse"]),
            "step_exact": _ratios(base, r["step_s"]["meprop_exact"]),
        }
        for name in ("layer", "fused"):
            if name in r["backward_s"]:
                r["speedups"][f"backward_{name}"] = _ratios(
                    r["backward_s"]["dense"], r["backward_s"][name]
                )
        for name in ("layer", "fused", "train_step"):
            if name in r["step_s"]:
                r["speedups"][f"step_{name}"] = _ratios(base, r["step_s"][name])
        r["speedup"] = {n: v["min"] for n, v in r["speedups"].items()}
        # the whole-step cap: a step that keeps the dense forward and loss
        r["step_cap"] = min(base) / min(r["step_s"]["dense_forward"])
        # ... and one that also keeps the backward GEMMs at k, everything else free
        r["step_ceiling"] = min(base) / min(r["step_s"]["gemm_floor"])
    return best


def markdown(results: list[dict], best: dict[int, str], args: argparse.Namespace) -> str:
    cpp = any("backward_fused" in r["speedup"] for r in results)
    head = "| b | k | selection | backward: Python | "
    head += "compiled layer | fused MLP | " if cpp else ""
    head += "whole step: Python (sparse Adam) | dense-exact | "
    head += "compiled layer | fused MLP | train_step | " if cpp else ""
    head += "step ceiling (GEMMs only) | FLOP limit (bwd) | mean \\|U\\| l1/l2 |"
    ncols = 9 + (5 if cpp else 0)
    lines = [head, "|---:|---:|:---|" + "---:|" * (ncols - 3)]
    for r in results:
        s = r["speedup"]
        u1, u2 = r["union"]
        cells = [str(r["b"]), str(r["k"]), r["selection"], f"{s['backward']:.2f}x"]
        if cpp:
            cells += [f"{s['backward_layer']:.2f}x", f"{s['backward_fused']:.2f}x"]
        cells += [f"{s['step_sparse']:.2f}x", f"{s['step_exact']:.2f}x"]
        if cpp:
            cells += [f"{s[n]:.2f}x" for n in ("step_layer", "step_fused", "step_train_step")]
        cells += [f"{r['step_ceiling']:.2f}x", f"{r['flop_limit']:.1f}x", f"{u1:.0f}/{u2:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Speedup = dense time / meProp time, each the best of the interleaved "
        "rounds. The FLOP limit counts k per example; per-example selection updates "
        "the union |U| of selected rows (its optimizer step scales with |U|, not k). "
        "Step ceiling = dense step / the GEMMs alone of a unified step at k (dense forward "
        "and loss, five backward GEMMs at the gathered shapes; no selection, bookkeeping, "
        "engine or optimizer): the most a whole step that keeps torch's GEMMs could reach."
    )
    lines.append("")
    lines.append(
        "Paths: Python = mesimp's pure-Python meProp (`MESIMP_KERNELS=python`); compiled "
        "layer = the compiled kernels, one autograd node per layer (a plain nn.Sequential); "
        "fused MLP = mesimp's MLP, one autograd node for the stack (both through "
        "loss.backward() and RowSparseAdam); train_step = mesimp.nn.fused.train_step, the "
        "whole step in one compiled call. Kernels: "
        + ("built" if cpp else "not built (Python path only)")
        + ". Random-k draws k units per example (torch.rand scores, as on the Python path): "
        "its cost is the draw, b x width uniforms per layer."
    )
    lines.append("")
    lines.append(
        f"Dense reference, ms per iteration (best round, median over configurations; "
        f"{args.threads} thread(s), {args.rounds} rounds x {args.iters} iterations):"
    )
    for b, name in best.items():
        rs = [r for r in results if r["b"] == b]

        def ms(key: str, n: str, rs: list[dict] = rs) -> float:
            return median([min(r[key][n]) for r in rs]) * 1e3

        lines.append(
            f"- b={b}: dense backward {ms('backward_s', 'dense'):.3f} ms; dense step: "
            f"fused Adam {ms('step_s', 'dense_fused'):.3f} ms, foreach Adam "
            f"{ms('step_s', 'dense_foreach'):.3f} ms; whole-step baseline = "
            f"{name.removeprefix('dense_')} Adam; dense forward + loss "
            f"{ms('step_s', 'dense_forward'):.3f} ms, so no step that keeps them can beat "
            f"{median([r['step_cap'] for r in rs]):.2f}x"
        )
    if args.loadavg:
        l0, l1 = args.loadavg
        lines.append(
            f"- 1-min load average {l0:.2f} at start, {l1:.2f} at end, on "
            f"{os.cpu_count()} CPUs (anything above {args.threads} means other "
            "processes competed for the cores)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny repetition counts (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    p.add_argument(
        "--threads",
        default="1",
        help="torch thread counts, each measured in turn, e.g. 1,2 (default 1); the JSON's "
        "results carry a 'threads' field",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds per configuration")
    p.add_argument("--iters", type=int, help="iterations per variant per round")
    p.add_argument("--warmup", type=int, help="warm-up iterations per variant")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCHES)))
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--selections", default=",".join(SELECTIONS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = (2, 3, 2) if args.quick else (25, 6, 10)
    args.rounds = args.rounds or quick[0]
    args.iters = args.iters or quick[1]
    args.warmup = args.warmup if args.warmup is not None else quick[2]
    args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    args.ks = [int(v) for v in args.ks.split(",")]
    args.selections = [v.strip() for v in args.selections.split(",")]
    try:
        args.thread_counts = [int(v) for v in str(args.threads).split(",")]
    except ValueError:
        p.error("--threads takes comma-separated integers")
    if min(args.thread_counts) < 1:
        p.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    base = make_mlp()
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    results, best, texts = [], {}, []
    for threads in args.thread_counts:  # one thread count after the other, same model
        torch.set_num_threads(threads)
        these = []
        for b in args.batch_sizes:
            for k in args.ks:
                for sel in args.selections:
                    r = bench_config(
                        base, b, k, sel, args.rounds, args.iters, args.warmup, args.seed
                    )
                    these.append({"threads": threads, **r})
                    print(
                        f"  done threads={threads} b={b} k={k} {sel} "
                        f"({time.perf_counter() - t_start:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        best[threads] = summarize(these)
        results += these
        texts.append((threads, these))
    load_end = os.getloadavg()
    args.loadavg = (load_start[0], load_end[0])
    for threads, these in texts:
        args.threads = threads
        print(f"### {threads} thread(s)\n")
        print(markdown(these, best[threads], args))
        print()
    elapsed = time.perf_counter() - t_start
    print(f"\n(total {elapsed:.0f} s)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.thread_counts,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "rounds": args.rounds,
            "iters": args.iters,
            "warmup": args.warmup,
            "model": f"MLP {IN}-{HID}-{HID}-{OUT}",
            "dense_baseline": best,
            "elapsed_s": elapsed,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "cpus": os.cpu_count(),
            "kernels": kernels.available(),
        }
        atomic_write_text(args.json, json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
