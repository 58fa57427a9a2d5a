"""meProp: dense forward, top-k sparsified backward for ``y = x W^T + b``.

Backward, for the 2-D view ``dy: [N, n]`` of the output gradient:

* choose the selected set S (never a masked neuron):
    - ``topk``    per example (the paper): the k largest ``|dy[i]|`` of each row;
    - ``unified`` one set per minibatch: the k largest column sums of ``|dy|``;
    - ``random``  per example, k uniformly random active neurons (the baseline);
* keep dy only on S, then ``dx = dy_S W_S``, ``dW`` has nonzero rows only in S,
  ``db = sum_i dy_S``. This equals plain autograd run on the masked ``dy``.

Speed: ``unified`` runs dense GEMMs on exactly the k selected rows of W; per-example
selection computes dx and dW with ``embedding_bag`` over the b*k selected entries
(b*k*d work). The weight gradient is dense and zero outside the selected rows by
default (``sparse_grad=False``), so any optimizer takes it. With ``sparse_grad=True``
it is a row-sparse COO tensor holding only the selected rows (k for ``unified``, the
union U over the batch otherwise), so a row-sparse optimizer
(``mesimp.optim.RowSparseAdam``, or torch's Adagrad/SGD) updates only those rows
instead of sweeping all of W; mesimp's own trainer takes that path.

MSBP (memorized sparse backprop): with ``msbp_alpha > 0`` the layer keeps a memory
``m`` of the *output gradient* residual: ``u = dy + m; s = select(u);
m = alpha * (u - s)``. We store the residual of ``dy`` (shape ``[N, n]``) rather
than of ``dW`` (``[n, in]``) because ``dy`` is the quantity being sparsified: the
memory costs N*n floats, and the backward stays sparse (forming the dense ``dW``
residual would cost the full dense backward we are trying to avoid). The memory is
positional within the minibatch; when the batch shape changes it is dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mesimp.errors import BadInputError
from mesimp.nn import kernels
from mesimp.nn.grad_buffer import GradBuffer
from mesimp.nn.heap_select import heap_topk

SELECTIONS = ("topk", "unified", "random")


@dataclass
class MePropConfig:
    """How a layer sparsifies its backward pass.

    ``k``: an int (0 = off, plain ``nn.Linear``; capped at the active width) or a
    float fraction in (0, 1] of the *active* width. ``sparse_grad=False`` (the default)
    gives an ordinary dense (strided) weight gradient, zero outside the selected rows:
    stock ``torch.optim`` optimizers, ``clip_grad_norm_``, gradient accumulation,
    autocast and DDP all take it. ``sparse_grad=True`` is the opt-in fast path: a
    row-sparse COO gradient holding only the selected rows, for
    ``mesimp.optim.RowSparseAdam`` (or torch's sparse-aware SGD/Adagrad), which then
    update only those rows; most of PyTorch cannot take a COO gradient.
    """

    k: int | float = 0
    selection: str = "topk"
    msbp_alpha: float = 0.0
    sparse_grad: bool = False
    # the bias gradient over every unit (the C# reference: summed before the top-k), not
    # only the selected ones'; Linear layers only
    dense_bias: bool = False
    # the C# reference's selection (``mesimp.nn.heap_select``): per-example top-k through
    # its TopNHeap, k fixed (not capped at the active width), masked units candidates
    # with score 0; with fewer than k nonzero entries the rest of the k slots (counted
    # as hits) come from columns 0..k-1. Linear layers, ``selection="topk"`` only
    heap_select: bool = False
    # with heap_select: count the zero-gradient fills as hits, as the C# code does
    # (False: an ablation that counts only the units that got a gradient)
    count_zero_fills: bool = True

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise BadInputError(f"k must be an int or a fraction, got {k!r}")
        if isinstance(k, float):
            if k.is_integer() and k > 1:
                self.k = int(k)
            elif not 0.0 < k <= 1.0:
                raise BadInputError(f"k as a fraction must be in (0, 1], got {k}")
        if isinstance(self.k, int) and self.k < 0:
            raise BadInputError(f"k must be >= 0, got {self.k}")
        if self.selection not in SELECTIONS:
            raise BadInputError(
                f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if not 0.0 <= self.msbp_alpha <= 1.0:
            raise BadInputError(f"msbp alpha must be in [0, 1], got {self.msbp_alpha}")
        if self.heap_select and (self.selection != "topk" or isinstance(self.k, float)):
            raise BadInputError("heap_select is the reference's per-example top-k: an int k, topk")

    @property
    def backward_selection(self) -> str:
        """The selection the backward runs: ``selection``, or the reference's heap."""
        if self.heap_select:
            return "heap" if self.count_zero_fills else "heap_nonzero"
        return self.selection

    def resolve_k(self, active_width: int, width: int | None = None) -> int:
        """The k used now. Int k is capped at the active width; a fraction scales with it.

        Capping matters for meSimp: as a layer shrinks, a fixed k would otherwise
        exceed the active width and "select" masked neurons (the C# reference did).
        """
        if self.heap_select and width is not None:  # the reference: k fixed
            return min(int(self.k), width)
        if active_width <= 0:
            return 0
        if isinstance(self.k, float):
            return min(active_width, max(1, math.ceil(self.k * active_width - 1e-9)))
        return min(self.k, active_width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MePropConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class MePropState:
    """Mutable per-layer state the backward pass updates: counters, mask, MSBP memory.

    ``hits[j]`` counts, per example (row of the 2-D input), how often output neuron
    j was selected; ``ref`` counts the examples. meSimp reads them.
    """

    def __init__(self, hits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        self.hits = hits
        self.ref = ref
        self.mask = mask
        self.memory: torch.Tensor | None = None
        self.count = True


def select(u: torch.Tensor, k: int, selection: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Indices of the selected outputs: ``[k]`` for unified, ``[N, k]`` otherwise.

    Masked neurons get score -1, below any ``|grad|`` or uniform draw, so with
    ``k <= active width`` they are never chosen, ties included. ``"heap"`` is the C#
    reference's per-example top-k (``mesimp.nn.heap_select``): masked neurons score 0
    and may fill slots.
    """
    if selection in ("heap", "heap_nonzero"):
        score = u.abs()
        return heap_topk(score * mask if mask is not None else score, k)
    if selection == "unified":
        score = u.abs().sum(0)
    elif selection == "topk":
        score = u.abs()
    else:
        score = torch.rand(u.shape, dtype=u.dtype, device=u.device)
    if mask is not None:
        score = score.masked_fill(~mask, -1.0)
    idx = score.topk(k, dim=-1, sorted=False).indices
    return idx


class MePropLinearFunction(torch.autograd.Function):
    """``y = (x W^T + b) * mask`` with a meProp backward. x is 2-D here. ``grad_buf``: the
    weight's ``GradBuffer`` (dense gradients, ``weight`` the layer's own Parameter), or
    None (a fresh tensor per backward)."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, k, selection, alpha, sparse_grad, state, masked, dense_bias, grad_buf
    ):
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        if masked:
            out.mul_(state.mask)
        ctx.save_for_backward(x, weight)
        ctx.meprop = (k, selection, alpha, sparse_grad, state, masked, bias is not None, dense_bias)
        ctx.grad_buf = grad_buf
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        k, selection, alpha, sparse_grad, state, masked, has_bias, dense_bias = ctx.meprop
        # the kernels do unified, plain per-example top-k and random-k (not the reference's
        # heap); torch.compile traces with fake tensors, which the kernels have no rule for
        compiled = selection in kernels.SELECTION_CODE and not torch.compiler.is_compiling()
        if compiled and kernels.usable(dy, x, weight):
            return _compiled_backward(ctx, dy, x, weight)
        n = weight.shape[0]
        rows = dy.shape[0]
        u = dy
        if alpha > 0 and state.memory is not None and state.memory.shape == dy.shape:
            u = dy + state.memory
        idx = select(u, k, selection, state.mask if masked else None)

        if selection == "unified":
            sel = idx.sort().values  # sorted unique rows make a coalesced COO gradient
            u_sel = u.index_select(1, sel)
            if state.count:
                state.hits.index_add_(0, sel, state.hits.new_full(sel.shape, rows))
            if alpha > 0:
                state.memory = u.mul(alpha).index_fill_(1, sel, 0.0)
        else:
            vals = u.gather(1, idx)
            flat = idx.reshape(-1)
            counts = torch.bincount(flat, minlength=n)
            sel = counts.nonzero().squeeze(1)  # union over the batch, sorted
            if state.count and selection == "heap_nonzero":  # only units with a gradient
                nonzero = vals.reshape(-1) != 0
                state.hits.add_(torch.bincount(flat[nonzero], minlength=n))
            elif state.count:
                state.hits.add_(counts)
            if alpha > 0:
                state.memory = u.scatter(1, idx, 0.0).mul_(alpha)
        if state.count:
            state.ref.add_(rows)

        grad_x = grad_w = grad_b = None
        if selection == "unified":
            # One set for the batch: dense GEMMs on the k selected rows of W.
            if ctx.needs_input_grad[0]:
                grad_x = u_sel @ weight.index_select(0, sel)
            if ctx.needs_input_grad[1]:
                rows_w = u_sel.t() @ x
            if has_bias and ctx.needs_input_grad[2] and not dense_bias:
                grad_b = dy.new_zeros(n).index_copy_(0, sel, u_sel.sum(0))
        else:
            # Per example: the union of selected rows covers most of W at b=50, so GEMMs
            # on it are nearly dense. embedding_bag does b*k*d work instead:
            # dx[i] = sum_j vals[i, j] W[idx[i, j]]   (one bag per example), and
            # dW[j] = sum_{e: idx_e = j} vals_e x[example_e]  (one bag per selected neuron).
            if ctx.needs_input_grad[0]:
                grad_x = F.embedding_bag(idx, weight, per_sample_weights=vals, mode="sum")
            if ctx.needs_input_grad[1]:
                order = flat.argsort()
                cnt = counts.index_select(0, sel)
                rows_w = F.embedding_bag(
                    order.div(k, rounding_mode="floor"),
                    x,
                    cnt.cumsum(0).sub_(cnt),
                    per_sample_weights=vals.reshape(-1)[order],
                    mode="sum",
                )
            if has_bias and ctx.needs_input_grad[2] and not dense_bias:
                grad_b = dy.new_zeros(n).index_add_(0, flat, vals.reshape(-1))
        if ctx.needs_input_grad[1]:
            if sparse_grad:
                grad_w = torch.sparse_coo_tensor(
                    sel.unsqueeze(0),
                    rows_w,
                    weight.shape,
                    is_coalesced=True,
                    check_invariants=False,
                )
            else:
                grad_w = _dense_weight_grad(ctx.grad_buf, weight, sel, rows_w)
        if has_bias and dense_bias and ctx.needs_input_grad[2]:
            grad_b = dy.sum(0).mul_(state.mask) if masked else dy.sum(0)  # masked: no gradient
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def _dense_weight_grad(
    grad_buf: GradBuffer | None, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The dense weight gradient, ``values`` in ``rows`` and zero elsewhere: written into the
    layer's persistent buffer where its rules allow (``mesimp.nn.grad_buffer``), else into a
    fresh zero-filled tensor. Under ``torch.compile`` always fresh (the rules read storage
    reference counts and version counters, which a traced graph cannot)."""
    buf = None
    if grad_buf is not None and not torch.compiler.is_compiling():
        buf = grad_buf.take(weight)
    if buf is None:
        return weight.new_zeros(weight.shape).index_copy_(0, rows, values)
    buf.index_copy_(0, rows, values)
    return grad_buf.commit(rows)


def _compiled_backward(ctx, dy, x, weight):
    """The same backward in one call of ``torch.ops.mesimp.linear_backward``."""
    k, selection, alpha, sparse_grad, state, masked, has_bias, dense_bias = ctx.meprop
    memory = state.memory if alpha > 0 else None
    need = ctx.needs_input_grad
    gb = ctx.grad_buf
    if gb is not None:
        gb.match(weight)
    dx, dw, db, memory = torch.ops.mesimp.linear_backward(
        dy, x, weight, state.mask if masked else None, memory, state.hits, state.ref,
        k, kernels.SELECTION_CODE[selection], float(alpha), state.count, has_bias, dense_bias,
        need[0], need[1], has_bias and need[2], sparse_grad,
        [] if gb is None else [gb.buf, gb.rows, gb.version],
    )  # fmt: skip
    if alpha > 0:
        state.memory = memory
    return dx, dw, db, None, None, None, None, None, None, None, None
