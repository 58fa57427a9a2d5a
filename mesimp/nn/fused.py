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
(kernels off or missing, not float32 CPU, the reference's heap selection, autocast,
dropout, other layer types or subclasses, module hooks): ``fused_forward`` then returns
None and ``train_step`` runs the ordinary step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from mesimp.nn import kernels
from mesimp.nn.arg_cache import same
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


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has module hooks: the fused path never calls a child's forward, so
    it would skip them; such a stack takes the per-layer path."""
    return any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks))


def plan(seq: nn.Module) -> list[_Layer] | None:
    """The stack's layers if ``seq`` is a fusable Linear-ReLU chain with meProp in it:
    exactly ``nn.Linear`` / ``MePropLinear`` and ``nn.ReLU`` (a subclass may have its own
    forward), none with hooks."""
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if len(mods) % 2 == 0:
        return None
    layers: list[_Layer] = []
    meprop = False
    for i, m in enumerate(mods):
        if _hooked(m):
            return None
        if i % 2 == 1:
            if type(m) is not nn.ReLU:
                return None
            continue
        if type(m) is MePropLinear:
            cfg = m.meprop_config
            masked = m.active_width < m.out_features
            k = m.k
            if k == 0 or (k >= m.out_features and not masked):
                layers.append(_layer(m, 0, 0, masked))
                continue
            code = kernels.SELECTION_CODE.get(cfg.backward_selection)
            if code is None:  # the reference's heap: the Python path
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


@dataclass(frozen=True)
class _Stack:
    """A fusable stack's kernel arguments: its parameters, then ``_lists``'."""

    params: list[nn.Parameter]
    args: tuple


_CACHE = "_mesimp_fused_stack"  # where a Sequential keeps (key, _Stack) in its __dict__


def _key(seq: nn.Sequential) -> tuple | None:
    """Everything ``plan`` and ``_lists`` read from ``seq``, as a key
    (``mesimp.nn.arg_cache``); None where a child has hooks."""
    key: list = []
    for m in seq._modules.values():
        if _hooked(m):
            return None
        key.append(m)
        key.extend(m._parameters.values())
        if type(m) is MePropLinear:
            cfg, state = m.meprop_config, m._state
            key += (m._active, m.out_features, m.hits, m.ref, m._buffers["mask"], cfg, state)
            key.extend(vars(cfg).values())
            key.extend(vars(state).values())
    return tuple(key)


def _stack(seq: nn.Module) -> _Stack | None:
    """``seq``'s kernel arguments, or None where it is not a fusable stack. Kept in
    ``seq`` while its key holds: rebuilding them each call cost ~0.1 ms a step."""
    entry = seq.__dict__.get(_CACHE)
    if entry is not None:
        key = _key(seq)
        if key is not None and same(entry[0], key):
            return entry[1]
        del seq.__dict__[_CACHE]
    layers = plan(seq)
    if layers is None:
        return None
    stack = _Stack(_params(layers), _lists(layers))
    key = _key(seq)  # after _lists, which may give an MSBP layer its memory tensor
    if key is not None:
        seq.__dict__[_CACHE] = (key, stack)
    return stack


@functools.cache
def _onnx_flags() -> tuple | None:
    """The two flags ``torch.onnx.is_in_onnx_export()`` reads; it imports their modules
    at every call, which cost ~30 µs a step once the GEMMs have evicted the import
    machinery from the caches. None if this torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return GLOBALS, _flags


def _onnx_exporting() -> bool:
    flags = _onnx_flags()
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    return bool(flags[0].in_onnx_export or flags[1]._is_onnx_exporting)


def _global_module_hooks() -> bool:
    """Module hooks registered for every module: they would fire on each child."""
    return bool(
        _module._global_forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
    )


def _applies(x: torch.Tensor) -> bool:
    return (
        torch.is_grad_enabled()
        and x.dim() == 2
        and kernels.usable(x)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not _onnx_exporting()
        and not torch.is_autocast_enabled("cpu")  # usable: x is on the CPU
        and not _global_module_hooks()
    )


def fused_forward(seq: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``seq(x)`` as one autograd node, or None where the fused path does not apply."""
    if not _applies(x):
        return None
    stack = _stack(seq)
    if stack is None or not kernels.usable(*stack.params):
        return None
    return torch.ops.mesimp.mlp_forward(x, stack.params, *stack.args)


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
    stack = _stack(model)
    if stack is None:
        return None
    params = stack.params
    opt_args = _optimizer_args(optimizer, params)  # None also where params can't take them
    if opt_args is None:
        return None
    with torch.no_grad():  # the op clears the params' gradients, as zero_grad would
        out = torch.ops.mesimp.mlp_train_step(x, y, params, *stack.args, *opt_args, check_grads)
    bad = int(out[1]) if check_grads else -1
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
