"""The fused path for a Linear-ReLU stack: one autograd node, and one call per step.

``fused_forward(seq, x)`` runs an ``nn.Sequential`` of ``[Linear, ReLU, ..., Linear]``
(each Linear plain or ``MePropLinear``) as *one* autograd Function whose backward is one
call of the compiled ``torch.ops.mesimp.mlp_backward``: the whole stack's meProp
backward behind ``loss.backward()``, nothing changes for the user. Why: at meProp's sizes
the backward's own work is a few small GEMMs, and the autograd engine's per-node cost
(~40 % of ``loss.backward()`` with one node per op) is what is left to remove.

``train_step(model, x, y, optimizer)`` goes further: forward, mean cross-entropy,
backward and the ``RowSparseAdam`` update in one call (``torch.ops.mesimp.mlp_train_step``),
the fastest path for mesimp's trainer. Both compute what the per-layer path computes
(same selections, counters, MSBP memories, masks, gradients within float tolerance;
unified selection: the same bits) and fall back to it whenever they do not apply
(kernels off or missing, not float32 CPU, ``selection="random"``, autocast, dropout,
other layer types): ``fused_forward`` then returns None and ``train_step`` runs the
ordinary step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn import kernels
from mesimp.nn.linear import MePropLinear
from mesimp.training.optim import RowSparseAdam


@dataclass
class _Layer:
    linear: nn.Linear
    selection: int  # 0 dense (plain Linear, or meProp off), 1 unified, 2 per-example top-k
    k: int
    masked: bool


def plan(seq: nn.Module) -> list[_Layer] | None:
    """The stack's layers if ``seq`` is a fusable Linear-ReLU chain with meProp in it."""
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if len(mods) % 2 == 0:
        return None
    layers: list[_Layer] = []
    meprop = False
    for i, m in enumerate(mods):
        if i % 2 == 1:
            if type(m) is not nn.ReLU:
                return None
            continue
        if isinstance(m, MePropLinear):
            cfg = m.meprop_config
            masked = m.active_width < m.out_features
            k = m.k
            if k == 0 or (k >= m.out_features and not masked):
                layers.append(_Layer(m, 0, 0, masked))
                continue
            code = kernels.SELECTION_CODE.get(cfg.backward_selection)
            if code is None:  # random, the reference's heap: the Python path
                return None
            layers.append(_Layer(m, code, k, masked))
            meprop = True
        elif type(m) is nn.Linear:
            layers.append(_Layer(m, 0, 0, False))
        else:
            return None
    return layers if meprop else None


def _flags(layer: _Layer) -> int:
    m = layer.linear
    if not isinstance(m, MePropLinear):
        return 2 if m.bias is not None else 0
    cfg = m.meprop_config
    return (
        int(m.counting)
        | (2 if m.bias is not None else 0)
        | (4 if cfg.dense_bias else 0)
        | (8 if cfg.sparse_grad else 0)
    )


def _lists(layers: list[_Layer]) -> tuple:
    """The per-layer arguments of the kernels, read now (counting, memories, masks)."""
    masks, memories, hits, refs, ks, sels, alphas, flags = [], [], [], [], [], [], [], []
    for lay in layers:
        m = lay.linear
        mp = isinstance(m, MePropLinear)
        masks.append(m.mask if lay.masked else None)
        alpha = m.meprop_config.msbp_alpha if mp and lay.selection else 0.0
        memories.append(m._state.memory if alpha > 0 else None)
        hits.append(m.hits if mp else _NO_COUNT)
        refs.append(m.ref if mp else _NO_COUNT)
        ks.append(lay.k)
        sels.append(lay.selection)
        alphas.append(float(alpha))
        flags.append(_flags(lay))
    return masks, memories, hits, refs, ks, sels, alphas, flags


_NO_COUNT = torch.zeros((), dtype=torch.long)  # a dense layer's unused counter slot


def _store_memories(layers: list[_Layer], alphas: list[float], memories: list) -> None:
    for lay, alpha, mem in zip(layers, alphas, memories, strict=True):
        if alpha > 0:
            lay.linear._state.memory = mem


class FusedStackFunction(torch.autograd.Function):
    """``relu(...relu(x W0^T + b0)...) W_L^T + b_L`` (masks applied) as one node."""

    @staticmethod
    def forward(ctx, layers, x, *params):
        xs, h = [x], x
        last = len(layers) - 1
        for i, lay in enumerate(layers):
            m = lay.linear
            o = torch.addmm(m.bias, h, m.weight.t()) if m.bias is not None else h @ m.weight.t()
            if lay.masked:
                o.mul_(m.mask)
            if i < last:
                o.relu_()
                xs.append(o)
            h = o
        ctx.layers = layers
        ctx.save_for_backward(*xs)
        return h

    @staticmethod
    def backward(ctx, dout):
        layers = ctx.layers
        xs = ctx.saved_tensors
        masks, memories, hits, refs, ks, sels, alphas, flags = _lists(layers)
        out = torch.ops.mesimp.mlp_backward(
            dout, list(xs), [lay.linear.weight for lay in layers], masks, memories,
            hits, refs, ks, sels, alphas, flags, ctx.needs_input_grad[1],
        )  # fmt: skip
        grads: list[torch.Tensor | None] = [None, out[0]]
        for i, lay in enumerate(layers):
            grads.append(out[1 + 3 * i])
            if lay.linear.bias is not None:
                grads.append(out[2 + 3 * i])
        _store_memories(layers, alphas, [out[3 + 3 * i] for i in range(len(layers))])
        return tuple(grads)


def _params(layers: list[_Layer]) -> list[nn.Parameter]:
    ps = []
    for lay in layers:
        ps.append(lay.linear.weight)
        if lay.linear.bias is not None:
            ps.append(lay.linear.bias)
    return ps


def _applies(x: torch.Tensor) -> bool:
    return (
        x.dim() == 2
        and torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
        and not torch.is_autocast_enabled(x.device.type)
        and kernels.usable(x)
    )


def fused_forward(seq: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``seq(x)`` as one autograd node, or None where the fused path does not apply."""
    if not _applies(x):
        return None
    layers = plan(seq)
    if layers is None:
        return None
    params = _params(layers)
    if not kernels.usable(*params):
        return None
    return FusedStackFunction.apply(layers, x, *params)


def _adam_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> tuple | None:
    """The RowSparseAdam state lists for ``params`` (created as its ``step`` would)."""
    if type(optimizer) is not RowSparseAdam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(
        a is not b for a, b in zip(group["params"], params, strict=True)
    ):
        return None
    ms, vs, steps = [], [], []
    for p in params:
        st = optimizer.param_state(p)
        ms.append(st["exp_avg"])
        vs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    return group, ms, vs, steps


def fused_train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    check_grads: bool = False,
) -> tuple[torch.Tensor, nn.Parameter | None] | None:
    """One compiled step: ``(loss, bad)`` (``bad``: the parameter whose gradient held
    NaN/Inf, checked when ``check_grads``, else None), or None where it does not apply.
    A non-finite loss or gradient leaves parameters and optimizer state untouched."""
    if not (_applies(x) and y.dtype == torch.long and y.dim() == 1):
        return None
    layers = plan(model)
    if layers is None:
        return None
    params = _params(layers)
    if not kernels.usable(*params):
        return None
    state = _adam_state(optimizer, params)
    if state is None:
        return None
    group, ms, vs, steps = state
    beta1, beta2 = group["betas"]
    masks, memories, hits, refs, ks, sels, alphas, flags = _lists(layers)
    for p in params:
        p.grad = None
    with torch.no_grad():
        out = torch.ops.mesimp.mlp_train_step(
            x, y, params, masks, memories, hits, refs, ks, sels, alphas, flags,
            ms, vs, steps, float(group["lr"]), beta1, beta2, group["eps"], check_grads,
        )  # fmt: skip
    _store_memories(layers, alphas, out[2:])
    bad = int(out[1])
    return out[0], (params[bad] if bad >= 0 else None)


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """Forward, mean cross-entropy, backward and ``optimizer.step()``; returns the loss.

    One compiled call for a fusable Linear-ReLU stack with ``RowSparseAdam`` (its one
    param group holding exactly the stack's parameters); otherwise the ordinary
    ``zero_grad / loss.backward() / step``, with the same result.
    """
    done = fused_train_step(model, x, y, optimizer)
    if done is not None:
        return done[0]
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()
