"""The C# reference's meSimp schedule, for ``TrainConfig(reference=True, simplify=...)``.

lancopku/meSimp ``src/nnmnist`` (the MNIST MLP, ``NetType.mlpvar``), point by point:

* **When.** After every chunk of an epoch (``IterPerEpoch`` = 8 chunks, the same 8 as
  the dev checks), *after* that chunk's dev check (and the test evaluation when dev
  improved), ``Mnist.cs:70-155`` (the reset at line 121, the prune at 127-133):
    - if ``(epoch + 1) % TrainCycle == 0``: ``Adam.Prepare`` zeroes every parameter's
      m and v and keeps the step counter (``Adam.cs:30-52``; ``_times`` is never
      reset, line 56). So in the *last epoch of every cycle* (epochs 4, 9, 14, 19 of 20 with
      ``TrainCycle`` 5), simplifying or plain, the moments are zeroed 8 times;
    - if ``(epoch / TrainCycle) % 2 == 0``: ``MLPVar.Prune(0.1)`` on each hidden layer.
      Epochs 0-4 and 10-14 prune after every chunk (40 + 40 points), 5-9 and 15-19
      never.
* **The rule** (``Record.cs:40-55``): ``th = (int)(refer * percent)`` with ``percent``
  the float 0.1 widened to double; a unit with ``hit < th`` is masked; every hit and
  ``refer`` restart at 0. A masked unit never returns (``Mask`` only turns false), and
  no minimum width applies.
* **Counting never pauses** (``Flow.cs:808-845`` ``MultiplyTopRecord`` records at every
  training step; ``MLPVar.cs:67`` and ``DenseMaskedUnit.cs:58-60`` call it in every
  epoch): the plain cycles keep counting, and
  nothing resets the counts at a cycle start, so the first point of a simplifying cycle
  after a plain one judges the whole plain cycle plus one chunk.
* **What counts** is ``mesimp.nn.heap_select`` (every one of the k slots of every
  example, zero-gradient fills included), with k fixed: 160 at every width.
* **The dev check sees the model before that chunk's prune**, and the test accuracy
  reported is the one at the best dev check over the whole run (it never restarts when
  a width changes, unlike mesimp's own loop).

``ReferenceSimplifier`` does the per-chunk part; counting lives in the layers. Its
``reset`` argument (``TrainConfig.extra["reference_reset"]``, Python API only) is an
ablation of the one point above that is easy to doubt: ``"moments"`` is the C# code,
``"fresh"`` zeroes Adam's step counter too, ``"none"`` never resets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mesimp.errors import BadInputError
from mesimp.simplify.rule import SimplifyConfig, prunable_layers

__all__ = ["ReferenceSimplifier", "reference_keep"]

RESETS = ("moments", "fresh", "none")  # the C# code: "moments"


def reference_keep(hits: torch.Tensor, ref: int, prune_rate: float) -> torch.Tensor:
    """``Record.Update``: keep ``hits >= (int)(ref * (double)(float)prune_rate)``."""
    threshold = int(int(ref) * float(np.float32(prune_rate)))
    return hits >= threshold


class ReferenceSimplifier:
    """The reference's per-chunk prune and Adam resets (see the module docstring).

    The loop calls ``step()`` after every optimizer step (a no-op: the reference acts
    only at chunk ends) and ``after_check(epoch)`` after each chunk's dev check.
    """

    def __init__(
        self, model: nn.Module, config: SimplifyConfig, optimizer: Any, reset: str = "moments"
    ) -> None:
        if reset not in RESETS:
            raise BadInputError(
                f"reference_reset must be one of {', '.join(RESETS)}, got {reset!r}"
            )
        if config.cycle_epochs < 1:
            raise BadInputError("--reference --simplify needs --cycle-epochs >= 1")
        if not hasattr(optimizer, "reset_moments"):
            raise BadInputError("--reference --simplify needs the reference's Adam")
        self.model = model
        self.reset = reset
        self.config = config
        self.optimizer = optimizer
        self.layers = dict(prunable_layers(model))
        if not self.layers:
            raise BadInputError("no meProp hidden layer to simplify")
        self.steps = 0
        self.resets = 0  # moment zeroings done

    @property
    def widths(self) -> list[int]:
        return [layer.active_width for layer in self.layers.values()]

    def step(self) -> list[dict[str, Any]]:
        self.steps += 1
        return []

    def after_check(self, epoch: int) -> list[dict[str, Any]]:
        """One chunk end of 0-based ``epoch``: maybe zero Adam's moments, maybe prune."""
        cycle = self.config.cycle_epochs
        events: list[dict[str, Any]] = []
        if (epoch + 1) % cycle == 0 and self.reset != "none":
            self.optimizer.reset_moments(keep_step=self.reset == "moments")
            self.resets += 1
            events.append({"event": "optimizer_reset", "epoch": epoch, "step": self.steps})
        if (epoch // cycle) % 2 == 0:
            self._sum_counts_across_ranks()
            refs = [int(layer.ref) for layer in self.layers.values()]
            for layer, ref in zip(self.layers.values(), refs, strict=True):
                layer.apply_mask(reference_keep(layer.hits, ref, self.config.prune_rate))
                layer.reset_counters()
            events.append(
                {
                    "event": "simplify",
                    "epoch": epoch,
                    "step": self.steps,
                    "ref": refs,
                    "widths": self.widths,
                }
            )
        return events

    def _sum_counts_across_ranks(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for layer in self.layers.values():
            dist.all_reduce(layer.hits)
            dist.all_reduce(layer.ref)
