"""The C# reference's training semantics (lancopku/meProp ``src/csharp/nnmnist``, the
same code as lancopku/meSimp ``src/nnmnist``), for ``TrainConfig(reference=True)``.

mesimp's defaults differ from the code the papers' numbers came from; this module is
everything the faithful mode changes, point by point (file:line in ``nnmnist/``):

* **Loss: summed over the minibatch.** The softmax gradient is ``p - onehot`` with no
  division by the batch size (``Flow.cs:550-557``): ``reduction="sum"``.
* **Gradient clipping: every element to [-5, 5], inside the optimizer**, on the summed
  gradient, before the moments (``Adam.cs:68-79``, ``ClipBound`` 5): ``ReferenceAdam``.
* **Adam: dense and in Kingma's "efficient" form** (``Adam.cs:56-85``): every element is
  updated every step, zero gradient or not; ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)``,
  ``w -= lr_t m / (sqrt(v) + eps)`` (eps on the *uncorrected* sqrt(v)); lr 1e-3, betas
  (0.9, 0.999), eps 1e-8, no weight decay. Resetting it (``Prepare``) zeroes m and v
  but keeps t (``Adam.cs:30-52``): ``reset_moments``.
* **Bias gradient: dense,** the full column sum of the pre-activation gradient, taken
  before the top-k (``Flow.cs:113-117``): ``MePropConfig(dense_bias=True)``.
* **Init:** weights ~ Normal(0, std = sqrt(6 / (fan_in + fan_out))), not truncated;
  biases 0 (``GlorotNormalInit.cs:17,22``, ``DenseUnit.cs:18``): ``reference_init_``.
* **An epoch is 8 chunks** of the shuffled training set, each trained in minibatches of
  100 whose last one is smaller (6875 = 68 x 100 + 75 on MNIST's 55,000), with the dev
  set evaluated after every chunk and the test accuracy taken at the best (strictly
  greater) dev accuracy (``Mnist.cs:73-97``, ``DataUtil.cs:14-32, 73-88``):
  ``chunked_batches`` with chunks = ``evals_per_epoch``.

What is the same in both: top-k per example on the gradient of the pre-activation
(after the ReLU's derivative) of every hidden layer, the output layer dense
(``MLPTop.cs:28-41``, ``Flow.cs:694-697``); dev = the first 5,000 training images;
pixels / 255. The per-example top-k is the C# ``TopNHeap`` itself (``TopNHeap.cs:26-52``,
``mesimp.nn.heap_select``), down to *which* zero-gradient units fill a row's k slots
when fewer than k are nonzero; that changes no gradient, only meSimp's counts, whose
schedule is ``mesimp.simplify.reference_schedule``. What the faithful mode does not
reproduce: run-to-run randomness (the C# code seeds from the clock and shuffles with
.NET's ``System.Random``) and float32 summation order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

CLIP = 5.0  # ClipBound in default.json


class ReferenceAdam(torch.optim.Optimizer):
    """The reference's Adam: element-wise clip, dense update, eps on the uncorrected
    sqrt(v), one step counter that survives ``reset_moments``."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = CLIP,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "clip": clip})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as torch.optim.Adam.step
        """One update of every parameter that has a gradient (C# ``Adam.Update``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                g = g.clamp(-group["clip"], group["clip"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                lr_t = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr_t)
        return loss

    def reset_moments(self, keep_step: bool = True) -> None:
        """Zero m and v, keep t (C# ``Adam.Prepare``); ``keep_step=False`` zeroes t too
        (a fresh Adam, for ablations)."""
        for state in self.state.values():
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            if not keep_step:
                state["step"].zero_()


@torch.no_grad()
def reference_init_(model: nn.Module) -> nn.Module:
    """Every Linear: weight ~ Normal(0, sqrt(6 / (fan_in + fan_out))), bias 0."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.weight.normal_(0.0, math.sqrt(6.0 / (mod.in_features + mod.out_features)))
            if mod.bias is not None:
                mod.bias.zero_()
    return model


def chunked_batches(n: int, batch_size: int, chunks: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every minibatch of an epoch of ``n`` examples: ``chunks``
    contiguous chunks (the first ``n % chunks`` one example longer), each cut into
    minibatches of ``batch_size`` with a smaller last one."""
    size, extra = divmod(n, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        end_chunk = start + size + (1 if c < extra else 0)
        for s in range(start, end_chunk, batch_size):
            bounds.append((s, min(s + batch_size, end_chunk)))
        start = end_chunk
    return bounds


def chunk_ends(n: int, batch_size: int, chunks: int) -> set[int]:
    """The 1-based step numbers that end a chunk (where the reference evaluates)."""
    ends, start, step = set(), 0, 0
    size, extra = divmod(n, chunks)
    for c in range(chunks):
        length = size + (1 if c < extra else 0)
        step += math.ceil(length / batch_size)
        ends.add(step)
        start += length
    return ends
