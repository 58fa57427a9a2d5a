"""The fused path for chains of Linear layers: one autograd node, and one call per step.

A *chain* is a run of children of an ``nn.Sequential``: ``Linear``, then any number of
``[ReLU | GELU] [Dropout] Linear``, each Linear plain or ``MePropLinear`` with at least one
meProp layer in it: a user's MLP, a transformer's FFN (``Linear, GELU, Dropout, Linear``),
an MLP head, mesimp's own ``MLP``. ``fused_forward(seq, x)`` runs each chain of ``seq``
as *one* autograd node, ``torch.ops.mesimp.mlp_forward``: a C++ autograd Function whose
backward is the whole chain's meProp backward, behind ``loss.backward()``; the other
children run as usual. Why: at meProp's sizes the backward's own work is a few small
GEMMs, and the autograd engine's per-node cost (~40 % of ``loss.backward()`` with one node
per op, ~0.1 ms for one Python node) is what is left to remove.

``meprop_`` makes every ``nn.Sequential`` that holds a chain take this path
(:func:`fuse_sequentials_`: its class becomes :class:`MePropSequential`, the parametrize
trick, so identity, children, hooks and ``state_dict`` stay); ``unmeprop`` takes it out.

``train_step(model, x, y, optimizer)`` goes further for a model that *is* one chain:
forward, mean cross-entropy, backward and the optimizer's update (``RowSparseAdam``,
``RowSparseAdamW``, ``RowSparseAdagrad`` or ``RowSparseSGD``) in one call
(``torch.ops.mesimp.mlp_train_step``), the fastest path for mesimp's trainer. Both compute
what the per-layer path computes (same selections, counters, MSBP memories, masks, dropout
draws; gradients within float tolerance, unified selection: the same bits; the optimizer
step within float32 rounding of torch's, and the same bits on both fused paths) and fall
back to it whenever they do not apply (kernels off or missing, not float32 CPU, the
reference's heap selection, autocast, other layer types or subclasses, module hooks):
``fused_forward`` then returns None and ``train_step`` runs the ordinary step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from mesimp.nn import grad_buffer, kernels
from mesimp.nn.arg_cache import same
from mesimp.nn.linear import MePropLinear
from mesimp.training.optim import CompiledOptimizer

# the activation codes of kernels.cpp (Act); GELU by its ``approximate``
_RELU, _GELU = 1, {"none": 2, "tanh": 3}


def _act_code(m: nn.Module) -> int | None:
    """The kernels' code of an activation child, or None if it is not one they run."""
    if type(m) is nn.ReLU:
        return _RELU
    if type(m) is nn.GELU:
        return _GELU.get(m.approximate)
    return None


def _is_dropout(m: nn.Module) -> bool:
    return type(m) is nn.Dropout and 0.0 <= m.p < 1.0


def _is_linear(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, MePropLinear)


@dataclass
class _Layer:
    linear: nn.Linear
    selection: int  # 0 dense (plain Linear, or meProp off), 1 unified, 2 top-k, 3 random
    k: int
    masked: bool
    params: tuple[nn.Parameter, ...] = ()  # weight, then the bias if any
    act: int = 0  # the activation after it (0: none)
    dropout: nn.Dropout | None = None  # the dropout after it


def _layer(m: nn.Linear, selection: int, k: int, masked: bool) -> _Layer:
    w, b = m._parameters["weight"], m._parameters["bias"]
    return _Layer(m, selection, k, masked, (w,) if b is None else (w, b))


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has module hooks: the fused path never calls a child's forward, so
    it would skip them; a hooked child is never part of a chain."""
    return any((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks))


def _chain_end(mods: list[nn.Module], i: int) -> int:
    """The end (exclusive) of the chain of Linear layers starting at ``mods[i]``, a Linear:
    ``Linear ([act] [Dropout] Linear)*``, no child with hooks."""
    end = j = i + 1
    while True:
        t = j
        if t < len(mods) and _act_code(mods[t]) is not None and not _hooked(mods[t]):
            t += 1
        if t < len(mods) and _is_dropout(mods[t]) and not _hooked(mods[t]):
            t += 1
        if t < len(mods) and _is_linear(mods[t]) and not _hooked(mods[t]):
            end = j = t + 1
            continue
        return end


def _chain_layers(mods: list[nn.Module]) -> list[_Layer] | None:
    """The layers of one chain ``mods`` (as ``_chain_end`` found it), or None where no
    layer in it does meProp (nothing to fuse) or one runs the reference's heap."""
    layers: list[_Layer] = []
    meprop = False
    for m in mods:
        if _is_linear(m):
            if type(m) is MePropLinear:
                masked = m.active_width < m.out_features
                k = m.k
                if k == 0 or (k >= m.out_features and not masked):
                    layers.append(_layer(m, 0, 0, masked))
                    continue
                code = kernels.SELECTION_CODE.get(m.meprop_config.backward_selection)
                if code is None:  # the reference's heap: the Python path
                    return None
                layers.append(_layer(m, code, k, masked))
                meprop = True
            else:
                layers.append(_layer(m, 0, 0, False))
        elif _is_dropout(m):
            layers[-1].dropout = m
        else:
            layers[-1].act = _act_code(m)
    return layers if meprop else None


def _flags(layer: _Layer) -> int:
    m = layer.linear
    act = layer.act << 5
    if not isinstance(m, MePropLinear):
        return act | (2 if m.bias is not None else 0)
    cfg = m.meprop_config
    buffered = layer.selection and not cfg.sparse_grad and grad_buffer.of(m.weight) is not None
    return (
        act
        | int(m.counting)
        | (2 if m.bias is not None else 0)
        | (4 if cfg.dense_bias else 0)
        | (8 if cfg.sparse_grad else 0)
        | (16 if buffered else 0)
    )


def _lists(layers: list[_Layer]) -> tuple:
    """The per-layer arguments of the kernels, read now (counting, memories, masks, dropout,
    gradient buffers). An MSBP layer's memory is a tensor the backward repoints
    (``Tensor.set_``) at its new memory, so ``MePropState.memory`` is up to date after
    every backward; a dense-gradient layer's ``GradBuffer`` tensors are updated in place."""
    masks, memories, hits, refs, ks, sels, alphas, flags = [], [], [], [], [], [], [], []
    dropouts, buffers = [], []
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
        drop = lay.dropout
        dropouts.append(float(drop.p) if drop is not None and drop.training else 0.0)
        if flags[-1] & 16:
            gb = grad_buffer.of(m.weight)
            gb.match(m.weight)
            buffers += [gb.buf, gb.rows, gb.version]
    return masks, memories, hits, refs, ks, sels, alphas, flags, dropouts, buffers


_NO_COUNT = torch.zeros((), dtype=torch.long)  # a dense layer's unused counter slot


@dataclass(frozen=True)
class _Stack:
    """A chain's kernel arguments: its parameters, then ``_lists``'."""

    params: list[nn.Parameter]
    args: tuple


@dataclass(frozen=True)
class _Chain:
    """Children ``start:end`` of a Sequential, run as one node."""

    start: int
    end: int
    stack: _Stack


_CACHE = "_mesimp_fused_stack"  # where a Sequential keeps (key, plan) in its __dict__


def _key(seq: nn.Sequential) -> tuple:
    """Everything the plan reads from ``seq``, as a key (``mesimp.nn.arg_cache``)."""
    key: list = [grad_buffer.is_enabled()]  # whether the layers take their gradient buffers
    for m in seq._modules.values():
        key += (m, _hooked(m))
        key.extend(m._parameters.values())
        if type(m) is MePropLinear:
            cfg, state = m.meprop_config, m._state
            key += (m._active, m.out_features, m.hits, m.ref, m._buffers["mask"], cfg, state)
            key.extend(vars(cfg).values())
            key.extend(vars(state).values())
            gb = m.weight.__dict__.get(grad_buffer.ATTR)
            key.append(gb)
            if gb is not None:
                key.extend(vars(gb).values())
        elif type(m) is nn.Dropout:
            key += (m.p, m.training)
        elif type(m) is nn.GELU:
            key.append(m.approximate)
    return tuple(key)


def _make_plan(seq: nn.Module) -> list[_Chain | int] | None:
    """``seq``'s children as chains and single children (their indices), or None where no
    chain does meProp."""
    mods = list(seq._modules.values())
    plan: list[_Chain | int] = []
    i = 0
    while i < len(mods):
        end = _chain_end(mods, i) if _is_linear(mods[i]) and not _hooked(mods[i]) else i + 1
        layers = _chain_layers(mods[i:end]) if end - i > 1 else None
        if layers is None:
            plan.extend(range(i, end))
        else:
            params = [p for lay in layers for p in lay.params]
            plan.append(_Chain(i, end, _Stack(params, _lists(layers))))
        i = end
    return plan if any(isinstance(c, _Chain) for c in plan) else None


def _plan(seq: nn.Module) -> list[_Chain | int] | None:
    """``seq``'s plan, kept in ``seq`` while its key holds: rebuilding the kernel arguments
    each call cost ~0.1 ms a step."""
    if not isinstance(seq, nn.Sequential):
        return None
    entry = seq.__dict__.get(_CACHE)
    if entry is not None:
        if same(entry[0], _key(seq)):
            return entry[1]
        del seq.__dict__[_CACHE]
    plan = _make_plan(seq)
    # the key after _lists, which may give an MSBP layer its memory tensor, a layer its buffer
    seq.__dict__[_CACHE] = (_key(seq), plan)
    return plan


def _stack(seq: nn.Module) -> _Stack | None:
    """The kernel arguments of ``seq`` if it is one chain, child for child (what
    ``train_step`` takes); else None."""
    plan = _plan(seq)
    if plan is None or len(plan) != 1 or plan[0].end != len(seq._modules):
        return None
    return plan[0].stack


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
        and kernels.usable(x)
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not _onnx_exporting()
        and not torch.is_autocast_enabled("cpu")  # usable: x is on the CPU
        and not _global_module_hooks()
    )


def _run_chain(chain: _Chain, x: torch.Tensor, checked: bool = False) -> torch.Tensor | None:
    """One chain on ``x`` (any leading shape: each row of the flattened input is an
    example, as for ``MePropLinear``) as one node, or None where it does not apply
    (``checked``: ``_applies(x)`` is known to hold)."""
    stack = chain.stack
    if not ((checked or _applies(x)) and kernels.usable(*stack.params)):
        return None
    if x.dim() == 2:
        return _MLP_FORWARD(x, stack.params, *stack.args)
    out = _MLP_FORWARD(x.reshape(-1, x.shape[-1]), stack.params, *stack.args)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _mlp_forward(*args: object) -> torch.Tensor:
    """``torch.ops.mesimp.mlp_forward.default``, looked up once (the packet's overload
    resolution costs at every call)."""
    global _MLP_FORWARD
    _MLP_FORWARD = torch.ops.mesimp.mlp_forward.default
    return _MLP_FORWARD(*args)


_MLP_FORWARD = _mlp_forward


def fused_forward(seq: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``seq(x)`` with each chain of ``seq`` as one autograd node, or None where no chain
    applies to ``x`` (then run ``seq`` as usual)."""
    if not _applies(x):
        return None
    plan = _plan(seq)
    if plan is None:
        return None
    if len(plan) == 1:  # the whole of seq is one chain: one node
        return _run_chain(plan[0], x, checked=True)
    mods = list(seq._modules.values())
    for item in plan:
        if isinstance(item, int):
            x = mods[item](x)
            continue
        out = _run_chain(item, x)
        if out is None:
            for m in mods[item.start : item.end]:
                x = m(x)
        else:
            x = out
    return x


class MePropSequential(nn.Sequential):
    """An ``nn.Sequential`` whose chains of Linear layers with meProp in them run as one
    fused autograd node each (``fused_forward``); where that does not apply, exactly
    ``nn.Sequential``. ``meprop_`` sets a Sequential's class to it in place
    (:func:`fuse_sequentials_`); ``unmeprop`` sets it back. A subclass of ``nn.Sequential``
    that keeps its forward gets a class made the same way (:func:`fused_class`)."""

    _mesimp_base: type[nn.Sequential] = nn.Sequential

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - Sequential's name
        out = fused_forward(self, input) if isinstance(input, torch.Tensor) else None
        return out if out is not None else self._mesimp_base.forward(self, input)

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickle and deepcopy rebuild the fused class from the plain one, so a class made
        for a subclass (not importable by name) round-trips too."""
        rv = super().__reduce_ex__(protocol)
        return (_new_fused, (self._mesimp_base,), *rv[2:])


@functools.cache
def fused_class(base: type[nn.Sequential]) -> type[nn.Sequential]:
    """The fused class for ``base`` (``nn.Sequential`` or a subclass keeping its forward)."""
    if base is nn.Sequential:
        return MePropSequential
    name = f"MeProp{base.__name__}"
    return type(name, (MePropSequential, base), {"_mesimp_base": base, "__module__": __name__})


def _new_fused(base: type[nn.Sequential]) -> nn.Module:
    cls = fused_class(base)
    return cls.__new__(cls)


def _fusable_class(m: nn.Module) -> bool:
    cls = type(m)
    return (
        isinstance(m, nn.Sequential)
        and not issubclass(cls, MePropSequential)
        and cls.forward is nn.Sequential.forward
    )


def fuse_sequentials_(model: nn.Module) -> nn.Module:
    """In place: every ``nn.Sequential`` in ``model`` (itself included) with a chain of
    Linear layers holding a ``MePropLinear`` becomes a :class:`MePropSequential`, so the
    chain runs fused behind ``loss.backward()``. Subclasses with their own ``forward``
    (mesimp's ``MLP`` calls ``fused_forward`` itself) are left alone. Returns ``model``."""
    for m in model.modules():
        if not _fusable_class(m):
            continue
        mods = list(m._modules.values())
        ends = {i: _chain_end(mods, i) for i, c in enumerate(mods) if _is_linear(c)}
        if any(end - i > 1 and _has_meprop(mods[i:end]) for i, end in ends.items()):
            m.__class__ = fused_class(type(m))
    return model


def _has_meprop(mods: list[nn.Module]) -> bool:
    return any(type(m) is MePropLinear for m in mods)


def unfuse_sequentials_(model: nn.Module) -> nn.Module:
    """In place: undo :func:`fuse_sequentials_` where no ``MePropLinear`` is left among a
    Sequential's children (plain PyTorch classes again)."""
    for m in model.modules():
        if isinstance(m, MePropSequential) and not _has_meprop(list(m._modules.values())):
            m.__class__ = m._mesimp_base
            m.__dict__.pop(_CACHE, None)
    return model


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
    if not (_applies(x) and x.dim() == 2 and y.dtype == torch.long and y.dim() == 1):
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
