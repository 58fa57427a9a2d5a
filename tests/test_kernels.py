"""The compiled meProp kernels (mesimp/csrc/kernels.cpp) against the Python path.

The Python path (``MESIMP_KERNELS=python``) is the reference; it is itself tested against
plain autograd on the masked gradient in test_meprop.py, and test_meprop.py / test_optim.py
run on both paths (conftest.py's ``kernel_path``). Stated tolerances:

* unified selection: the same gradient bits (same selected set, same ATen GEMMs on the
  same gathered operands); per-example top-k and random-k: the same selected sets and
  counters (random: the same draws from the default generator, in the same order),
  gradients within float32 rounding (the kernel sums the b*k selected entries in its
  own order);
* optimizer steps (compiled Adam / Adagrad / SGD) and parameters after N steps: within
  float32 rounding of torch's optimizers, whose kernels fuse multiply-adds where the CPU
  has FMA; the compiled ones never do, so their bits are the same on every CPU;
* ``train_step``: the same bits as the fused backward + ``step`` (so the trainer may
  take either path at any step and a resumed run stays bit-identical).

Ties are not compared: the inputs are continuous random numbers. In the MLP tests ties
can only be between exact zeros (dead ReLU units), where the choice changes no gradient,
memory or parameter, only which zero-valued unit is counted, so there the total count
is compared, not its split.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mesimp.training.loop as loop_module
from mesimp.errors import BadInputError
from mesimp.models import MLP, MLPConfig
from mesimp.nn import kernels
from mesimp.nn.fused import fused_forward, is_fused_node, train_step
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mesimp._C is not built")

RTOL, ATOL = 1e-5, 1e-6  # float32 rounding of sums taken in another order


@pytest.fixture
def path():
    """Run a function under a kernel mode; restore the previous mode afterwards."""
    before = kernels.mode()

    def run(mode, fn, *args, **kwargs):
        kernels.set_kernels(mode)
        try:
            return fn(*args, **kwargs)
        finally:
            kernels.set_kernels(before)

    return run


def _same(a, b, exact: bool, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a = a.to_dense() if a.is_sparse else a
    b = b.to_dense() if b.is_sparse else b
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=what)


def _layer_run(layer: MePropLinear, mask: torch.Tensor | None, steps: int = 3):
    """Three backward passes of one layer on fixed random data; what they leave."""
    layer = copy.deepcopy(layer)
    if mask is not None:
        layer.apply_mask(mask)
    torch.manual_seed(7)  # random selection draws from the default generator
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        x = torch.randn(9, layer.in_features, generator=g, requires_grad=True)
        dy = torch.randn(9, layer.out_features, generator=g)
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
        out.append((x.grad, layer.weight.grad, layer.bias.grad))
    return out, layer.hits.clone(), layer.ref.clone(), layer._state.memory


@pytest.mark.parametrize("selection", ["unified", "topk", "random"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dense_bias", [False, True])
def test_layer_backward_matches_python(path, selection, alpha, masked, sparse_grad, dense_bias):
    torch.manual_seed(0)
    cfg = MePropConfig(
        k=5, selection=selection, msbp_alpha=alpha, sparse_grad=sparse_grad, dense_bias=dense_bias
    )
    layer = MePropLinear(12, 16, config=cfg)
    mask = torch.ones(16, dtype=torch.bool)
    mask[[2, 7, 11]] = False
    ref = path("python", _layer_run, layer, mask if masked else None)
    got = path("cpp", _layer_run, layer, mask if masked else None)
    exact = selection == "unified"
    for (rx, rw, rb), (gx, gw, gb) in zip(ref[0], got[0], strict=True):
        _same(rx, gx, exact, "dx")
        _same(rw, gw, exact, "dW")
        _same(rb, gb, exact, "db")
        assert rw.is_sparse == gw.is_sparse
    assert torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2])  # hits, ref
    _same(ref[3], got[3], exact, "MSBP memory")
    if masked:
        assert int(got[1][~mask].sum()) == 0  # a masked unit is never selected


def test_layer_counts_the_selected_units(path):
    """Independent of the Python path: unified hits are exactly the k largest column sums
    of |dy|, each counted once per example; per-example the k largest |dy| of each row;
    random the k largest of each row of ``torch.rand(dy.shape)`` drawn at the backward."""
    torch.manual_seed(1)
    x, dy = torch.randn(6, 8), torch.randn(6, 10)
    for selection in ("unified", "topk", "random"):
        layer = MePropLinear(8, 10, k=3, selection=selection)
        out = layer(x.requires_grad_())
        torch.manual_seed(5)
        path("cpp", lambda out=out: out.backward(dy))
        if selection == "unified":
            want = torch.zeros(10, dtype=torch.long)
            want[dy.abs().sum(0).topk(3).indices] = 6
        else:
            score = dy.abs()
            if selection == "random":
                torch.manual_seed(5)
                score = torch.rand(dy.shape)
            want = torch.bincount(score.topk(3, dim=1).indices.reshape(-1), minlength=10)
        assert torch.equal(layer.hits, want), selection
        assert int(layer.ref) == 6


def _topk_reference(dy: torch.Tensor, k: int) -> torch.Tensor:
    """The per-example selection rule, written out: per row the k largest |dy| (NaN as
    +inf), ties to the lower index. A bool [N, n] mask."""
    key = dy.abs().double().nan_to_num(nan=float("inf")).tolist()
    sel = torch.zeros(dy.shape, dtype=torch.bool)
    for i, row in enumerate(key):
        for j in sorted(range(len(row)), key=lambda j, row=row: (-row[j], j))[:k]:
            sel[i, j] = True
    return sel


# (in, out, k): the row sums' column chunks of 64 and 8 and the single-column tail; the
# selection's ranking of 2k block maxima (2k <= 96), its nth_element bound (2k > 96), and
# the no-bound case (4k > out: every unit a candidate)
_WIDE = [(150, 83, 7), (77, 200, 40), (70, 220, 50), (20, 30, 9)]


@pytest.mark.parametrize(("d", "n", "k"), _WIDE)
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_backward_against_float64(path, d, n, k, sparse_grad, ties):
    """Per-example top-k on wider layers than the other tests, against float64 autograd
    on the explicitly masked gradient: the selected set (ties: the lower index; rows with
    fewer than k nonzeros), the counters, dx, dW (row-sparse or dense with zero rows) and
    db. Independent of the Python path (whose torch.topk leaves ties unspecified)."""
    g = torch.Generator().manual_seed(d + n + k)
    x = torch.randn(6, d, generator=g)
    dy = torch.randn(6, n, generator=g)
    if ties:  # few distinct magnitudes, and a row with only 3 nonzeros
        dy = torch.randint(-2, 3, (6, n), generator=g).float()
        dy[1] = 0.0
        dy[1, [5, 9, 17]] = torch.tensor([1.0, -3.0, 2.0])
    cfg = MePropConfig(k=k, selection="topk", sparse_grad=sparse_grad)
    layer = MePropLinear(d, n, config=cfg)
    xr = x.clone().requires_grad_()
    path("cpp", lambda: layer(xr).backward(dy))
    sel = _topk_reference(dy, k)
    assert torch.equal(layer.hits, sel.sum(0)) and int(layer.ref) == 6
    x64 = x.double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    torch.nn.functional.linear(x64, w64, b64).backward(dy.double() * sel)
    assert layer.weight.grad.is_sparse == sparse_grad
    for got, want in (
        (xr.grad, x64.grad),
        (layer.weight.grad, w64.grad),
        (layer.bias.grad, b64.grad),
    ):
        got = got.to_dense() if got.is_sparse else got
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)


def test_topk_selection_counts_nan_as_largest(path):
    """NaN ranks above every number (as in torch.topk): the row's NaNs (every 5th unit
    from 1) are selected before its 2.0s, the lowest indices first."""
    dy = torch.tensor([[0.5, float("nan"), -2.0, 1.0, 0.1] * 20])
    layer = MePropLinear(4, 100, k=3, selection="topk")
    path("cpp", lambda: layer(torch.randn(1, 4, requires_grad=True)).backward(dy))
    assert torch.equal(layer.hits, _topk_reference(dy, 3).sum(0))
    assert layer.hits.nonzero().flatten().tolist() == [1, 6, 11]


def _mlp_run(selection, alpha, masked, optimizer, one_call, steps=4, sparse=True):
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=20, hidden_sizes=[30, 25], out_features=5))
    meprop_(model, MePropConfig(k=6, selection=selection, msbp_alpha=alpha, sparse_grad=sparse))
    if masked:
        keep = torch.ones(30, dtype=torch.bool)
        keep[[1, 4, 7]] = False
        model[0].apply_mask(keep)
    opt = build_optimizer(optimizer, model.parameters(), 1e-2, sparse_update=sparse)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 20, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        if one_call:
            train_step(model, x, y, opt)
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    state = [t for p in model.parameters() for t in opt.state[p].values()]
    return model, state


@pytest.mark.parametrize("selection", ["unified", "topk", "random"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("one_call", [False, True])
def test_mlp_adam_matches_python(path, selection, alpha, masked, one_call):
    """The fused one-node backward + compiled lazy Adam, and train_step, after 4 steps:
    parameters, Adam's moments and steps, counters and MSBP memories."""
    ref, ref_state = path("python", _mlp_run, selection, alpha, masked, "adam", False)
    got, got_state = path("cpp", _mlp_run, selection, alpha, masked, "adam", one_call)
    exact = selection == "unified"
    for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
        _same(a.detach(), b.detach(), False, name)
    for i, (a, b) in enumerate(zip(ref_state, got_state, strict=True)):
        _same(a, b, False, f"optimizer state {i}")
    for i in (0, 2):
        assert int(ref[i].ref) == int(got[i].ref) == 4 * 8
        assert int(ref[i].hits.sum()) == int(got[i].hits.sum())
        if exact:
            assert torch.equal(ref[i].hits, got[i].hits)
        _same(ref[i]._state.memory, got[i]._state.memory, False, "memory")


def _mlp_grads(selection, alpha, masked, steps=3):
    """Gradients, counters and memories of a few fused (or, on the Python path, per-layer)
    backward passes through loss.backward(), no optimizer step."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=20, hidden_sizes=[30, 25], out_features=5))
    meprop_(model, MePropConfig(k=6, selection=selection, msbp_alpha=alpha))
    if masked:
        keep = torch.ones(30, dtype=torch.bool)
        keep[[1, 4, 7]] = False
        model[0].apply_mask(keep)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 20, generator=g, requires_grad=True)
        y = torch.randint(0, 5, (8,), generator=g)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        out.append([x.grad] + [p.grad for p in model.parameters()])
        # the fused backward repoints the memory tensor itself (Tensor.set_): copy it
        mems = [model[i]._state.memory for i in (0, 2)]
        out[-1] += [m.clone() if m is not None else None for m in mems]
        out[-1] += [model[i].hits.clone() for i in (0, 2)]
    return is_fused_node(logits.grad_fn), out


@pytest.mark.parametrize("selection", ["unified", "topk", "random"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_backward_matches_python(path, selection, alpha, masked):
    """The one-node C++ backward against the per-layer Python path, three steps (so MSBP
    memories carry over): dx, every parameter's gradient (the same bits for unified),
    memories and counters."""
    fused_py, ref = path("python", _mlp_grads, selection, alpha, masked)
    fused_cpp, got = path("cpp", _mlp_grads, selection, alpha, masked)
    assert fused_cpp and not fused_py
    for a, b in zip(ref, got, strict=True):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            if u is not None and u.dtype == torch.long:
                assert torch.equal(u, v), i
            elif alpha == 0 and i in (7, 8):
                assert u is None and v is None  # no MSBP: no memory
            else:
                _same(u, v, selection == "unified", f"item {i}")


def test_msbp_memory_survives_a_reset_between_steps(path):
    """The fused backward repoints the layer's memory tensor; reset_memory() in between
    (what apply_mask does) starts a fresh one, as on the Python path."""

    def run():
        torch.manual_seed(0)
        model = meprop_(
            MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3)),
            MePropConfig(k=2, msbp_alpha=0.5),
        )
        x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
        mems = []
        for step in range(3):
            if step == 1:
                model[0].reset_memory()
            F.cross_entropy(model(x), y).backward()
            mems.append(model[0]._state.memory.clone())
        return mems, model[0].weight.grad

    ref = path("python", run)
    got = path("cpp", run)
    for a, b in zip(ref[0], got[0], strict=True):
        assert torch.equal(a, b)
    # three sparse gradients summed by autograd: in another order on each path
    _same(ref[1], got[1], False, "accumulated grad")


def test_train_step_cross_entropy(path):
    """train_step's loss is F.cross_entropy's; a target out of range is an error that
    changes nothing."""
    torch.manual_seed(0)
    model = _small()
    opt = build_optimizer("adam", model.parameters(), 1e-2)
    x, y = torch.randn(5, 6), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        want = F.cross_entropy(model(x), y)
    got = path("cpp", train_step, model, x, y, opt)
    assert torch.equal(got, want)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IndexError, match="out of bounds"):  # as F.cross_entropy
        path("cpp", train_step, model, x, torch.tensor([0, 3, 1, 1, 0]), opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("selection", ["unified", "topk", "random"])
@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
def test_train_step_is_the_fused_backward_bit_for_bit(path, selection, optimizer):
    """train_step and the one-node backward + the optimizer's compiled step give the same
    bits, so a run may switch between them (the trainer falls back per step) and stay
    bit-identical."""
    a, sa = path("cpp", _mlp_run, selection, 0.5, True, optimizer, False)
    b, sb = path("cpp", _mlp_run, selection, 0.5, True, optimizer, True)
    for x, y in zip([*a.parameters(), *sa], [*b.parameters(), *sb], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a[0].hits, b[0].hits) and torch.equal(a[2].hits, b[2].hits)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
@pytest.mark.parametrize("sparse", [False, True])
def test_mlp_other_optimizers_match_python(path, optimizer, sparse):
    """Adagrad and SGD, compiled (RowSparseAdagrad/RowSparseSGD, in train_step or after
    the fused backward), against torch's own steps on the Python path: within float32
    rounding, since torch's kernels fuse multiply-adds where the CPU has FMA (so torch's
    own bits vary by CPU) and the compiled step never does (the same bits on every CPU)."""
    ref, ref_state = path("python", _mlp_run, "unified", 0.0, True, optimizer, False, sparse=sparse)
    for one_call in (False, True):
        got, got_state = path(
            "cpp", _mlp_run, "unified", 0.0, True, optimizer, one_call, sparse=sparse
        )
        for a, b in zip(ref.parameters(), got.parameters(), strict=True):
            _same(a.detach(), b.detach(), False, "param")
        for a, b in zip(ref_state, got_state, strict=True):
            _same(a, b, False, "state")
        assert torch.equal(ref[0].hits, got[0].hits)


def _small() -> MLP:
    return meprop_(
        MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3)), MePropConfig(k=2)
    )


def test_fused_path_is_one_node_and_falls_back(path):
    torch.manual_seed(0)
    model = meprop_(
        MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3)), MePropConfig(k=2)
    )
    x = torch.randn(4, 6)
    assert is_fused_node(path("cpp", model, x).grad_fn)
    assert path("python", fused_forward, model, x) is None  # kernels off
    assert path("cpp", fused_forward, model, x.double()) is None  # float64: Python path
    with torch.no_grad():
        assert path("cpp", fused_forward, model, x) is None
    rnd = meprop_(
        MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3)), MePropConfig(k=2)
    )
    for m in rnd.modules():
        if isinstance(m, MePropLinear):
            m.meprop_config.selection = "random"
    assert is_fused_node(path("cpp", fused_forward, rnd, x).grad_fn)  # random: fused too
    for m in rnd.modules():
        if isinstance(m, MePropLinear):
            m.meprop_config.selection, m.meprop_config.heap_select = "topk", True
    assert path("cpp", fused_forward, rnd, x) is None  # the reference's heap: Python path
    dense = MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3))
    assert path("cpp", fused_forward, dense, x) is None  # nothing to sparsify


def test_reference_heap_selection_stays_on_the_python_path(path):
    """The C# heap (``--reference``) counts zero-gradient fills: the kernels' top-k does not,
    so a heap layer must never take them (a regression: the fused MLP once did)."""

    def run():
        torch.manual_seed(0)
        model = meprop_(
            MLP(MLPConfig(in_features=20, hidden_sizes=[12, 12], out_features=3)),
            MePropConfig(k=10, selection="topk", heap_select=True, dense_bias=True),
        )
        x = torch.randn(7, 20).relu()  # ReLU zeros leave rows with fewer than k nonzeros
        out = model(x)
        F.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1, 2, 0]), reduction="sum").backward()
        layers = [m for m in model.modules() if isinstance(m, MePropLinear)]
        return out.grad_fn, [m.hits.clone() for m in layers], [p.grad for p in model.parameters()]

    fn, hits_cpp, grads_cpp = path("cpp", run)
    assert not is_fused_node(fn)
    _, hits_py, grads_py = path("python", run)
    assert all(torch.equal(a, b) for a, b in zip(hits_cpp, hits_py, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_cpp, grads_py, strict=True))


def test_train_step_refuses_a_nonfinite_loss(path):
    """A NaN loss leaves the parameters and Adam's state untouched (the trainer then
    stops, naming the step)."""
    torch.manual_seed(0)
    model = meprop_(
        MLP(MLPConfig(in_features=6, hidden_sizes=[8], out_features=3)), MePropConfig(k=2)
    )
    opt = build_optimizer("adam", model.parameters(), 1e-2)
    before = copy.deepcopy(model.state_dict())
    x = torch.full((4, 6), float("nan"))
    loss = path("cpp", train_step, model, x, torch.zeros(4, dtype=torch.long), opt)
    assert torch.isnan(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(int(opt.state[p]["step"]) == 0 for p in model.parameters())


def test_a_stale_build_counts_as_not_built(monkeypatch):
    """An extension built from older sources (another kAbiVersion) is not used: it would
    not know the newer selection codes. ``auto`` runs the Python path, ``cpp`` says why."""
    before = kernels.mode()
    monkeypatch.setattr(kernels, "ABI", kernels.ABI + 1)
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setenv("MESIMP_BUILD_KERNELS", "0")  # no first-use build of the "new" ABI
    try:
        assert not kernels.available()
        with pytest.raises(BadInputError, match="other sources"):
            kernels.set_kernels("cpp")
    finally:
        monkeypatch.undo()
        kernels.set_kernels(before)
    assert kernels.available() and torch.ops.mesimp.abi_version() == kernels.ABI


def test_mode_choice():
    before = kernels.mode()
    try:
        with pytest.raises(BadInputError):
            kernels.set_kernels("fast")
        kernels.set_kernels("python")
        assert kernels.kernel_name() == "python" and not kernels.usable(torch.zeros(1))
        kernels.set_kernels("cpp")
        assert kernels.kernel_name() == "cpp" and kernels.usable(torch.zeros(1))
        assert not kernels.usable(torch.zeros(1, dtype=torch.float64))
    finally:
        kernels.set_kernels(before)


def test_train_json_reports_the_path(tiny_npz, tmp_path, path):
    from conftest import train_tiny

    s = path("cpp", train_tiny, tiny_npz, tmp_path / "a.pt", k=8, selection="unified")
    assert (s["kernel"], s["step_path"]) == ("cpp", "train_step")
    s = path("python", train_tiny, tiny_npz, tmp_path / "b.pt", k=8, selection="unified")
    assert (s["kernel"], s["step_path"]) == ("python", "python")


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_trainer_guards_on_the_compiled_step(tiny_npz, tmp_path, path, kind):
    """A NaN loss or (checked) gradient inside the compiled step stops the run before
    its update, with the loop's message; the NaN comes from a weight (loss) or from the
    MSBP memory (gradient only)."""
    from conftest import train_tiny

    from mesimp.training.runsafety import TrainingDiverged

    real = loop_module.fused_train_step
    calls = [0]

    def poisoned(model, x, y, optimizer, check_grads=False):
        calls[0] += 1
        if calls[0] == 3:
            if kind == "loss":
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            else:  # a NaN MSBP memory: a finite loss, a NaN gradient of the first layer
                model[0]._state.memory.fill_(float("nan"))
                check_grads = True
        return real(model, x, y, optimizer, check_grads)

    loop_module.fused_train_step = poisoned
    try:
        with pytest.raises(TrainingDiverged) as e:
            path("cpp", train_tiny, tiny_npz, tmp_path / "m.pt", k=8, selection="unified", msbp=0.5)
    finally:
        loop_module.fused_train_step = real
    want = "loss is nan" if kind == "loss" else "the gradient of 0.weight holds NaN/Inf"
    assert f"{want} at epoch 1 step 3" in str(e.value)


@pytest.mark.parametrize("selection", ["unified", "topk", "random"])
def test_threads_change_no_bit(path, selection):
    """The kernels split their loops (selections, weighted row sums, gathers, optimizer
    spans) and run a layer's two GEMMs side by side across threads: every element is
    still computed by the same code in the same order, so 1 and 2 threads give the same
    bits. The shapes are large enough for every loop to split (its grain is met)."""
    from mesimp.training.optim import RowSparseAdamW

    def run(threads: int):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            layer = MePropLinear(256, 1024, config=MePropConfig(k=32, selection=selection))
            opt = RowSparseAdamW(layer.parameters(), lr=1e-2)
            g = torch.Generator().manual_seed(1)
            outs = []
            for _ in range(2):
                x = torch.randn(64, 256, generator=g, requires_grad=True)
                opt.zero_grad()
                layer(x).backward(torch.randn(64, 1024, generator=g))
                outs += [x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
                opt.step()
            return outs + [layer.weight.detach(), layer.hits.clone()]
        finally:
            torch.set_num_threads(before)

    one = path("cpp", run, 1)
    two = path("cpp", run, 2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
