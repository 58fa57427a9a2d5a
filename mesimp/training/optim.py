"""Optimizers for meProp training, and the one place that builds them.

meProp's backward touches only the selected rows of W; a dense optimizer would
then sweep all of W anyway (Adam reads and writes four full-size tensors per
step), which on CPU erases the gain. ``RowSparseAdam`` is ``torch.optim.Adam``
for dense gradients and a *lazy* row update for row-sparse ones: only the rows
present in the gradient have their moments and weights updated (the semantics of
``torch.optim.SparseAdam``, and the paper's "only k rows are modified").
Adagrad and plain SGD in torch already accept sparse gradients, and for them the
lazy update is exact; ``RowSparseAdagrad`` and ``RowSparseSGD`` are torch's, with the
compiled one-call step of ``mesimp.nn.kernels`` where it applies.

``RowSparseAdamW`` is the one-line swap for a stock loop: ``torch.optim.AdamW``'s
signature, any gradient layout, and a lazy update of the rows whose gradient is not zero,
which a meProp layer's dense gradient tells it without a scan (``mesimp.nn.grad_buffer``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from itertools import chain

import torch
from torch.optim import optimizer as _torch_optimizer

from mesimp.errors import BadInputError
from mesimp.nn import grad_buffer, kernels
from mesimp.nn.arg_cache import same

OPTIMIZERS = ("adam", "adagrad", "sgd")


class CompiledOptimizer:
    """The compiled one-call step (``torch.ops.mesimp.optimizer_step``), shared by the
    optimizers below. Each says through ``compiled_hyper`` and ``compiled_state`` whether
    a param group can take it (plain options, float32 contiguous CPU params, kernels on)
    and with what state; otherwise the optimizer's own Python step runs.
    ``mesimp.nn.fused.train_step`` calls the same kernels with the same arguments."""

    KIND: int  # kernels.cpp's Optim enum
    LAZY = False  # update only the rows whose gradient is not zero (RowSparseAdamW)

    def compiled_hyper(self, group: dict) -> list[float] | None:
        """The group's hyperparameters for the kernels, or None where its options are ones
        the kernels lack (read at every call: a scheduler may change them in place)."""
        raise NotImplementedError

    def compiled_state(self, params: list[torch.Tensor]) -> tuple | None:
        """``(state1, state2, steps)``: the params' state tensors for the kernels, or None."""
        raise NotImplementedError

    def kernel_args(self, group: dict, params: list[torch.Tensor]) -> tuple | None:
        """``(state1, state2, steps, hyper, lazy)`` for the kernels where ``params`` can take them
        (kernels on, float32 contiguous CPU tensors, options the kernels have); else None.
        The one check for both callers: this optimizer's own step and
        ``mesimp.nn.fused.train_step``. The state lists are kept while the state they
        came from is unchanged (``mesimp.nn.arg_cache``)."""
        if not (kernels.usable(*params) and all(p.is_contiguous() for p in params)):
            return None
        hyper = self.compiled_hyper(group)
        if hyper is None:
            return None
        cache = self.__dict__.setdefault("_kernel_state", {})
        entry = cache.get(id(group))
        if entry is not None and same(entry[0], self._state_key(group, params)):
            return (*entry[1], hyper, self.LAZY)
        state = self.compiled_state(params)
        if state is None:
            cache.pop(id(group), None)
            return None
        if entry is None:  # a new group: forget those no longer here (load_state_dict)
            live = {id(g) for g in self.param_groups}
            for gid in [gid for gid in cache if gid not in live]:
                del cache[gid]
        cache[id(group)] = (self._state_key(group, params), state)  # after: state created
        return (*state, hyper, self.LAZY)

    def _state_key(self, group: dict, params: list[torch.Tensor]) -> tuple:
        """What ``compiled_state`` read: the state dict, each param's state and its
        tensors (``load_state_dict`` replaces them all); the group keeps its id."""
        key = [group, self.state, *params]
        for p in params:
            s = self.state.get(p)
            key.append(s)
            if s is not None:
                key.extend(s.values())
        return tuple(key)

    def compiled_plan(self) -> list[tuple] | None:
        """Per param group ``(params, grads, hints, state1, state2, steps, hyper, lazy)``
        for the kernels, or None unless every group can take them (no half-compiled
        step). A hint is the rows outside which a dense gradient is zero, where a meProp
        layer's gradient buffer knows them (only a lazy step reads it)."""
        plans = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            args = self.kernel_args(group, ps)
            if args is None:
                return None
            hints = [grad_buffer.known_rows(p) if self.LAZY else None for p in ps]
            plans.append((ps, [row_sparse(p.grad) for p in ps], hints, *args))
        return plans

    def compiled_step(self) -> bool:
        """The whole step in compiled calls; False (nothing done) where they do not apply."""
        plans = self.compiled_plan()
        if plans is None:
            return False
        for plan in plans:
            torch.ops.mesimp.optimizer_step(self.KIND, *plan)
        return True

    @staticmethod
    def profile_hook_step(func: Callable) -> Callable:
        """torch's wrapper around ``step`` (step pre-hooks, the step, the profiler's entry
        point, post-hooks; ``Optimizer`` installs it through this name), with its
        ``record_function`` label entered only while a profiler runs: it costs even with
        no profiler, and ``opt.step()`` took 134 µs with it, 104 µs without (784-500-500-10,
        k=20, b=50: a quarter of the step outside the forward and backward)."""

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            self = args[0]
            if not torch.autograd._profiler_enabled():
                return _run_step_hooks(self, func, args, kwargs)
            name = f"Optimizer.step#{self.__class__.__name__}.step"
            with torch.autograd.profiler.record_function(name):
                return _run_step_hooks(self, func, args, kwargs)

        return wrapper

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; setting gradients to None with no profiler running skips
        its ``record_function`` label and bookkeeping: 36 µs a call with them, 6 µs
        without, at the sizes above."""
        if not set_to_none or torch.autograd._profiler_enabled():
            super().zero_grad(set_to_none)  # type: ignore[misc]
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _step_or(self, torch_step, closure) -> object:
        """The closure's loss, then the compiled step, or ``torch_step`` where it does not
        apply (called unhooked: the subclass's own ``step`` already runs the hooks)."""
        loss = closure_loss(closure)
        if not self.compiled_step():
            _unhooked(torch_step)(self)
        return loss


def row_sparse(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as the optimizers here take it: dense, or COO with one sparse dimension
    (rows). A COO with more sparse dimensions becomes the rows it touches, whole (zeros
    where it has no entry), so the lazy update is per row, as for MePropLinear's."""
    if not grad.is_sparse or grad.sparse_dim() == 1:
        return grad
    rows = grad.coalesce().indices()[0].unique()
    dense = grad.to_dense().index_select(0, rows)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), dense, grad.shape, is_coalesced=True)


def _run_step_hooks(opt: torch.optim.Optimizer, func: Callable, args: tuple, kwargs: dict):
    """What torch's step wrapper runs inside its profiler label: the global and the
    optimizer's step pre-hooks (which may replace the arguments), the step, the
    profiler's ``_optimizer_step_code`` entry point, then the post-hooks."""
    for pre_hook in chain(
        _torch_optimizer._global_optimizer_pre_hooks.values(),
        opt._optimizer_step_pre_hooks.values(),
    ):
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"{func} must return None or a tuple of (new_args, new_kwargs), "
                    f"but got {result}."
                )
            args, kwargs = result
    out = func(*args, **kwargs)
    opt._optimizer_step_code()
    for post_hook in chain(
        opt._optimizer_step_post_hooks.values(),
        _torch_optimizer._global_optimizer_post_hooks.values(),
    ):
        post_hook(opt, args, kwargs)
    return out


def _unhooked(step):
    """torch wraps an optimizer class's ``step`` with its hook runner once an instance
    exists; a subclass's ``step`` already runs the hooks, so it calls the inner one."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class _RowAdam(CompiledOptimizer):
    """The Adam family's shared parts: state like torch's, and the Python step for
    row-sparse (or lazily updated) gradients."""

    KIND = 0
    DECOUPLED = False  # AdamW's weight decay (on the weights, not added to the gradient)

    def param_state(self, p: torch.Tensor, amsgrad: bool = False) -> dict:
        """``p``'s state, created on first use with the keys and types of torch's Adam
        (so the state_dict stays compatible); the compiled one-call step uses it too."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # torch's own Adam keeps it on the CPU
            state["step"] = state["step"].to(p.device, torch.float32)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def compiled_state(self, params: list[torch.Tensor]) -> tuple | None:
        states = [self.param_state(p) for p in params]
        return (
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )

    def _python_step(self, group: dict, weight_decay: float) -> None:
        """One group's step: the rows each gradient names (``_rows``) are gathered from
        the weight and the moments, stepped by torch's fused Adam(W) kernel
        (``torch._fused_adam(w)_``, what ``Adam(fused=True)`` runs) and scattered back.
        Measured: 0.31 -> 0.19 ms per step against a loop of ~10 element-wise ops per
        sparse param."""
        amsgrad, maximize = group["amsgrad"], group["maximize"]
        beta1, beta2 = group["betas"]
        batches: dict[tuple, list[tuple]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.param_state(p, amsgrad)
            state["step"] += 1  # every param with a gradient, as torch counts
            g, rows = _rows(p, p.grad, self.LAZY)
            if rows is not None and rows.numel() == 0:
                continue
            tensors = [p, state["exp_avg"], state["exp_avg_sq"]]
            if amsgrad:
                tensors.append(state["max_exp_avg_sq"])
            batch = batches.setdefault((p.device, p.dtype), [])
            sel = tensors if rows is None else [t.index_select(0, rows) for t in tensors]
            batch.append((tensors, rows, sel, g, state["step"]))
        fused = torch._fused_adamw_ if weight_decay and self.DECOUPLED else torch._fused_adam_
        for batch in batches.values():
            sel = [b[2] for b in batch]
            fused(
                [t[0] for t in sel],
                [b[3] for b in batch],
                [t[1] for t in sel],
                [t[2] for t in sel],
                [t[3] for t in sel] if amsgrad else [],
                [b[4] for b in batch],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=group["eps"],
                amsgrad=amsgrad,
                maximize=maximize,
            )
            for tensors, rows, picked, *_ in batch:
                if rows is not None:
                    for t, r in zip(tensors, picked, strict=True):
                        t.index_copy_(0, rows, r)


def _rows(
    p: torch.Tensor, grad: torch.Tensor, lazy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(values, rows)``: the gradient rows a step updates (``rows`` None: all of it,
    ``values`` then the whole gradient). Row-sparse: the rows it names (lazy: those of
    them that are not all zero). Dense: all (lazy: the rows not all zero, found among a
    meProp layer's known rows where its buffer knows them, else by a scan)."""
    g = row_sparse(grad)
    if g.is_sparse:
        rows = g._indices()[0]
        # autograd drops the coalesced flag; re-sort only if really unsorted
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            g = g.coalesce()
            rows = g._indices()[0]
        values = g._values()
        if lazy:
            keep = values.reshape(rows.numel(), -1).ne(0).any(1)
            rows, values = rows[keep], values[keep]
        return values, rows
    if not lazy:
        return g, None
    n = p.shape[0] if p.dim() else 1
    flat = g.reshape(n, -1)
    hint = grad_buffer.known_rows(p)
    if hint is None:
        rows = flat.ne(0).any(1).nonzero().squeeze(1)
    else:
        hint = hint.to(g.device)
        rows = hint[flat.index_select(0, hint).ne(0).any(1)]
    if rows.numel() == n:
        return g, None
    return flat.index_select(0, rows).reshape(rows.numel(), *p.shape[1:]), rows


class RowSparseAdam(_RowAdam, torch.optim.Adam):
    """Adam with a lazy row-sparse path for sparse COO gradients.

    Dense gradients take the parent's (fused) Adam step unchanged. Sparse gradients
    (from ``MePropLinear`` with ``sparse_grad=True``) update only their rows. Its
    ``state_dict`` is the same as ``torch.optim.Adam``'s.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=True)

    def compiled_hyper(self, group: dict) -> list[float] | None:
        if group["amsgrad"] or group["weight_decay"] or group["maximize"]:
            return None
        beta1, beta2 = group["betas"]
        return [float(group["lr"]), float(beta1), float(beta2), float(group["eps"])]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as Adam.step
        """One fused Adam kernel over all dense params *and* the gathered sparse rows
        (``_RowAdam._python_step``). Where the compiled kernels apply, one call updates
        each named row in a single pass instead (within float32 rounding of this path:
        no fused multiply-adds)."""
        loss = closure_loss(closure)
        if self.compiled_step():
            return loss
        for group in self.param_groups:
            self._python_step(group, 0.0)
        return loss


class RowSparseAdamW(_RowAdam, torch.optim.AdamW):
    """``torch.optim.AdamW``, same signature and ``state_dict``, with a *lazy* update: only
    the rows of a parameter whose gradient is not all zero are updated (for a 1-D
    parameter, a row is an element). The one-line swap for a stock loop over a meProp
    model: dense gradients (the drop-in default) work, and a meProp layer's buffer tells
    which rows it wrote, so the step costs O(k·in) per layer, not O(out·in).

    What "lazy" changes against ``torch.optim.AdamW`` (the semantics of
    ``torch.optim.SparseAdam``, and the papers' "only k rows are modified"): a row with no
    gradient this step keeps its weights, its moments and its value exactly: its moments
    do not decay, its momentum does not move it, and weight decay does not shrink it. The
    step counter (bias correction) is per parameter and counts every step that gave the
    parameter a gradient. Rows that do have a gradient get AdamW's update (to float32
    rounding: the compiled step does not fuse multiply-adds).

    A row-sparse (COO) gradient counts the same way: its rows that are not all zero.
    ``amsgrad``, ``maximize`` and tensor options take the Python step (one fused AdamW
    kernel on the gathered rows); the rest takes the compiled one-call step where the
    kernels apply. ``capturable`` and ``differentiable`` are refused (a lazy in-place
    row update is neither)."""

    LAZY = True
    DECOUPLED = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if capturable or differentiable:
            raise BadInputError("RowSparseAdamW: capturable and differentiable are not supported")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, fused=fused,
        )  # fmt: skip

    def compiled_hyper(self, group: dict) -> list[float] | None:
        if group["amsgrad"] or group["maximize"]:
            return None
        beta1, beta2 = group["betas"]
        hyper = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]
        if any(isinstance(h, torch.Tensor) and h.numel() != 1 for h in hyper):
            return None
        return [float(h) for h in hyper]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as AdamW.step
        """The compiled lazy step where every param group takes it, else the Python one
        (``_RowAdam._python_step``); both update the same rows."""
        loss = closure_loss(closure)
        if self.compiled_step():
            return loss
        for group in self.param_groups:
            self._python_step(group, float(group["weight_decay"]))
        return loss


class RowSparseAdagrad(CompiledOptimizer, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (same options, state and results within float32 rounding),
    whose step runs in one compiled call where it can: row-sparse gradients touch only
    their rows, as torch's sparse Adagrad does, without its coalesce/sparse_mask
    round trips. Weight decay or ``maximize`` take torch's own step."""

    KIND = 1

    def compiled_hyper(self, group: dict) -> list[float] | None:
        if group["weight_decay"] or group["maximize"]:
            return None
        return [float(group["lr"]), float(group["lr_decay"]), float(group["eps"])]

    def compiled_state(self, params: list[torch.Tensor]) -> tuple | None:
        states = [self.state[p] for p in params]
        if not all("sum" in s and "step" in s for s in states):
            return None
        return [s["sum"] for s in states], [], [s["step"] for s in states]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as Adagrad.step
        """The compiled step where every param group takes it, else torch's own."""
        return self._step_or(torch.optim.Adagrad.step, closure)


class RowSparseSGD(CompiledOptimizer, torch.optim.SGD):
    """``torch.optim.SGD`` whose plain step (no momentum, weight decay or ``maximize``)
    runs in one compiled call; row-sparse gradients touch only their rows."""

    KIND = 2

    def compiled_hyper(self, group: dict) -> list[float] | None:
        if group["momentum"] or group["weight_decay"] or group["maximize"]:
            return None
        return [float(group["lr"])]

    def compiled_state(self, params: list[torch.Tensor]) -> tuple | None:
        return [], [], []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as SGD.step
        """The compiled step where every param group takes it, else torch's own."""
        return self._step_or(torch.optim.SGD.step, closure)


def closure_loss(closure) -> object:
    """What ``step(closure)`` returns: the closure's loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def build_optimizer(
    name: str, params: Iterable, lr: float, sparse_update: bool = True
) -> torch.optim.Optimizer:
    """Adam, AdaGrad or SGD for ``params``.

    ``sparse_update=True`` (meProp's fast path) picks ``RowSparseAdam`` for Adam;
    ``False`` picks torch's fused dense Adam, the exact dense reference. Adagrad and
    SGD accept both gradient layouts (torch's, with a compiled step where it applies).
    """
    params = list(params)
    if not lr > 0:
        raise BadInputError(f"learning rate must be > 0, got {lr}")
    if name == "adam":
        if sparse_update:
            return RowSparseAdam(params, lr=lr)
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "adagrad":
        return RowSparseAdagrad(params, lr=lr)
    if name == "sgd":
        return RowSparseSGD(params, lr=lr)
    raise BadInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments/accumulators (meSimp resets once at each cycle start)."""
    optimizer.state.clear()
