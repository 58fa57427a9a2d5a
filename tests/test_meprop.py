"""meProp layer tests against independent references (plain autograd on a masked dy).

The expected selections are computed here from scratch (argsort, hand-written lists),
never with ``mesimp.meprop.select``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

DT = torch.float64
IN, OUT = 5, 6
SHAPES = [(), (4,), (3, 2)]  # leading dims: [in], [B, in], [B, T, in]


# --------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------
def _rows_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the k largest entries of each row of a 2-D score (argsort based)."""
    order = score.argsort(dim=1, descending=True)[:, :k]
    m = torch.zeros_like(score)
    for i in range(score.shape[0]):
        for j in order[i].tolist():
            m[i, j] = 1.0
    return m


def ref_mask(
    dy2: torch.Tensor,
    k: int,
    selection: str,
    seed: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The expected 0/1 selection mask for the 2-D output gradient ``dy2``."""
    if selection == "topk":
        score = dy2.abs().clone()
    elif selection == "unified":
        score = dy2.abs().sum(0, keepdim=True).expand_as(dy2).clone()
    else:
        # Documents the random baseline: one uniform per entry, keep the k largest.
        torch.manual_seed(seed)
        score = torch.rand(dy2.shape, dtype=dy2.dtype)
    if keep is not None:
        score[:, ~keep] = -float("inf")
    return _rows_mask(score, k)


def ref_grads(x, weight, bias, g_out, keep=None):
    """Plain autograd of ``F.linear`` (optionally output-masked) fed with ``g_out``."""
    xr = x.detach().clone().requires_grad_(True)
    wr = weight.detach().clone().requires_grad_(True)
    br = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = F.linear(xr, wr, br)
    if keep is not None:
        y = y * keep.to(y.dtype)
    y.backward(g_out)
    return xr.grad, wr.grad, None if br is None else br.grad


def dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def make_layer(bias=True, seed=0, **kw) -> MePropLinear:
    """A layer on the row-sparse path unless told otherwise (these tests check it; the
    dense default is checked against the same references with ``sparse_grad=False``)."""
    torch.manual_seed(seed)
    kw.setdefault("sparse_grad", True)
    return MePropLinear(IN, OUT, bias=bias, dtype=DT, **kw)


def run_layer(layer, x, dy, seed=None):
    xl = x.detach().clone().requires_grad_(True)
    y = layer(xl)
    if seed is not None:
        torch.manual_seed(seed)
    y.backward(dy)
    return y, xl.grad


def assert_grads(layer, gx, ref, exact_layout_sparse: bool):
    rx, rw, rb = ref
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad.is_sparse == exact_layout_sparse
    torch.testing.assert_close(dense(layer.weight.grad), rw, rtol=1e-12, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, rb, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# 1. gradients vs masked dense autograd
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("k", [1, 3, OUT - 1])
@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_grad_matches_masked_autograd(selection, k, lead, bias, sparse_grad):
    layer = make_layer(bias=bias, k=k, selection=selection, sparse_grad=sparse_grad)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(*lead, IN, dtype=DT, generator=g)
    dy = torch.randn(*lead, OUT, dtype=DT, generator=g)
    seed = 77
    y, gx = run_layer(layer, x, dy, seed=seed)

    # dense forward is untouched
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert y.shape == (*lead, OUT)

    dy2 = dy.reshape(-1, OUT)
    m = ref_mask(dy2, k, selection, seed=seed)
    assert torch.all(m.sum(1) == k)
    ref = ref_grads(x, layer.weight, layer.bias, (dy2 * m).reshape(dy.shape))
    assert_grads(layer, gx, ref, exact_layout_sparse=sparse_grad)

    # counters: hits are the column counts of the mask, ref the number of rows
    assert layer.hits.tolist() == m.sum(0).long().tolist()
    assert int(layer.ref) == dy2.shape[0]


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_sparse_weight_grad_holds_only_selected_rows(selection):
    k = 2
    layer = make_layer(k=k, selection=selection, sparse_grad=True)  # the opt-in fast path
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, IN, dtype=DT, generator=g)
    dy = torch.randn(4, OUT, dtype=DT, generator=g)
    seen = []  # the gradient as the backward returns it (AccumulateGrad drops the flag)
    layer.weight.register_hook(lambda grad: seen.append(grad))
    run_layer(layer, x, dy, seed=3)
    (gw,) = seen
    assert gw.is_sparse and gw.is_coalesced()
    assert layer.weight.grad.is_sparse
    rows = gw.indices()[0].tolist()
    expected = sorted(set(ref_mask(dy, k, selection, seed=3).nonzero()[:, 1].tolist()))
    assert rows == expected
    # the flag is_coalesced=True must be honest: coalescing again changes nothing
    c = torch.sparse_coo_tensor(
        gw.indices(), gw.values(), gw.shape, check_invariants=True
    ).coalesce()
    assert torch.equal(c.indices(), gw.indices())
    assert torch.equal(c.values(), gw.values())


@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_sparse_grads_accumulate_over_two_backwards(selection):
    layer = make_layer(k=2, selection=selection)
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, IN, dtype=DT, generator=g) for _ in range(2)]
    dys = [torch.randn(3, OUT, dtype=DT, generator=g) for _ in range(2)]
    exp_w = torch.zeros_like(layer.weight)
    exp_b = torch.zeros_like(layer.bias)
    for x, dy in zip(xs, dys, strict=True):
        run_layer(layer, x, dy)
        _, rw, rb = ref_grads(x, layer.weight, layer.bias, dy * ref_mask(dy, 2, selection))
        exp_w += rw
        exp_b += rb
    torch.testing.assert_close(dense(layer.weight.grad), exp_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, exp_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_input_without_grad_and_empty_batch(selection):
    layer = make_layer(k=2, selection=selection)
    x = torch.randn(3, IN, dtype=DT)  # no requires_grad: grad_x is not needed
    dy = torch.randn(3, OUT, dtype=DT)
    layer(x).backward(dy)
    assert layer.weight.grad is not None
    layer.zero_grad()
    empty = torch.zeros(0, IN, dtype=DT, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, OUT)
    out.sum().backward()
    assert empty.grad.shape == (0, IN)
    assert torch.count_nonzero(dense(layer.weight.grad)) == 0
    assert int(layer.ref) == 3


# --------------------------------------------------------------------------------------
# 2. identity with nn.Linear
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, OUT, OUT + 3, 1.0])
@pytest.mark.parametrize("lead", SHAPES)
def test_identity_with_linear(k, lead):
    torch.manual_seed(1)
    lin = nn.Linear(IN, OUT)
    torch.manual_seed(1)
    mp = MePropLinear(IN, OUT, k=k)
    assert torch.equal(lin.weight, mp.weight) and torch.equal(lin.bias, mp.bias)
    x = torch.randn(*lead, IN)
    dy = torch.randn(*lead, OUT)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = lin(x1), mp(x2)
    assert torch.equal(y1, y2)
    y1.backward(dy)
    y2.backward(dy)
    assert torch.equal(x1.grad, x2.grad)
    assert not mp.weight.grad.is_sparse
    assert torch.equal(lin.weight.grad, mp.weight.grad)
    assert torch.equal(lin.bias.grad, mp.bias.grad)


# --------------------------------------------------------------------------------------
# 3. drop-in for nn.Linear
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_drop_in_state_dict_and_init(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 4, bias=bias)
    torch.manual_seed(0)
    mp = MePropLinear(7, 4, bias=bias, k=2)
    assert list(mp.state_dict().keys()) == list(lin.state_dict().keys())
    for a, b in zip(lin.state_dict().values(), mp.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # loads both ways (strict)
    other = MePropLinear(7, 4, bias=bias, k=3)
    other.load_state_dict(lin.state_dict())
    assert torch.equal(other.weight, lin.weight)
    lin2 = nn.Linear(7, 4, bias=bias)
    lin2.load_state_dict(other.state_dict())
    assert torch.equal(lin2.weight, lin.weight)
    if bias:
        assert torch.equal(lin2.bias, lin.bias)
    # the same number of RNG draws: the next random number agrees too
    torch.manual_seed(0)
    nn.Linear(7, 4, bias=bias)
    a = torch.rand(1)
    torch.manual_seed(0)
    MePropLinear(7, 4, bias=bias, k=2)
    assert torch.equal(a, torch.rand(1))


# --------------------------------------------------------------------------------------
# 4. 1-D input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_one_d_input(selection):
    layer = make_layer(k=2, selection=selection)
    x = torch.randn(IN, dtype=DT, requires_grad=True)
    y = layer(x)
    assert y.shape == F.linear(x, layer.weight, layer.bias).shape == (OUT,)
    y.backward(torch.randn(OUT, dtype=DT))
    assert x.grad.shape == (IN,)
    assert int(layer.ref) == 1 and int(layer.hits.sum()) == 2


# --------------------------------------------------------------------------------------
# 5. counters on a hand-computed example
# --------------------------------------------------------------------------------------
HAND_DY = [
    [0.1, -0.9, 0.5, 0.2],  # top2 |.|: 1, 2
    [0.7, 0.0, -0.3, 0.8],  # top2 |.|: 3, 0
    [-0.6, 0.4, 0.05, -0.1],  # top2 |.|: 0, 1
]  # |.| column sums: 1.4, 1.3, 0.85, 1.1 -> unified picks 0, 1


@pytest.mark.parametrize(
    "selection, hits, bias_grad",
    [
        ("topk", [2, 2, 1, 1], [0.1, -0.5, 0.5, 0.8]),
        ("unified", [3, 3, 0, 0], [0.2, -0.5, 0.0, 0.0]),
    ],
)
def test_counters_hand_example(selection, hits, bias_grad):
    torch.manual_seed(0)
    layer = MePropLinear(2, 4, k=2, selection=selection, dtype=DT)
    dy = torch.tensor(HAND_DY, dtype=DT)
    x = torch.randn(3, 2, dtype=DT)
    layer(x).backward(dy)
    assert layer.hits.tolist() == hits
    assert int(layer.ref) == 3
    torch.testing.assert_close(layer.bias.grad, torch.tensor(bias_grad, dtype=DT))
    layer(x).backward(dy)
    assert layer.hits.tolist() == [2 * h for h in hits]
    assert int(layer.ref) == 6
    layer.reset_counters()
    assert layer.hits.tolist() == [0, 0, 0, 0]
    assert int(layer.ref) == 0
    # counting=False: gradients still sparse, counters untouched
    layer.counting = False
    layer.zero_grad()
    layer(x).backward(dy)
    assert layer.hits.tolist() == [0, 0, 0, 0] and int(layer.ref) == 0
    torch.testing.assert_close(layer.bias.grad, torch.tensor(bias_grad, dtype=DT))


# --------------------------------------------------------------------------------------
# 6. masks
# --------------------------------------------------------------------------------------
KEEP = torch.tensor([True, False, True, False, True, True])  # active width 4


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_mask_never_selected(selection, k):
    layer = make_layer(k=k, selection=selection)
    layer.apply_mask(KEEP)
    assert layer.active_width == 4
    assert layer.k == min(k, 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, IN, dtype=DT, generator=g, requires_grad=True)
    y = layer(x)
    assert torch.all(y[:, ~KEEP] == 0)
    torch.testing.assert_close(y[:, KEEP], F.linear(x, layer.weight, layer.bias)[:, KEEP])
    # zero gradient on every active neuron, large on the masked ones
    dy = torch.zeros(5, OUT, dtype=DT)
    dy[:, ~KEEP] = 100.0 + torch.rand(5, 2, dtype=DT, generator=g)
    y.backward(dy)
    assert layer.hits[~KEEP].tolist() == [0, 0]
    assert int(layer.hits.sum()) == 5 * layer.k
    gw = dense(layer.weight.grad)
    assert torch.all(gw[~KEEP] == 0)
    assert torch.all(gw == 0)  # only zero-gradient active neurons were propagated
    assert torch.all(layer.bias.grad == 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_masked_grads_match_reference(selection):
    k = 2
    layer = make_layer(k=k, selection=selection)
    layer.apply_mask(KEEP)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, IN, dtype=DT, generator=g)
    dy = torch.randn(3, OUT, dtype=DT, generator=g)
    _, gx = run_layer(layer, x, dy, seed=11)
    m = ref_mask(dy, k, selection, seed=11, keep=KEEP)
    assert torch.all(m[:, ~KEEP] == 0)
    ref = ref_grads(x, layer.weight, layer.bias, dy * m, keep=KEEP)
    assert_grads(layer, gx, ref, exact_layout_sparse=True)


def test_mask_is_sticky_and_k_fraction_scales():
    layer = make_layer(k=0.5)
    assert layer.k == 3  # ceil(0.5 * 6)
    layer.apply_mask(KEEP)
    assert layer.k == 2  # 0.5 * 4
    layer.apply_mask(torch.ones(OUT, dtype=torch.bool))  # a masked neuron never comes back
    assert layer.active_width == 4
    layer.apply_mask(torch.tensor([True, True, True, True, False, True]))
    assert layer.active_width == 3
    assert layer.k == 2  # ceil(1.5)
    assert make_layer(k=0.6).k == 4  # ceil(3.6)
    assert make_layer(k=0.01).k == 1  # at least one


def test_masked_k0_forward_is_masked_linear():
    layer = make_layer(k=0)
    layer.apply_mask(KEEP)
    x = torch.randn(3, IN, dtype=DT, requires_grad=True)
    y = layer(x)
    expected = F.linear(x, layer.weight, layer.bias) * KEEP
    assert torch.equal(y, expected)
    dy = torch.randn(3, OUT, dtype=DT)
    y.backward(dy)
    ref = ref_grads(x, layer.weight, layer.bias, dy, keep=KEEP)
    assert_grads(layer, x.grad, ref, exact_layout_sparse=False)


# --------------------------------------------------------------------------------------
# 7. config validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"k": -1},
        {"k": 0.0},
        {"k": 1.5},
        {"k": -0.1},
        {"k": float("nan")},
        {"k": True},
        {"k": False},
        {"k": "3"},
        {"k": None},
        {"k": 2, "selection": "top-k"},
        {"k": 2, "selection": "TOPK"},
        {"k": 2, "msbp_alpha": -0.1},
        {"k": 2, "msbp_alpha": 1.01},
        {"k": 2, "msbp_alpha": float("nan")},
    ],
)
def test_config_validation(kw):
    with pytest.raises(BadInputError):
        MePropConfig(**kw)
    with pytest.raises(BadInputError):
        MePropLinear(3, 4, **kw)


def test_config_accepts_edges_and_roundtrips():
    assert MePropConfig(k=1.0).resolve_k(7) == 7
    assert MePropConfig(k=0).resolve_k(7) == 0
    assert MePropConfig(k=10).resolve_k(7) == 7
    assert MePropConfig(k=3).resolve_k(0) == 0
    c = MePropConfig(k=2.0)  # an integral float > 1 is a count, not a fraction
    assert c.k == 2 and isinstance(c.k, int)
    MePropConfig(k=2, msbp_alpha=0.0)
    MePropConfig(k=2, msbp_alpha=1.0)
    c = MePropConfig(k=0.25, selection="unified", msbp_alpha=0.5, sparse_grad=False)
    assert MePropConfig.from_dict({**c.to_dict(), "junk": 1}) == c


# --------------------------------------------------------------------------------------
# 8. MSBP
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_msbp_matches_reference(selection, alpha):
    k = 2
    layer = make_layer(k=k, selection=selection, msbp_alpha=alpha)
    g = torch.Generator().manual_seed(8)
    memory = None
    for _ in range(3):
        x = torch.randn(3, 2, IN, dtype=DT, generator=g)
        dy = torch.randn(3, 2, OUT, dtype=DT, generator=g)
        layer.zero_grad(set_to_none=True)
        _, gx = run_layer(layer, x, dy)
        u = dy.reshape(-1, OUT) + (0 if memory is None else memory)
        m = ref_mask(u, k, selection)
        s = u * m
        memory = alpha * (u - s)
        ref = ref_grads(x, layer.weight, layer.bias, s.reshape(dy.shape))
        assert_grads(layer, gx, ref, exact_layout_sparse=True)


@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_msbp_dropped_on_shape_change_and_reset(selection):
    k = 2
    layer = make_layer(k=k, selection=selection, msbp_alpha=0.9)
    g = torch.Generator().manual_seed(1)
    run_layer(
        layer,
        torch.randn(3, IN, dtype=DT, generator=g),
        100 * torch.randn(3, OUT, dtype=DT, generator=g),
    )
    for rows, reset in [(4, False), (4, True)]:
        x = torch.randn(rows, IN, dtype=DT, generator=g)
        dy = torch.randn(rows, OUT, dtype=DT, generator=g)
        if reset:
            layer.reset_memory()
        layer.zero_grad(set_to_none=True)
        _, gx = run_layer(layer, x, dy)
        ref = ref_grads(x, layer.weight, layer.bias, dy * ref_mask(dy, k, selection))
        assert_grads(layer, gx, ref, exact_layout_sparse=True)
        # leave a big memory behind for the reset case
        run_layer(layer, x, 100 * dy)


def test_msbp_off_keeps_no_memory_effect():
    layer = make_layer(k=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, IN, dtype=DT, generator=g)
    run_layer(layer, x, 100 * torch.randn(3, OUT, dtype=DT, generator=g))
    dy = torch.randn(3, OUT, dtype=DT, generator=g)
    layer.zero_grad(set_to_none=True)
    _, gx = run_layer(layer, x, dy)
    assert_grads(
        layer,
        gx,
        ref_grads(x, layer.weight, layer.bias, dy * ref_mask(dy, 2, "topk")),
        exact_layout_sparse=True,
    )


# --------------------------------------------------------------------------------------
# 9. meprop_
# --------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_meprop_swaps_hidden_layers_only():
    model = _mlp()
    params = list(model.parameters())
    keys = list(model.state_dict().keys())
    cfg = MePropConfig(k=2)
    assert meprop_(model, cfg) is model
    assert type(model[0]) is MePropLinear and type(model[2]) is MePropLinear
    assert type(model[4]) is nn.Linear
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert len(params) == len(list(model.parameters()))
    assert list(model.state_dict().keys()) == keys
    assert model[0].k == 2 and model[0].meprop_config.k == 2
    # idempotent: a second call changes nothing
    first = model[0]
    meprop_(model, cfg)
    assert model[0] is first and type(model[4]) is nn.Linear
    # the swapped model trains: counters move, output layer has a dense grad
    model(torch.randn(5, 4)).sum().backward()
    assert int(model[0].ref) == 5 and int(model[2].ref) == 5
    # the default is an ordinary dense gradient (zero outside the selected rows)
    assert not model[0].weight.grad.is_sparse and not model[4].weight.grad.is_sparse


def test_meprop_skip_output_false_and_filter():
    model = _mlp()
    meprop_(model, MePropConfig(k=2), skip_output=False)
    assert all(type(model[i]) is MePropLinear for i in (0, 2, 4))

    model = _mlp()
    seen = []

    def only_first(name, mod):
        seen.append(name)
        return name == "0"

    meprop_(model, MePropConfig(k=2), filter_fn=only_first)
    assert type(model[0]) is MePropLinear
    assert type(model[2]) is nn.Linear and type(model[4]) is nn.Linear
    assert "4" not in seen  # the output layer is skipped before the filter


def test_meprop_nested_and_training_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2))
    model.eval()
    out_before = model(torch.ones(2, 3))
    meprop_(model, MePropConfig(k=1))
    assert type(model[0][0]) is MePropLinear and not model[0][0].training
    assert torch.equal(model(torch.ones(2, 3)), out_before)


# --------------------------------------------------------------------------------------
# 10. no counting without autograd
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_no_counting_under_no_grad(ctx):
    layer = make_layer(k=2)
    layer.eval()
    x = torch.randn(4, IN, dtype=DT)
    with ctx():
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    assert int(layer.ref) == 0 and int(layer.hits.sum()) == 0
    layer.train()
    with ctx():
        layer(x)
    assert int(layer.ref) == 0 and int(layer.hits.sum()) == 0


def test_eval_forward_does_not_count():
    layer = make_layer(k=2).eval()
    layer(torch.randn(4, IN, dtype=DT, requires_grad=True))
    assert int(layer.ref) == 0 and int(layer.hits.sum()) == 0


def test_msbp_memory_dropped_by_apply_mask():
    k = 2
    layer = make_layer(k=k, msbp_alpha=1.0)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, IN, dtype=DT, generator=g)
    run_layer(layer, x, 100 * torch.randn(3, OUT, dtype=DT, generator=g))
    layer.apply_mask(KEEP)
    dy = torch.randn(3, OUT, dtype=DT, generator=g)
    layer.zero_grad(set_to_none=True)
    _, gx = run_layer(layer, x, dy)
    ref = ref_grads(x, layer.weight, layer.bias, dy * ref_mask(dy, k, "topk", keep=KEEP), KEEP)
    assert_grads(layer, gx, ref, exact_layout_sparse=True)


def test_moving_a_layer_keeps_its_msbp_memory_and_counting_switch():
    """``.to()``/``.double()`` rebuild the backward's view of the counters; the MSBP memory
    and a Simplifier's "not counting now" must survive it (a resumed run moves the model
    to its device after restoring both)."""
    layer = MePropLinear(6, 8, k=2, selection="topk", msbp_alpha=0.5)
    layer(torch.randn(4, 6)).sum().backward()
    memory = layer._state.memory.clone()
    layer.counting = False
    layer.to("cpu")
    assert layer.counting is False and torch.equal(layer._state.memory, memory)
    layer.double()
    assert layer._state.memory.dtype == torch.float64
    assert torch.equal(layer._state.memory, memory.double())
    hits = layer.hits.clone()
    layer(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    assert torch.equal(layer.hits, hits)  # still not counting
