"""RowSparseAdam and build_optimizer against independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from mesimp.errors import BadInputError
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import RowSparseAdagrad, RowSparseAdam, RowSparseSGD, build_optimizer

DT = torch.float64
B1, B2 = 0.9, 0.999


def sparse_rows(rows: list[int], vals: torch.Tensor, shape) -> torch.Tensor:
    """A row-sparse COO gradient; ``rows`` may repeat and be unsorted (uncoalesced)."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), vals, shape, check_invariants=True)


class LazyAdamRef:
    """Plain-tensor lazy Adam: per-param step count, update only rows present in the grad.

    Dense grads take the ordinary Adam update of the whole tensor (eps added after the
    bias-corrected square root, as torch.optim.Adam does).
    """

    def __init__(self, params, lr, eps=1e-8):
        self.params = [p.detach().clone() for p in params]
        self.lr, self.eps = lr, eps
        self.step_n = [0] * len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.step_n[i] += 1
            t = self.step_n[i]
            p, m, v = self.params[i], self.m[i], self.v[i]
            if g.is_sparse:
                dense_g = torch.zeros_like(p)
                idx, vals = g._indices()[0].tolist(), g._values()
                for j, r in enumerate(idx):  # sum duplicates by hand
                    dense_g[r] += vals[j]
                rows = sorted(set(idx))
            else:
                dense_g = g
                rows = list(range(p.shape[0]))
            for r in rows:
                m[r] = B1 * m[r] + (1 - B1) * dense_g[r]
                v[r] = B2 * v[r] + (1 - B2) * dense_g[r] * dense_g[r]
                mhat = m[r] / (1 - B1**t)
                denom = (v[r] / (1 - B2**t)).sqrt() + self.eps
                p[r] = p[r] - self.lr * mhat / denom


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# 1. lazy sparse Adam vs a hand-written reference
# --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("dtype", [DT, torch.float32])
def test_row_sparse_adam_matches_lazy_reference(dtype, kernel_path):
    """float64 (torch's fused Adam on the gathered rows) to 1e-12; float32 (the compiled
    step on the cpp path) to float32 rounding, against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(8, 3, dtype=DT, generator=g).to(dtype))
    b = nn.Parameter(torch.randn(8, dtype=DT, generator=g).to(dtype))
    ref = LazyAdamRef([w.double(), b.double()], lr=0.05)
    opt = RowSparseAdam([w, b], lr=0.05)
    tol = 1e-12 if dtype == DT else 2e-5

    def _close(a, b):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)

    schedule = [
        [1, 4, 6],
        [4, 0],
        [7, 1, 1, 3],  # duplicate row: an uncoalesced gradient
        [2],
        [4, 5, 6],
    ]
    for step, rows in enumerate(schedule):
        gw = sparse_rows(rows, torch.randn(len(rows), 3, dtype=DT, generator=g), w.shape)
        gb = torch.randn(8, dtype=DT, generator=g) if step != 3 else None  # b skips a step
        w.grad = gw.to(dtype)
        b.grad = gb.to(dtype) if gb is not None else None
        assert (opt.compiled_plan() is not None) == (kernel_path == "cpp" and dtype != DT)
        handed = w.grad
        opt.step()
        assert w.grad is handed  # the sparse grad is handed back after the step
        ref.step([w.grad.double(), b.grad.double() if gb is not None else None])
        _close(w.detach(), ref.params[0])
        _close(b.detach(), ref.params[1])
    # the per-param step counts are the number of steps each param took part in
    assert float(opt.state[w]["step"]) == 5.0
    assert float(opt.state[b]["step"]) == 4.0
    _close(opt.state[w]["exp_avg"], ref.m[0])
    _close(opt.state[w]["exp_avg_sq"], ref.v[0])


# --------------------------------------------------------------------------------------
# 2. dense grads: exactly torch.optim.Adam
# --------------------------------------------------------------------------------------
def test_row_sparse_adam_dense_equals_adam():
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(5, 4, dtype=DT, generator=g), torch.randn(5, dtype=DT, generator=g)]
    pa = [nn.Parameter(t.clone()) for t in init]
    pb = [nn.Parameter(t.clone()) for t in init]
    oa = RowSparseAdam(pa, lr=0.03)
    ob = torch.optim.Adam(pb, lr=0.03)
    for _ in range(6):
        grads = [torch.randn(t.shape, dtype=DT, generator=g) for t in init]
        for p, q, gr in zip(pa, pb, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
        for p, q in zip(pa, pb, strict=True):
            _close(p.detach(), q.detach())
    # same state_dict layout as Adam's
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()


def test_sparse_then_dense_continues_one_adam():
    """A param that gets a sparse grad then dense ones (k switched off) stays one Adam."""
    g = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(4, 3, dtype=DT, generator=g))
    ref = LazyAdamRef([w], lr=0.1)
    opt = RowSparseAdam([w], lr=0.1)
    grads = [
        sparse_rows([0, 2], torch.randn(2, 3, dtype=DT, generator=g), w.shape),
        torch.randn(4, 3, dtype=DT, generator=g),
        torch.randn(4, 3, dtype=DT, generator=g),
        sparse_rows([3], torch.randn(1, 3, dtype=DT, generator=g), w.shape),
    ]
    for gr in grads:
        w.grad = gr
        opt.step()
        ref.step([gr])
        _close(w.detach(), ref.params[0])
    assert float(opt.state[w]["step"]) == 4.0


# --------------------------------------------------------------------------------------
# 3. absent rows are bit-unchanged
# --------------------------------------------------------------------------------------
def test_absent_rows_bit_unchanged():
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(6, 4, generator=g))
    opt = RowSparseAdam([w], lr=0.1)
    w.grad = torch.randn(6, 4, generator=g)  # every row gets nonzero moments
    opt.step()
    before = w.detach().clone()
    m_before = opt.state[w]["exp_avg"].clone()
    v_before = opt.state[w]["exp_avg_sq"].clone()
    for rows in ([1, 4], [4]):
        w.grad = sparse_rows(rows, torch.randn(len(rows), 4, generator=g), w.shape)
        opt.step()
    absent = [0, 2, 3, 5]
    assert torch.equal(w.detach()[absent], before[absent])
    assert torch.equal(opt.state[w]["exp_avg"][absent], m_before[absent])
    assert torch.equal(opt.state[w]["exp_avg_sq"][absent], v_before[absent])
    assert not torch.equal(w.detach()[[1, 4]], before[[1, 4]])


# --------------------------------------------------------------------------------------
# 4. vs torch.optim.SparseAdam
# --------------------------------------------------------------------------------------
def test_matches_torch_sparse_adam():
    g = torch.Generator().manual_seed(4)
    init = torch.randn(10, 3, dtype=DT, generator=g)
    a = nn.Parameter(init.clone())
    b = nn.Parameter(init.clone())
    # SparseAdam adds eps before the bias correction of the denominator, Adam after; a
    # tiny eps makes that difference negligible.
    oa = RowSparseAdam([a], lr=0.02, eps=1e-14)
    ob = torch.optim.SparseAdam([b], lr=0.02, eps=1e-14)
    for _ in range(6):
        n = int(torch.randint(1, 6, (1,), generator=g))
        rows = torch.randint(0, 10, (n,), generator=g).tolist()
        vals = torch.randn(n, 3, dtype=DT, generator=g)
        a.grad = sparse_rows(rows, vals, a.shape)
        b.grad = sparse_rows(rows, vals.clone(), b.shape)
        oa.step()
        ob.step()
        _close(a.detach(), b.detach(), tol=1e-10)


# --------------------------------------------------------------------------------------
# 5. build_optimizer
# --------------------------------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.zeros(2, 2))]


@pytest.mark.parametrize(
    "name, sparse, cls",
    [
        ("adam", True, RowSparseAdam),
        ("adam", False, torch.optim.Adam),
        ("adagrad", True, RowSparseAdagrad),
        ("adagrad", False, RowSparseAdagrad),
        ("sgd", True, RowSparseSGD),
        ("sgd", False, RowSparseSGD),
    ],
)
def test_build_optimizer_types(name, sparse, cls):
    opt = build_optimizer(name, _params(), 0.1, sparse_update=sparse)
    assert type(opt) is cls
    assert isinstance(opt, {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
                            "sgd": torch.optim.SGD}[name])  # fmt: skip
    assert opt.param_groups[0]["lr"] == 0.1


def test_build_optimizer_accepts_generator():
    opt = build_optimizer("adam", (p for p in _params()), 0.1)
    assert len(opt.param_groups[0]["params"]) == 1


@pytest.mark.parametrize(
    "name, lr",
    [("adam", 0.0), ("adam", -1e-3), ("sgd", -1.0), ("rmsprop", 0.1), ("Adam", 0.1), ("", 0.1)],
)
def test_build_optimizer_rejects(name, lr):
    with pytest.raises(BadInputError):
        build_optimizer(name, _params(), lr)


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_build_optimizer_rejects_nan_lr(name):
    with pytest.raises(BadInputError):
        build_optimizer(name, _params(), float("nan"))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", ["adagrad", "sgd", "adam"])
def test_sparse_meprop_grads_step(name):
    torch.manual_seed(0)
    layer = MePropLinear(5, 6, k=2, bias=False, sparse_grad=True)
    opt = build_optimizer(name, layer.parameters(), 0.1)
    before = layer.weight.detach().clone()
    x = torch.randn(1, 5)
    layer(x).sum().backward()
    gw = layer.weight.grad
    assert gw.is_sparse
    touched = sorted(set(gw.coalesce().indices()[0].tolist()))
    assert len(touched) == 2
    expected_sgd = before - 0.1 * gw.to_dense()
    opt.step()
    after = layer.weight.detach()
    untouched = [r for r in range(6) if r not in touched]
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[touched], before[touched])
    if name == "sgd":
        torch.testing.assert_close(after, expected_sgd)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_row_sparse_grads_of_any_rank(kernel_path):
    """A 3-D parameter with a row-sparse (one sparse dimension) gradient steps its rows
    (compiled on the cpp path), and so does a COO with two sparse dimensions (the rows it
    touches, whole); both against the float64 reference."""
    g = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(6, 3, 2, generator=g))
    opt = RowSparseAdam([w], lr=0.05)
    ref = LazyAdamRef([w.double()], lr=0.05)
    for rows in ([4, 1, 4], [0, 5]):
        w.grad = torch.sparse_coo_tensor(
            torch.tensor([rows]), torch.randn(len(rows), 3, 2, generator=g), w.shape
        )
        assert (opt.compiled_plan() is not None) == (kernel_path == "cpp")
        grad = w.grad.double()
        opt.step()
        ref.step([grad])
    hybrid = torch.sparse_coo_tensor(torch.tensor([[2, 3], [0, 2]]), torch.randn(2, 2), w.shape)
    w.grad = hybrid
    assert (opt.compiled_plan() is not None) == (kernel_path == "cpp")
    opt.step()
    as_rows = sparse_rows([2, 3], hybrid.to_dense()[[2, 3]].double(), w.shape)  # by hand
    ref.step([as_rows])
    torch.testing.assert_close(w.detach().double(), ref.params[0], rtol=2e-5, atol=2e-5)


class LazyAdagradRef:
    """Plain float64 Adagrad / SGD, per row: ``sum += g^2; p -= clr g / (sqrt(sum) + eps)``
    with ``clr = lr / (1 + (step - 1) lr_decay)`` (SGD: ``p -= lr g``); a row-sparse grad
    touches only its rows (duplicates summed first), a dense one every row."""

    def __init__(self, params, lr, lr_decay, eps, sgd):
        self.p = [q.detach().double().clone() for q in params]
        self.s = [torch.zeros_like(q) for q in self.p]
        self.n = [0] * len(self.p)
        self.lr, self.lr_decay, self.eps, self.sgd = lr, lr_decay, eps, sgd

    def step(self, grads):
        for i, g in enumerate(grads):
            self.n[i] += 1
            g = g.coalesce().to_dense().double() if g.is_sparse else g.double()
            rows = g.reshape(g.shape[0], -1).abs().sum(1) > 0
            if self.sgd:
                self.p[i][rows] -= self.lr * g[rows]
                continue
            clr = self.lr / (1 + (self.n[i] - 1) * self.lr_decay)
            self.s[i][rows] += g[rows] * g[rows]
            self.p[i][rows] -= clr * g[rows] / (self.s[i][rows].sqrt() + self.eps)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("name", ["adagrad", "sgd"])
def test_adagrad_sgd_against_float64(name, kernel_path):
    """RowSparseAdagrad / RowSparseSGD (compiled or torch's step, per the kernel path) on
    uncoalesced row-sparse and dense float32 gradients, against float64 by hand."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(7, 5, generator=g)), nn.Parameter(torch.randn(7))]
    if name == "adagrad":
        opt = RowSparseAdagrad(params, lr=0.1, lr_decay=0.05, eps=1e-6)
    else:
        opt = RowSparseSGD(params, lr=0.1)
    ref = LazyAdagradRef(params, 0.1, 0.05, 1e-6, sgd=name == "sgd")
    for step in range(5):
        rows = [[1, 4, 1], [6, 0], [3]][step % 3]
        gw = sparse_rows(rows, torch.randn(len(rows), 5, generator=g), (7, 5))
        if step == 3:
            gw = torch.randn(7, 5, generator=g)  # a dense step between the sparse ones
        grads = [gw, torch.randn(7, generator=g)]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        assert (opt.compiled_plan() is not None) == (kernel_path == "cpp")
        opt.step()
        ref.step(grads)
    for got, want in zip(params, ref.p, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_options_the_kernels_lack_take_torchs_step(name, kernel_path):
    """Weight decay (Adagrad) and momentum (SGD) are not compiled: torch's own step runs,
    once, matching torch. Every optimizer runs its step hooks once (torch's inner step
    is not re-hooked) and returns the closure's loss."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opts = {
        "adam": (RowSparseAdam(a.parameters(), lr=0.1),
                 torch.optim.Adam(b.parameters(), lr=0.1)),
        "adagrad": (RowSparseAdagrad(a.parameters(), lr=0.1, weight_decay=0.1),
                    torch.optim.Adagrad(b.parameters(), lr=0.1, weight_decay=0.1)),
        "sgd": (RowSparseSGD(a.parameters(), lr=0.1, momentum=0.9),
                torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)),
    }  # fmt: skip
    mine, theirs = opts[name]
    calls = []
    mine.register_step_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, o in ((a, mine), (b, theirs)):
            o.zero_grad()

            def closure(m=m):
                loss = m(x).square().sum()
                loss.backward()
                return loss

            loss = o.step(closure)
            assert torch.isfinite(loss)
    assert len(calls) == 3
    if name != "adam":
        assert mine.compiled_plan() is None
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [RowSparseAdam, RowSparseAdagrad, RowSparseSGD])
def test_step_hooks_profiler_labels_and_zero_grad(cls):
    """The lean step wrapper keeps torch's contract: global and per-optimizer pre-hooks
    (a pre-hook may replace the arguments) and post-hooks run once per step, in torch's
    order; under a profiler the step and zero_grad carry torch's labels; zero_grad sets
    gradients to None, or zeroes them (dense and sparse) with ``set_to_none=False``."""
    lin = nn.Linear(4, 3)
    opt = cls(lin.parameters(), lr=0.1)
    order = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: order.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: order.append("pre") or (a[:1], {})),
        opt.register_step_post_hook(lambda *_: order.append("post")),
        register_optimizer_step_post_hook(lambda *_: order.append("global post")),
    ]
    try:
        lin(torch.randn(2, 4)).sum().backward()
        assert opt.step(lambda: 1 / 0) is None  # the pre-hook replaced the closure
        assert order == ["global pre", "pre", "post", "global post"]
    finally:
        for h in handles:
            h.remove()
    lin(torch.randn(2, 4)).sum().backward()
    with torch.profiler.profile() as prof:
        opt.step()
        opt.zero_grad()
    names = {e.key for e in prof.key_averages()}
    assert f"Optimizer.step#{cls.__name__}.step" in names
    assert f"Optimizer.zero_grad#{cls.__name__}.zero_grad" in names
    assert all(p.grad is None for p in lin.parameters())
    lin.weight.grad = sparse_rows([1], torch.ones(1, 4), (3, 4))
    lin.bias.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert lin.weight.grad.is_sparse and not lin.weight.grad.to_dense().any()
    assert torch.equal(lin.bias.grad, torch.zeros(3))


# --------------------------------------------------------------------------------------
# 6. end to end
# --------------------------------------------------------------------------------------
def test_end_to_end_loss_decreases():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    meprop_(model, MePropConfig(k=2, sparse_grad=True))
    assert isinstance(model[0], MePropLinear) and isinstance(model[2], MePropLinear)
    opt = build_optimizer("adam", model.parameters(), 1e-2)
    assert isinstance(opt, RowSparseAdam)
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert model[0].weight.grad.is_sparse
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(model[0].ref) == 40 * 16


# --------------------------------------------------------------------------------------
# RowSparseAdamW: lazy AdamW against a float64 hand-written reference
# --------------------------------------------------------------------------------------
class LazyAdamWRef:
    """Lazy AdamW by hand: a row is updated only if its gradient is not all zero (a 1-D
    parameter's row is an element); its weight is decayed (decoupled), then Adam's update.
    The step count is per parameter and counts the steps that gave it a gradient."""

    def __init__(self, params, lr, wd, eps=1e-8, amsgrad=False, maximize=False):
        self.params = [p.detach().double().clone() for p in params]
        self.lr, self.wd, self.eps = lr, wd, eps
        self.amsgrad, self.maximize = amsgrad, maximize
        self.t = [0] * len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.t[i] += 1
            t = self.t[i]
            g = g.to_dense().double() if g.is_sparse else g.double()
            g = -g if self.maximize else g
            p, m, v, vmax = self.params[i], self.m[i], self.v[i], self.vmax[i]
            for r in range(p.shape[0]):
                if not bool((g[r] != 0).any()):
                    continue
                p[r] = p[r] * (1 - self.lr * self.wd)
                m[r] = B1 * m[r] + (1 - B1) * g[r]
                v[r] = B2 * v[r] + (1 - B2) * g[r] * g[r]
                vmax[r] = torch.maximum(vmax[r], v[r])
                vv = vmax[r] if self.amsgrad else v[r]
                denom = (vv / (1 - B2**t)).sqrt() + self.eps
                p[r] = p[r] - self.lr / (1 - B1**t) * m[r] / denom


def _adamw_case(dtype, layout, seed=0):
    """A weight with gradients on a few rows per step (dense with zero rows, or COO) and a
    bias that skips a step, over five steps."""
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(8, 3, generator=g, dtype=DT).to(dtype))
    b = nn.Parameter(torch.randn(8, generator=g, dtype=DT).to(dtype))
    steps = []
    for i, rows in enumerate([[1, 4, 6], [4, 0], [7, 1, 3], [2], [4, 5, 6]]):
        dense = torch.zeros(8, 3, dtype=DT)
        dense[rows] = torch.randn(len(rows), 3, generator=g, dtype=DT)
        gw = dense.to_sparse(1) if layout == "sparse" else dense
        gb = None
        if i != 3:
            gb = torch.randn(8, generator=g, dtype=DT)
            gb[[0, 5]] = 0.0  # elements of a 1-D parameter are rows: these stay put
        steps.append((gw, gb))
    return w, b, steps


@pytest.mark.parametrize("dtype", [DT, torch.float32])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize(
    "options", [{}, {"amsgrad": True}, {"maximize": True}], ids=["plain", "amsgrad", "maximize"]
)
def test_row_sparse_adamw_matches_lazy_reference(dtype, layout, options, kernel_path):
    from mesimp.training.optim import RowSparseAdamW

    w, b, steps = _adamw_case(dtype, layout)
    ref = LazyAdamWRef([w, b], lr=0.05, wd=0.1, **options)
    opt = RowSparseAdamW([w, b], lr=0.05, weight_decay=0.1, **options)
    tol = 1e-12 if dtype == DT else 2e-5
    for gw, gb in steps:
        before = w.detach().clone()
        w.grad = gw.to(dtype)
        b.grad = None if gb is None else gb.to(dtype)
        compiled = kernel_path == "cpp" and dtype != DT and not options
        assert (opt.compiled_plan() is not None) == compiled
        opt.step()
        ref.step([gw, gb])
        torch.testing.assert_close(w.detach().double(), ref.params[0], rtol=tol, atol=tol)
        torch.testing.assert_close(b.detach().double(), ref.params[1], rtol=tol, atol=tol)
        untouched = (gw.to_dense() == 0).all(1)
        assert torch.equal(w.detach()[untouched], before[untouched])  # bit for bit
    assert float(opt.state[w]["step"]) == 5.0 and float(opt.state[b]["step"]) == 4.0
    torch.testing.assert_close(opt.state[w]["exp_avg"].double(), ref.m[0], rtol=tol, atol=tol)


def test_row_sparse_adamw_with_every_row_is_adamw(kernel_path):
    """Gradients with no zero row: exactly AdamW's update (to float32 rounding), and the
    state_dict loads into torch.optim.AdamW and back."""
    from mesimp.training.optim import RowSparseAdamW

    g = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(5, 4, generator=g))
    b = nn.Parameter(a.detach().clone())
    mine = RowSparseAdamW([a], lr=0.02, weight_decay=0.3)
    theirs = torch.optim.AdamW([b], lr=0.02, weight_decay=0.3)
    for _ in range(4):
        grad = torch.randn(5, 4, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    again = torch.optim.AdamW([nn.Parameter(a.detach().clone())], lr=0.02, weight_decay=0.3)
    again.load_state_dict(mine.state_dict())
    back = RowSparseAdamW([nn.Parameter(a.detach().clone())], lr=0.02, weight_decay=0.3)
    back.load_state_dict(theirs.state_dict())
    assert float(back.state_dict()["state"][0]["step"]) == 4.0


def test_row_sparse_adamw_on_a_meprop_model_takes_the_buffer_rows(kernel_path):
    """The drop-in's dense gradients: the step updates exactly the rows the layer selected
    (the buffer's rows, no scan), the same as the same step given the COO gradient."""
    from mesimp.nn import grad_buffer
    from mesimp.training.optim import RowSparseAdamW

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    meprop_(net, MePropConfig(k=3, selection="unified"))
    twin = copy.deepcopy(net)
    twin[0].meprop_config.sparse_grad = True  # the same layer, row-sparse COO gradients
    opts = [RowSparseAdamW(m.parameters(), lr=0.05) for m in (net, twin)]
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    for model, opt in zip((net, twin), opts, strict=True):
        for _ in range(3):
            before = model[0].weight.detach().clone()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            changed = (model[0].weight.detach() != before).any(1)
            assert int(changed.sum()) == 3
    assert grad_buffer.known_rows(net[0].weight) is not None
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_row_sparse_adamw_refuses_what_it_cannot_do():
    from mesimp.training.optim import RowSparseAdamW

    w = nn.Parameter(torch.zeros(2, 2))
    for kw in ({"capturable": True}, {"differentiable": True}):
        with pytest.raises(BadInputError, match="not supported"):
            RowSparseAdamW([w], **kw)
