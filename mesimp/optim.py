"""Optimizers for meProp training, and the one place that builds them.

meProp's backward touches only the selected rows of W; a dense optimizer would
then sweep all of W anyway (Adam reads and writes four full-size tensors per
step), which on CPU erases the gain. ``RowSparseAdam`` is ``torch.optim.Adam``
for dense gradients and a *lazy* row update for row-sparse ones: only the rows
present in the gradient have their moments and weights updated (the semantics of
``torch.optim.SparseAdam``, and the paper's "only k rows are modified").
Adagrad and plain SGD in torch already accept sparse gradients, and for them the
lazy update is exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mesimp.errors import BadInputError

OPTIMIZERS = ("adam", "adagrad", "sgd")


class RowSparseAdam(torch.optim.Adam):
    """Adam with a lazy row-sparse path for sparse COO gradients.

    Dense gradients take the parent's (fused) Adam step unchanged. Sparse gradients
    (from ``MePropLinear`` with ``sparse_grad=True``) update only their rows. Its
    ``state_dict`` is the same as ``torch.optim.Adam``'s.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        if fused is None:
            fused = True
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as Adam.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                g = p.grad
                if g is None or not g.is_sparse:
                    continue
                self._lazy_update(p, g, group["lr"], beta1, beta2, group["eps"])
                hidden.append((p, g))
                p.grad = None
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g
        return loss

    def _lazy_update(self, p, g, lr, beta1, beta2, eps) -> None:
        g = g.coalesce()
        rows = g.indices()[0]
        vals = g.values()
        state = self.state[p]
        if not state:
            # Same keys and types as torch's Adam so state_dict()/load_state_dict() agree.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        m = state["exp_avg"].index_select(0, rows).lerp_(vals, 1 - beta1)
        v = (
            state["exp_avg_sq"]
            .index_select(0, rows)
            .mul_(beta2)
            .addcmul_(vals, vals, value=1 - beta2)
        )
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        denom = v.div_(bc2).sqrt_().add_(eps)
        p.index_add_(0, rows, m.div_(denom), alpha=-lr / bc1)


def build_optimizer(
    name: str, params: Iterable, lr: float, sparse_update: bool = True
) -> torch.optim.Optimizer:
    """Adam, AdaGrad or SGD for ``params``.

    ``sparse_update=True`` (meProp's fast path) picks ``RowSparseAdam`` for Adam;
    ``False`` picks torch's fused dense Adam, the exact dense reference. Adagrad and
    SGD accept both gradient layouts.
    """
    params = list(params)
    if not lr > 0:
        raise BadInputError(f"learning rate must be > 0, got {lr}")
    if name == "adam":
        if sparse_update:
            return RowSparseAdam(params, lr=lr)
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise BadInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments/accumulators (meSimp resets once at each cycle start)."""
    optimizer.state.clear()
