"""The fused path for a Linear-ReLU stack: one autograd node, and one call per step.

``fused_forward(seq, x)`` runs an ``nn.Sequential`` of ``[Linear, ReLU, ..., Linear]``
(each Linear plain or ``MePropLinear``) as *one* autograd node, ``torch.ops.mesimp.
mlp_forward``: a C++ autograd Function whose backward is the whole stack's meProp
backward, behind ``loss.backward()``; nothing changes for the user. Why: at meProp's
sizes the backward's own work is a few small GEMMs, and the autograd engine's per-node
cost (~40 % of ``loss.backward()`` with one node per op, and ~0.1 ms for one Python
node) is what is left to remove.

``train_step(model, x, y, optimizer)`` goes further: forward, mean cross-entropy,
backward and the optimizer's update (``RowSparseAdam``, ``RowSparseAdagrad`` or
``RowSparseSGD``) in one call (``torch.ops.mesimp.mlp_train_step``), the fastest path
for mesimp's trainer. Both compute what the per-layer path computes (same selections,
counters, MSBP memories, masks; gradients within float tolerance, unified selection:
the same bits; the optimizer step within float32 rounding of torch's, and the same bits
on both fused paths) and fall back to it whenever they do not apply
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
from mesimp.training.optim import CompiledOptimizer


@dataclass
class _Layer:
    linear: nn.Linear
    selection: int  # 0 dense (plain Linear, or meProp off), 1 unified, 2 per-example top-k
    k: int
    masked: bool
    params: tuple[nn.Parameter, ...] = ()  # weight, then the bias if any


def _layer(m: nn.Linear, selection: int, k: int, masked: bool) -> _Layer:
    w, b = m._parameters["weight"], m._parameters["bias"]
    return _Layer(m, selection, k, masked, (w,) if b is None else (w, b))


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
                layers.append(_layer(m, 0, 0, masked))
                continue
            code = kernels.SELECTION_CODE.get(cfg.backward_selection)
            if code is None:  # random, the reference's heap: the Python path
                return None
            layers.append(_layer(m, code, k, masked))
            meprop = True
        elif type(m) is nn.Linear:
            layers.append(_layer(m, 0, 0, False))
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
    """The per-layer arguments of the kernels, read now (counting, memories, masks). An
    MSBP layer's memory is a tensor the backward repoints (``Tensor.set_``) at its new
    memory, so ``MePropState.memory`` is up to date after every backward."""
    masks, memories, hits, refs, ks, sels, alphas, flags = [], [], [], [], [], [], [], []
    for lay in layers:
        m = lay.linear
        mp = isinstance(m, MePropLinear)
        masks.append(m.mask if lay.masked else None)
        alpha = m.meprop_config.msbp_alpha if mp and lay.selection else 0.0
        if alpha > 0 and m._state.memory is None:  # the kernels point it at the new memory
            m._state.memory = torch.empty(0)
        memories.append(m._state.memory if alpha > 0 else None)
        hits.append(m.hits if mp else _NO_COUNT)
        refs.append(m.ref if mp else _NO_COUNT)
        ks.append(lay.k)
        sels.append(lay.selection)
        alphas.append(float(alpha))
        flags.append(_flags(lay))
    return masks, memories, hits, refs, ks, sels, alphas, flags


_NO_COUNT = torch.zeros((), dtype=torch.long)  # a dense layer's unused counter slot


def _params(layers: list[_Layer]) -> list[nn.Parameter]:
    return [p for lay in layers for p in lay.params]


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
    return torch.ops.mesimp.mlp_forward(x, params, *_lists(layers))


FUSED_NODE = "torch::autograd::CppNode<mesimp::StackFunction>"


def is_fused_node(grad_fn: object) -> bool:
    """Whether ``grad_fn`` is the fused stack's autograd node (the C++ ``StackFunction``)."""
    return grad_fn is not None and grad_fn.name() == FUSED_NODE


def _optimizer_args(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> tuple | None:
    """``(kind, state1, state2, steps, hyper)`` of the compiled optimizer step for exactly
    ``params`` (one param group holding them, in order), or None."""
    if not isinstance(optimizer, CompiledOptimizer) or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(
        a is not b for a, b in zip(group["params"], params, strict=True)
    ):
        return None
    args = optimizer.kernel_args(group, params)
    return None if args is None else (optimizer.KIND, *args)


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
    opt_args = _optimizer_args(optimizer, params)  # None also where params can't take them
    if opt_args is None:
        return None
    for p in params:
        p.grad = None
    with torch.no_grad():
        out = torch.ops.mesimp.mlp_train_step(x, y, params, *_lists(layers), *opt_args, check_grads)
    bad = int(out[1])
    return out[0], (params[bad] if bad >= 0 else None)


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """Forward, mean cross-entropy, backward and ``optimizer.step()``; returns the loss.

    One compiled call for a fusable Linear-ReLU stack with ``RowSparseAdam``,
    ``RowSparseAdagrad`` or ``RowSparseSGD`` (one param group holding exactly the stack's
    parameters, options the kernels take); otherwise the ordinary
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
