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


def _leave() -> None:
    """Both ranks reach the end, then leave without tearing gloo down: its worker threads
    can still be joinable when the group or the interpreter is destroyed, and a rank
    then aborts ("terminate called without an active exception"; twice in CI, once
    even after a barrier). The results are on disk by now, and ``os._exit(0)`` is the
    clean exit ``mp.spawn`` checks for, without running any destructor."""
    dist.barrier()
    os._exit(0)


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
    _leave()


def test_ddp_averages_meprop_gradients_across_two_processes(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["ok"] and r1["ok"] and not r0["sparse"]
    assert torch.equal(r0["grad0"], r1["grad0"])  # every rank holds the same gradient


STEPS, SHARD = 12, 8


def _data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard of global batch ``step`` that ``rank`` trains on."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(SHARD, 10, generator=g), torch.randint(0, 3, (SHARD,), generator=g)


def _simplified_run(rank: int, world: int, record: list) -> nn.Module:
    """meSimp with per-example top-k; ``world`` shards per global batch on ``world``
    ranks (or all of them in one process when ``world == 1`` and ``rank == -1``)."""
    from mesimp import Simplifier, SimplifyConfig

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)
    )
    meprop_(net, MePropConfig(k=6, selection="topk"))
    model = DDP(net) if dist.is_initialized() else net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    simp = Simplifier(
        net,
        SimplifyConfig(prune_rate=0.15, points_per_epoch=2, cycle_epochs=0),
        opt,
        steps_per_epoch=6,
    )
    for step in range(STEPS):
        shards = [_data(step, r) for r in (range(2) if rank < 0 else [rank])]
        x, y = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        local = {n: (m.hits.clone(), m.ref.clone()) for n, m in simp.layers.items()}
        if any(e["event"] == "simplify" for e in simp.step()):  # a point: local counts, masks
            masks = {n: m.mask.clone() for n, m in simp.layers.items()}
            record.append({"local": local, "masks": masks})
    return net


def _simplify_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    record: list = []
    _simplified_run(rank, world, record)
    torch.save(record, f"{out}.{rank}")
    _leave()


def test_simplifier_sums_counts_across_ranks_and_matches_one_process(tmp_path):
    from mesimp.simplify.rule import keep_rule

    out = str(tmp_path / "s")
    mp.spawn(_simplify_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert len(r0) == len(r1) == 4  # two points per epoch, two epochs
    one: list = []
    _simplified_run(-1, 1, one)  # one process, the same global batches
    for p0, p1, p_one in zip(r0, r1, one, strict=True):
        for name, mask in p0["masks"].items():
            assert torch.equal(mask, p1["masks"][name])  # every rank: the same masks
            # the rule ran on the counts summed over the ranks
            hits = p0["local"][name][0] + p1["local"][name][0]
            ref = p0["local"][name][1] + p1["local"][name][1]
            if int(ref) > 0 and p0 is r0[0]:
                assert torch.equal(mask, keep_rule(hits, ref, 0.15))
            # and a single process over the same global batches sets the same masks
            assert torch.equal(mask, p_one["masks"][name])
    assert any(not m.all() for m in r0[-1]["masks"].values())  # something was pruned
