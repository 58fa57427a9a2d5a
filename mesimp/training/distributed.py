"""Data-parallel training under ``torchrun``: which rank this is, its shard, agreement.

The loop runs unchanged in every process that ``torchrun`` starts; this module is what
it needs to know about the others:

* ``Distributed.from_env()`` joins the process group ``torchrun`` describes (``WORLD_SIZE``,
  ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): ``gloo`` for CPU, ``nccl`` for CUDA.
  A plain ``mesimp train`` is world 1 and none of this costs anything.
* ``shard``: ``DistributedSampler``'s rule on the run's seeded permutation (pad it by
  wrapping to a multiple of the world size, rank r takes every world-th index from r),
  so the global batch is the per-rank batch x world, and one process reproduces it.
* ``agree``: one small all-reduce a step so that every rank stops at the same step (a
  signal, a NaN loss on one rank's shard); ranks that disagreed would hang in DDP's
  next all-reduce.
* ``gather``: the per-rank state a resume needs (RNG, MSBP memory, meSimp counters),
  collected on every rank so rank 0 can write it.

Every rank runs the same steps, evaluations and saves included, so the collectives line
up; rank 0 alone writes files and logs. The weights are the same on every rank: DDP
averages the gradients, and meSimp's counters are summed before the keep rule runs
(``Simplifier``), so every rank applies the same masks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mesimp.errors import BadInputError, MesimpError
from mesimp.nn.linear import MePropCounters
from mesimp.training.runsafety import rng_state, set_rng_state


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group and ends it

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """World 1 unless ``torchrun`` (or an initialized process group) says otherwise.

        ``device``: ``auto`` (CUDA when available, one GPU per local rank), ``cpu`` or
        ``cuda``.
        """
        if device not in ("auto", "cpu", "cuda"):
            raise BadInputError(f"--device must be auto, cpu or cuda, got {device!r}")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise BadInputError("--device cuda: no CUDA device is available")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dev)
        if world <= 1:
            return cls(0, 1, dev)
        if not dist.is_available():
            raise BadInputError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev, owns_group=True)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, perm: torch.Tensor) -> torch.Tensor:
        """This rank's indices of an epoch's permutation (``DistributedSampler``'s rule)."""
        if self.world == 1:
            return perm
        total = -(-len(perm) // self.world) * self.world
        padded = torch.cat([perm, perm[: total - len(perm)]]) if total > len(perm) else perm
        return padded[self.rank : total : self.world]

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag is true on every rank when it is true on any."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._comm())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a list of one in world 1)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _comm(self) -> torch.device:
        # nccl all-reduces CUDA tensors; gloo, CPU ones
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------------------
# per-rank state for resume
# --------------------------------------------------------------------------------------
def rank_state(model: nn.Module) -> dict[str, Any]:
    """What differs between ranks: RNG streams, MSBP memory, meSimp counters (and the
    masks, which must not differ)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MePropCounters)}
    return {
        "rng": rng_state(),
        "msbp_memory": {n: _cpu(m._state.memory) for n, m in layers.items()},
        "counters": {n: {"hits": _cpu(m.hits), "ref": _cpu(m.ref)} for n, m in layers.items()},
        "masks": {n: _cpu(m.mask) for n, m in layers.items()},
    }


def restore_rank_state(model: nn.Module, mine: dict[str, Any], device: torch.device) -> None:
    """Put back this rank's ``rank_state`` (after the shared weights were loaded)."""
    set_rng_state(mine["rng"])
    for name, mod in model.named_modules():
        if isinstance(mod, MePropCounters) and name in mine["counters"]:
            mod.hits.copy_(mine["counters"][name]["hits"])
            mod.ref.copy_(mine["counters"][name]["ref"])
            memory = mine["msbp_memory"].get(name)
            mod._state.memory = memory.to(device) if memory is not None else None


def check_same_masks(states: list[dict[str, Any]]) -> None:
    """Refuse to save when ranks disagree on the masks. It cannot happen when the
    counters were summed before the rule ran: a guard, not a code path."""
    first = states[0]["masks"]
    for other in states[1:]:
        theirs = other["masks"]
        if first.keys() != theirs.keys() or any(
            not torch.equal(first[k], theirs[k]) for k in first
        ):
            raise MesimpError("the processes disagree on the meSimp masks; not saving")


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().cpu() if t is not None else None


def is_main_process() -> bool:
    """Whether this process prints results: rank 0 of a ``torchrun`` job, or no job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """``mesimp ARGS`` as a ``torchrun`` job of ``nproc`` processes on this machine."""
    if nproc < 1:
        raise BadInputError(f"--nproc must be >= 1, got {nproc}")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc_per_node={nproc}", "-m", "mesimp.cli", *args]


def relaunch(nproc: int, args: list[str]) -> None:
    """Replace this process with ``torchrun`` running ``mesimp ARGS`` ``nproc`` times."""
    if "WORLD_SIZE" in os.environ:  # each torchrun worker would start a torchrun of its own
        raise BadInputError("--nproc: this is already a torchrun process; drop --nproc")
    cmd = torchrun_command(nproc, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
