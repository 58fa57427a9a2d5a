"""What DDP communication costs meProp training, and what row-sparse all-reduce would save.

    python -m benchmarks.ddp_comm [--steps N] [--batch B] [--k K]

Two CPU processes (gloo, loopback), each training the MLP 784-500-500-10 with meProp
(unified k) on its own random shard of batch B, 1 torch thread each. Interleaved in
one run, per step (median of ``--steps``):

* ``local``: forward + backward + Adam on one process, no communication;
* ``ddp``: the same under stock ``DistributedDataParallel`` (dense gradients averaged);
* ``allreduce dense``: one ``all_reduce`` of every gradient, flattened into one buffer
  (what DDP moves, in its buckets);
* ``allreduce rows``: one ``all_reduce`` of what a row-sparse scheme would move with
  unified selection agreed across ranks: the k selected rows of each meProp weight plus
  the dense output layer and biases.

It prints the communication share of a DDP step and the bytes and time that the
row-sparse scheme would save. Measured on the 2-core machine, so the two processes
also compete for the cores; on separate machines the network is the cost instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mesimp import MePropConfig, meprop_


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )


def _worker(rank: int, port: int, a: argparse.Namespace, q: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = MePropConfig(k=a.k, selection="unified")
    local, net = meprop_(_mlp(), cfg), meprop_(_mlp(), cfg)
    ddp = DDP(net)
    opts = {
        "local": torch.optim.Adam(local.parameters(), 1e-3),
        "ddp": torch.optim.Adam(ddp.parameters(), 1e-3),
    }
    g = torch.Generator().manual_seed(rank)
    x, y = torch.rand(a.batch, 784, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
    grads = [torch.zeros_like(p) for p in net.parameters()]
    rows = [
        torch.zeros(a.k, p.shape[1]) if p.dim() == 2 and i < 4 else torch.zeros_like(p)
        for i, p in enumerate(net.parameters())
    ]
    # one flat buffer each, as DDP's buckets and any row-sparse scheme would send them
    dense_flat = torch.cat([t.flatten() for t in grads])
    rows_flat = torch.cat([t.flatten() for t in rows])
    times: dict[str, list[float]] = {k: [] for k in ("local", "ddp", "dense", "rows")}

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(a.steps):
        for name, fn in (
            ("local", lambda: step(local, opts["local"])),
            ("ddp", lambda: step(ddp, opts["ddp"])),
            ("dense", lambda: dist.all_reduce(dense_flat)),
            ("rows", lambda: dist.all_reduce(rows_flat)),
        ):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({k: statistics.median(v) * 1e3 for k, v in times.items()})
        q.put(
            {"dense": sum(t.numel() for t in grads) * 4, "rows": sum(t.numel() for t in rows) * 4}
        )
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_worker, args=(port, a, q), nprocs=2, join=True)
    ms, nbytes = q.get(), q.get()
    print(f"MLP 784-500-500-10, unified k={a.k}, batch {a.batch} per rank, 2 processes (gloo)\n")
    print("| per step | ms (median) |")
    print("|---|---:|")
    for key, label in (
        ("local", "train step, one process, no communication"),
        ("ddp", "train step under DDP (dense gradients)"),
        ("dense", f"all_reduce of all gradients ({nbytes['dense'] / 1e6:.2f} MB)"),
        ("rows", f"all_reduce of k rows + output layer + biases ({nbytes['rows'] / 1e6:.3f} MB)"),
    ):
        print(f"| {label} | {ms[key]:.3f} |")
    share = (ms["ddp"] - ms["local"]) / ms["ddp"]
    print(
        f"\nDDP overhead: {share:.0%} of a DDP step; row-sparse all-reduce would move "
        f"{nbytes['dense'] / nbytes['rows']:.0f}x fewer bytes and take "
        f"{ms['dense'] / ms['rows']:.1f}x less time than the dense one."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
