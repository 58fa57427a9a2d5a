"""meProp layers under stock ``DistributedDataParallel`` (2 CPU processes, gloo): the dense
default gradients all-reduce like any other. The reference is each rank's own local
backward on a non-DDP copy; DDP's gradient must be their mean on every rank."""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mesimp import MePropConfig, meprop_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model on every rank
    net = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    meprop_(net, MePropConfig(k=4, selection="topk"))
    local = copy.deepcopy(net)
    ddp = DDP(net)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    x, y = torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
    F.cross_entropy(ddp(x), y).backward()
    F.cross_entropy(local(x), y).backward()
    mine = [p.grad.clone() for p in local.parameters()]
    gathered = [[torch.zeros_like(t) for t in mine] for _ in range(world)]
    for i, t in enumerate(mine):
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        for r in range(world):
            gathered[r][i] = parts[r]
    expected = [sum(gathered[r][i] for r in range(world)) / world for i in range(len(mine))]
    got = [p.grad for p in net.parameters()]
    ok = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))
    sparse = any(p.grad.is_sparse for p in net.parameters())
    torch.save({"ok": ok, "sparse": sparse, "grad0": got[0]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_averages_meprop_gradients_across_two_processes(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["ok"] and r1["ok"] and not r0["sparse"]
    assert torch.equal(r0["grad0"], r1["grad0"])  # every rank holds the same gradient
