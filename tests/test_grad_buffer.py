"""The persistent dense weight gradient (mesimp.nn.grad_buffer) against fresh tensors.

A meProp layer with dense gradients writes each step's rows into a buffer it keeps, zeroing
only the rows it wrote the step before. Every test here runs the same training on a twin
whose gradients are fresh zero-filled tensors every backward (the buffer switched off:
``grad_buffer.enabled(False)``; that path is itself tested against plain autograd on the
masked gradient in test_meprop.py) and requires the same bits: weights, gradients and
optimizer state. The scenarios are the ones that could break the "zero outside the old
rows" invariant: accumulation, ``clip_grad_norm_``, ``zero_grad(set_to_none=False)``, a
gradient the user keeps, a layer used twice in one forward, a NaN written into ``.grad``.
Each runs on the compiled and the Python path, per layer and as one fused chain; a test
also checks that the buffer really is reused (the same storage step after step).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn import fused, grad_buffer, kernels
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

PATHS = ["cpp", "python"]


@pytest.fixture(params=PATHS)
def path(request):
    if request.param == "cpp" and not kernels.available():
        pytest.skip("mesimp._C is not built")
    before = kernels.mode()
    kernels.set_kernels(request.param)
    yield request.param
    kernels.set_kernels(before)


def _model(selection: str, chain: bool) -> nn.Module:
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    meprop_(seq, MePropConfig(k=4, selection=selection))
    if not chain:  # one autograd node per layer: a plain Sequential's class
        seq.__class__ = nn.Sequential
    return seq


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)


@contextlib.contextmanager
def _no_buffer() -> Iterator[None]:
    with grad_buffer.enabled(False):
        yield


Step = Callable[[nn.Module, torch.optim.Optimizer, int], None]


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = _batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _accumulate(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    opt.zero_grad()
    for half in range(2):
        x, y = _batch(2 * i + half)
        F.cross_entropy(model(x), y).backward()
    opt.step()


def _clip(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = _batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()


def _keep_zeros(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = _batch(i)
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _twice(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    """The hidden layer applied twice in one forward (a tied weight)."""
    x, y = _batch(i)
    opt.zero_grad()
    h = model[1](model[0](x))
    h = model[3](model[2](h))
    h = model[3](model[2](h))  # the same layer again
    F.cross_entropy(model[4](h), y).backward()
    opt.step()


def _nan_written(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    """A NaN written into .grad after the step (what clip_grad_norm_ does with a
    non-finite norm) must not survive into the next step's gradient."""
    _plain_step(model, opt, i)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))


SCENARIOS: dict[str, Step] = {
    "stock loop": _plain_step,
    "accumulation": _accumulate,
    "clip_grad_norm_": _clip,
    "zero_grad(set_to_none=False)": _keep_zeros,
    "layer used twice": _twice,
    "NaN written into .grad": _nan_written,
}


def _run(step: Step, selection: str, chain: bool, buffered: bool, n: int = 4):
    model = _model(selection, chain)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads = []
    ctx = contextlib.nullcontext() if buffered else _no_buffer()
    torch.manual_seed(1)  # random selection and dropout draw from the default generator
    with ctx:
        for i in range(n):
            step(model, opt, i)
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
    return model, opt, grads


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("selection", ["unified", "topk"])
@pytest.mark.parametrize("chain", [False, True], ids=["per-layer", "chain"])
def test_buffered_gradients_are_the_fresh_ones(path, scenario, selection, chain):
    step = SCENARIOS[scenario]
    ref_model, ref_opt, ref_grads = _run(step, selection, chain, buffered=False)
    model, opt, grads = _run(step, selection, chain, buffered=True)
    for i, (rg, g) in enumerate(zip(ref_grads, grads, strict=True)):
        for a, b in zip(rg, g, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f"step {i}"
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_opt.state.values(), opt.state.values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("chain", [False, True], ids=["per-layer", "chain"])
def test_the_buffer_is_reused_and_zero_outside_the_rows(path, chain):
    """Step after step the hidden weights' gradients live in the same storage (no new
    out x in tensor), hold exactly k nonzero rows (unified), and those are the rows the
    layer selected (its hits)."""
    model = _model("unified", chain)
    if chain and path == "cpp":
        x, _ = _batch(0)
        assert fused.is_fused_node(model(x).grad_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ptrs = set()
    for i in range(4):
        before = [m.hits.clone() for m in model if isinstance(m, MePropLinear)]
        _plain_step(model, opt, i)
        for m, h in zip([m for m in model if isinstance(m, MePropLinear)], before, strict=True):
            rows = (m.weight.grad != 0).any(1).nonzero().squeeze(1)
            picked = (m.hits - h).nonzero().squeeze(1)
            assert rows.tolist() == picked.tolist() and len(picked) == 4
            ptrs.add(m.weight.grad.data_ptr())
    assert len(ptrs) == 2  # one buffer per hidden layer, reused at every step


def test_a_kept_gradient_is_never_overwritten(path):
    """``g = w.grad`` kept across ``zero_grad()``: the next backward must not write into
    it (the buffer is given up to the user and a new one allocated)."""
    model = _model("unified", chain=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _plain_step(model, opt, 0)
    kept = model[0].weight.grad
    snapshot = kept.clone()
    _plain_step(model, opt, 1)
    assert torch.equal(kept, snapshot)
    assert model[0].weight.grad.data_ptr() != kept.data_ptr()


def test_copies_start_with_an_empty_buffer(path):
    """deepcopy and pickling do not carry the buffer's bookkeeping over (a copied tensor's
    version counter starts again), and the copy trains as the original does."""
    model = _model("unified", chain=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _plain_step(model, opt, 0)
    twin = copy.deepcopy(model)
    assert grad_buffer.ATTR not in twin[0].weight.__dict__  # torch copies no Parameter attrs
    gb = pickle.loads(pickle.dumps(model[0].weight)).__dict__[grad_buffer.ATTR]
    assert gb.buf.numel() == 0 and int(gb.version) == -1
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in (1, 2):
        _plain_step(model, opt, i)
        _plain_step(twin, twin_opt, i)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
