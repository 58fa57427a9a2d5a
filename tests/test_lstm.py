"""MePropLSTM tests against nn.LSTM and an independent masked-dense reference.

The reference re-implements the LSTM step loop with plain autograd and a hook on each
step's gate pre-activation that keeps the gradient only on the units it selects itself
(argsort of the per-unit sum of |grad| over the four gates); it never calls
``mesimp.meprop.select`` or ``mesimp.lstm``. With MSBP the same hook first adds the
previous backward's memory (zero-padded or cropped to this batch's [T, B]), selects on
the sum, and records the unselected remainder times alpha as the next memory.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.lstm import MePropLSTM, prune_lstm_hidden, prune_lstm_input
from mesimp.nn.meprop import MePropConfig
from mesimp.simplify.checkpoint_shrink import prune_linear_in

DT = torch.float64
IN, H, B, T = 4, 6, 3, 5
NAMES = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]


def _distinct_params(m: nn.Module, seed: int = 0) -> None:
    """Random weights with no exact ties anywhere (so top-k selections are unique)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.6)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------
# independent reference
# --------------------------------------------------------------------------------------
def _unit_keep(grad: torch.Tensor, k: int, selection: str, keep: torch.Tensor | None):
    """0/1 [B, h] mask of the selected units, from the gradient at one step's gates."""
    b, h = grad.shape[0], grad.shape[1] // 4
    score = grad.reshape(b, 4, h).abs().sum(1)
    if selection == "unified":
        score = score.sum(0, keepdim=True).expand(b, h).clone()
    if keep is not None:
        score[:, ~keep] = -float("inf")
    out = torch.zeros(b, h, dtype=grad.dtype)
    order = score.argsort(dim=1, descending=True)[:, :k]
    for i in range(b):
        for j in order[i].tolist():
            out[i, j] = 1.0
    return out


def _mask_units(grad, k, selection, keep):
    b, h = grad.shape[0], grad.shape[1] // 4
    sel = _unit_keep(grad, k, selection, keep)  # [B, h]
    return (grad.reshape(b, 4, h) * sel.unsqueeze(1)).reshape(b, 4 * h)


class RefMsbp:
    """The reference's MSBP state for one backward: ``old`` memory [T', B', 4h] (or
    None) in, ``new`` memory by step out (filled by the hooks, in backward order)."""

    def __init__(self, alpha: float, old: torch.Tensor | None) -> None:
        self.alpha = alpha
        self.old = old
        self.new: dict[int, torch.Tensor] = {}

    def memory(self) -> torch.Tensor:
        return torch.stack([self.new[t] for t in range(len(self.new))])


def _msbp_units(grad, t, k, selection, keep, msbp):
    """Hook with MSBP: u = grad + memory[t] (memory padded with zeros or cropped to this
    batch; masked units' memory ignored), keep u on the units selected from u, and
    remember alpha * (u - kept)."""
    b, h4 = grad.shape
    mem = torch.zeros(b, h4, dtype=grad.dtype)
    if msbp.old is not None and t < msbp.old.shape[0]:
        old = msbp.old[t]
        for i in range(min(b, old.shape[0])):
            mem[i] = old[i]
    if keep is not None:
        mem = mem * keep.to(grad.dtype).tile(4)
    u = grad + mem
    sel = _unit_keep(u, k, selection, keep).tile(1, 4)  # column gate*h + j <- unit j
    msbp.new[t] = msbp.alpha * (u - u * sel)
    return u * sel


def ref_forward(params, x_tbi, k=0, selection="topk", keep=None, h0=None, c0=None, msbp=None):
    """Plain LSTM loop on [T, B, in]; with k > 0 each step's gate grad is unit-masked
    (after adding the MSBP memory when ``msbp`` is a ``RefMsbp``)."""
    w_ih, w_hh, b_ih, b_hh = params
    tb, bb = x_tbi.shape[0], x_tbi.shape[1]
    h_size = w_hh.shape[1]
    m = None if keep is None else keep.to(x_tbi.dtype)
    h = x_tbi.new_zeros(bb, h_size) if h0 is None else h0
    c = x_tbi.new_zeros(bb, h_size) if c0 is None else c0
    if m is not None:
        h, c = h * m, c * m
    outs = []
    for t in range(tb):
        gates = x_tbi[t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
        if k and msbp is not None:
            gates.register_hook(
                partial(_msbp_units, t=t, k=k, selection=selection, keep=keep, msbp=msbp)
            )
        elif k:
            gates.register_hook(lambda g: _mask_units(g, k, selection, keep))
        i, f, gg, o = (gates[:, j * h_size : (j + 1) * h_size] for j in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        if m is not None:
            c = c * m
        h = torch.sigmoid(o) * torch.tanh(c)
        if m is not None:
            h = h * m
        outs.append(h)
    return torch.stack(outs, 0), h, c


def _layer_and_ref_grads(layer, x_bti, g_out, k, selection, keep=None):
    """Grads of (params, x) from the layer and from the reference, same upstream g_out."""
    xl = _leaf(x_bti)
    out, _ = layer(xl)
    out.backward(g_out)
    got = [getattr(layer, n).grad.clone() for n in NAMES] + [xl.grad]

    params = [_leaf(getattr(layer, n)) for n in NAMES]
    xr = _leaf(x_bti)
    out_r, _, _ = ref_forward(params, xr.transpose(0, 1), k, selection, keep)
    out_r.transpose(0, 1).backward(g_out)
    want = [p.grad for p in params] + [xr.grad]
    return out, out_r.transpose(0, 1), got, want


# --------------------------------------------------------------------------------------
# k = 0 is nn.LSTM
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("k", [0, H])
def test_dense_matches_nn_lstm(batch_first, with_state, k):
    torch.manual_seed(0)
    ours = MePropLSTM(IN, H, batch_first=batch_first, k=k, dtype=DT)
    torch.manual_seed(0)
    theirs = nn.LSTM(IN, H, batch_first=batch_first, dtype=DT)
    for n in NAMES:  # same seed, same init rule and order
        assert torch.equal(getattr(ours, n), getattr(theirs, n))
    shape = (B, T, IN) if batch_first else (T, B, IN)
    x = torch.randn(shape, dtype=DT)
    hx = (torch.randn(1, B, H, dtype=DT), torch.randn(1, B, H, dtype=DT)) if with_state else None

    x1, x2 = _leaf(x), _leaf(x)
    hx1 = tuple(_leaf(t) for t in hx) if hx else None
    hx2 = tuple(_leaf(t) for t in hx) if hx else None
    o1, (h1, c1) = ours(x1, hx1)
    o2, (h2, c2) = theirs(x2, hx2)
    for a, b in [(o1, o2), (h1, h2), (c1, c2)]:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    g = torch.randn_like(o1)
    (o1 * g).sum().add(h1.sum() + c1.pow(2).sum()).backward()
    (o2 * g).sum().add(h2.sum() + c2.pow(2).sum()).backward()
    for n in NAMES:
        torch.testing.assert_close(
            getattr(ours, n).grad, getattr(theirs, n).grad, rtol=0, atol=1e-12
        )
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)
    if hx:
        for a, b in zip(hx1, hx2, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    assert int(ours.ref) == 0  # the dense path does not count


def test_float32_matches_nn_lstm_and_unbatched():
    torch.manual_seed(1)
    ours = MePropLSTM(IN, H)
    theirs = nn.LSTM(IN, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(B, 7, IN)
    o1, (h1, c1) = ours(x)
    o2, (h2, c2) = theirs(x)
    assert (o1 - o2).abs().max() <= 1e-6
    assert (c1 - c2).abs().max() <= 1e-6
    u1, (uh1, _) = ours(x[0])
    u2, (uh2, _) = theirs(x[0])
    assert u1.shape == u2.shape and uh1.shape == uh2.shape
    assert (u1 - u2).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------
# meProp gradient vs the independent reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["topk", "unified"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sparse_grads_match_reference(selection, k):
    layer = MePropLSTM(IN, H, k=k, selection=selection, dtype=DT)
    _distinct_params(layer, seed=k)
    g = torch.Generator().manual_seed(10 + k)
    x = torch.randn(B, T, IN, generator=g, dtype=DT)
    g_out = torch.randn(B, T, H, generator=g, dtype=DT)
    out, out_r, got, want = _layer_and_ref_grads(layer, x, g_out, k, selection)
    torch.testing.assert_close(out, out_r, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and it really is sparse: not the dense gradient
    dense = MePropLSTM(IN, H, k=0, dtype=DT)
    dense.load_state_dict(layer.state_dict())
    dense(_leaf(x))[0].backward(g_out)
    assert not torch.allclose(dense.weight_hh_l0.grad, got[1])
    assert int(layer.hits.sum()) == B * k * T  # per example per step, both selections
    assert int(layer.ref) == B * T


@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_sparse_grads_with_mask_match_reference(selection):
    k = 2
    layer = MePropLSTM(IN, H, k=k, selection=selection, dtype=DT)
    _distinct_params(layer, seed=5)
    keep = torch.tensor([True, False, True, True, False, True])
    layer.apply_mask(keep)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, IN, generator=g, dtype=DT)
    g_out = torch.randn(B, T, H, generator=g, dtype=DT)
    out, out_r, got, want = _layer_and_ref_grads(layer, x, g_out, k, selection, keep)
    torch.testing.assert_close(out, out_r, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert layer.hits[~keep].sum() == 0


def test_random_selection_counts_and_respects_mask():
    layer = MePropLSTM(IN, H, k=2, selection="random", dtype=DT)
    keep = torch.tensor([True, True, False, True, True, False])
    layer.apply_mask(keep)
    x = _leaf(torch.randn(B, T, IN, dtype=DT))
    layer(x)[0].sum().backward()
    assert int(layer.hits.sum()) == B * T * 2
    assert int(layer.ref) == B * T
    assert layer.hits[~keep].sum() == 0
    # per example and step, dg lives on at most k units: masked units get no W rows
    rows = torch.cat([torch.arange(4) * H + j for j in (2, 5)])
    assert layer.weight_ih_l0.grad[rows].abs().sum() == 0


def test_fraction_k_uses_active_width():
    layer = MePropLSTM(IN, 8, config=MePropConfig(k=0.5))
    assert layer.k == 4
    layer.apply_mask(torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool))
    assert layer.k == 2 and layer.active_width == 4


# --------------------------------------------------------------------------------------
# counters, by hand
# --------------------------------------------------------------------------------------
def _zero_lstm(selection, b):
    """h=3, all weights zero: i=f=o=0.5, g=0, c=h=0 at every step.

    Backward: dc_t = 0.5*dh_t + 0.5*dc_{t+1} and the only nonzero gate gradient is
    dg_g = 0.5*dc_t, so a unit's score is 0.5*|dc_t|.
    """
    layer = MePropLSTM(2, 3, k=1, selection=selection, dtype=DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    x = _leaf(torch.randn(b, 2, 2, dtype=DT))
    out, _ = layer(x)
    return layer, out


def test_counters_by_hand_topk():
    layer, out = _zero_lstm("topk", 1)
    # step 2: dh_2 = e_2 -> dc_2 = [0, 0, .5] -> unit 2.
    # step 1: dh_1 = 3 e_1 (W_hh = 0), dc_1 = [0, 1.5, .25] -> unit 1 (unit 2 dropped).
    (3 * out[0, 0, 1] + out[0, 1, 2]).backward()
    assert layer.hits.tolist() == [0, 1, 1]
    assert int(layer.ref) == 2
    want = torch.zeros(12, dtype=DT)
    want[2 * 3 + 2] = 0.5 * 0.5  # g gate of unit 2 at step 2
    want[2 * 3 + 1] = 0.5 * 1.5  # g gate of unit 1 at step 1; unit 2's 0.125 is cut
    torch.testing.assert_close(layer.bias_ih_l0.grad, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.bias_hh_l0.grad, want, rtol=0, atol=1e-15)


def test_counters_by_hand_unified():
    layer, out = _zero_lstm("unified", 2)
    (3 * out[0, 0, 1] + out[0, 1, 2] + 2 * out[1, 1, 0]).backward()
    # step 2: dc_2 = ex0 [0, 0, .5], ex1 [1, 0, 0]; batch scores .5*[1, 0, .5] -> unit 0.
    # step 1: dc_1 = ex0 [0, 1.5, .25], ex1 [.5, 0, 0]; scores .5*[.5, 1.5, .25] -> unit 1.
    assert layer.hits.tolist() == [2, 2, 0]  # +B per selected unit
    assert int(layer.ref) == 4
    want = torch.zeros(12, dtype=DT)
    want[2 * 3 + 0] = 0.5 * 1.0  # unit 0, step 2 (example 1)
    want[2 * 3 + 1] = 0.5 * 1.5  # unit 1, step 1 (example 0); unit 2's parts are cut
    torch.testing.assert_close(layer.bias_ih_l0.grad, want, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------
# masks and shrinking
# --------------------------------------------------------------------------------------
def test_masked_units_output_zero_and_never_selected():
    layer = MePropLSTM(IN, H, k=H, dtype=DT)  # k capped to the active width
    keep = torch.tensor([True, False, True, False, True, True])
    layer.apply_mask(keep)
    assert layer.k == 4
    x = _leaf(torch.randn(B, T, IN, dtype=DT))
    hx = (torch.randn(1, B, H, dtype=DT), torch.randn(1, B, H, dtype=DT))
    out, (h_n, c_n) = layer(x, hx)
    assert torch.all(out[..., ~keep] == 0)
    assert torch.all(h_n[..., ~keep] == 0) and torch.all(c_n[..., ~keep] == 0)
    assert torch.all(out[..., keep] != 0)
    out.pow(2).sum().backward()
    assert layer.hits[~keep].sum() == 0
    assert layer.hits[keep].tolist() == [B * T] * 4
    masked_rows = torch.cat([torch.arange(4) * H + j for j in (1, 3)])
    assert layer.weight_hh_l0.grad[masked_rows].abs().sum() == 0
    # masks only shrink; the state round-trips
    layer.apply_mask(torch.ones(H, dtype=torch.bool))
    assert layer.active_width == 4
    st = layer.meprop_state()
    other = MePropLSTM(IN, H, k=2, dtype=DT)
    other.load_meprop_state(st)
    assert other.active_width == 4 and torch.equal(other.hits, layer.hits)
    assert set(layer.state_dict()) == set(NAMES)


@pytest.mark.parametrize("batch_first", [True, False])
def test_masked_equals_shrunk(batch_first):
    torch.manual_seed(2)
    hs = 8
    lstm = MePropLSTM(5, hs, batch_first=batch_first, k=3)
    head = nn.Linear(hs, 4)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    lstm.apply_mask(keep)
    keep_idx = keep.nonzero().squeeze(1)
    small = prune_lstm_hidden(lstm, keep_idx)
    small_head = prune_linear_in(head, keep_idx)
    assert type(small) is nn.LSTM and small.hidden_size == 5
    assert small.batch_first == batch_first
    # pruning the plain nn.LSTM with the same weights gives the same module
    plain = lstm.to_lstm()
    assert type(plain) is nn.LSTM
    same = prune_lstm_hidden(plain, keep_idx)
    for n in NAMES:
        assert torch.equal(getattr(small, n), getattr(same, n))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        shape = (3, 9, 5) if batch_first else (9, 3, 5)
        x = torch.randn(shape, generator=g) * 2
        y_big = head(lstm(x)[0])
        y_small = small_head(small(x)[0])
        assert (y_big - y_small).abs().max() <= 1e-5


def test_state_dict_round_trip_with_nn_lstm():
    torch.manual_seed(4)
    ours = MePropLSTM(IN, H, k=2)
    theirs = nn.LSTM(IN, H, batch_first=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(B, T, IN)
    assert (ours(x)[0] - theirs(x)[0]).abs().max() <= 1e-6
    back = MePropLSTM(IN, H)
    back.load_state_dict(theirs.state_dict())
    for n in NAMES:
        assert torch.equal(getattr(back, n), getattr(ours, n))
    conv = MePropLSTM.from_lstm(theirs, MePropConfig(k=3))
    assert conv.k == 3 and torch.equal(conv.weight_hh_l0, theirs.weight_hh_l0)


# --------------------------------------------------------------------------------------
# unsupported options and bad inputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [{"num_layers": 2}, {"bidirectional": True}, {"proj_size": 2}, {"bias": False}],
)
def test_unsupported_options_raise(kw):
    with pytest.raises(BadInputError, match="not supported"):
        MePropLSTM(IN, H, **kw)
    lstm = nn.LSTM(IN, H, **kw)
    with pytest.raises(BadInputError, match="not supported"):
        prune_lstm_hidden(lstm, torch.tensor([0, 1]))
    with pytest.raises(BadInputError, match="not supported"):
        prune_lstm_input(lstm, torch.tensor([0, 1]))
    if "num_layers" in kw:  # the message says why and what to do instead
        with pytest.raises(BadInputError, match="own kept width.*stack single-layer"):
            MePropLSTM(IN, H, **kw)


def test_bad_inputs_raise():
    layer = MePropLSTM(IN, H)
    with pytest.raises(BadInputError):
        layer(torch.randn(B, T, IN + 1))
    with pytest.raises(BadInputError):
        layer(torch.randn(B, T, IN), (torch.zeros(B, H), torch.zeros(B, H)))
    with pytest.raises(BadInputError):
        prune_lstm_hidden(layer, torch.tensor([0, 0]))
    with pytest.raises(BadInputError):
        prune_lstm_hidden(layer, torch.tensor([], dtype=torch.long))
    with pytest.raises(BadInputError):
        MePropLSTM(IN, H, k=-1)


def test_simplify_prunes_lstm_units_but_never_the_output_layer():
    """meSimp on Embedding -> MePropLSTM -> Linear: the rule masks LSTM units from their
    hand-set counts; the output Linear is untouched; widths are reported per layer."""
    from mesimp.simplify.rule import active_widths, prunable_layers, simplify_step

    torch.manual_seed(0)
    lstm = MePropLSTM(4, 6, batch_first=True, k=2)
    model = nn.Sequential(nn.Embedding(10, 4), lstm)
    head = nn.Linear(6, 3)
    model.add_module("head", head)
    assert [n for n, _ in prunable_layers(model)] == ["1"]
    lstm.hits.copy_(torch.tensor([0, 9, 1, 10, 4, 5]))
    lstm.ref.fill_(50)
    widths = simplify_step(model, prune_rate=0.1, min_width=1)  # threshold floor(5.0) = 5
    assert widths == [3] and lstm.mask.tolist() == [False, True, False, True, False, True]
    assert int(lstm.ref) == 0 and int(lstm.hits.sum()) == 0
    assert active_widths(model) == [3]
    assert head.weight.shape == (3, 6)


# --------------------------------------------------------------------------------------
# the whole-sequence BPTT Function and the fused dense path, more cases vs the reference
# --------------------------------------------------------------------------------------
def _grads_with_state(layer, x, hx, g_out, g_h, g_c, k, selection, keep, msbp=None):
    """Grads of (params, x, h0, c0) from the layer and the reference; loss also uses
    h_n and c_n. ``x`` is in the layer's layout, ``hx`` as (h0, c0) of [1, B, H]."""
    xl = _leaf(x)
    h0, c0 = (_leaf(t) for t in hx)
    out, (h_n, c_n) = layer(xl, (h0, c0))
    ((out * g_out).sum() + (h_n * g_h).sum() + (c_n * g_c).sum()).backward()
    got = [getattr(layer, n).grad.clone() for n in NAMES] + [xl.grad, h0.grad, c0.grad]

    params = [_leaf(getattr(layer, n)) for n in NAMES]
    xr = _leaf(x)
    h0r, c0r = (_leaf(t) for t in hx)
    x_tbi = xr.transpose(0, 1) if layer.batch_first else xr
    out_r, h_r, c_r = ref_forward(params, x_tbi, k, selection, keep, h0r[0], c0r[0], msbp)
    out_r = out_r.transpose(0, 1) if layer.batch_first else out_r
    ((out_r * g_out).sum() + (h_r * g_h[0]).sum() + (c_r * g_c[0]).sum()).backward()
    want = [p.grad for p in params] + [xr.grad, h0r.grad, c0r.grad]
    for a, b in [(out, out_r), (h_n[0], h_r), (c_n[0], c_r)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return got


def _case(batch_first, seed, b=B, steps=T):
    g = torch.Generator().manual_seed(seed)
    shape = (b, steps, IN) if batch_first else (steps, b, IN)
    x = torch.randn(shape, generator=g, dtype=DT)
    hx = tuple(torch.randn(1, b, H, generator=g, dtype=DT) for _ in range(2))
    g_out = torch.randn(shape[:2] + (H,), generator=g, dtype=DT)
    g_h, g_c = (torch.randn(1, b, H, generator=g, dtype=DT) for _ in range(2))
    return x, hx, g_out, g_h, g_c


@pytest.mark.parametrize("selection", ["topk", "unified"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sparse_with_state_and_layout_match_reference(selection, batch_first, with_mask):
    k = 2
    layer = MePropLSTM(IN, H, batch_first=batch_first, k=k, selection=selection, dtype=DT)
    _distinct_params(layer, seed=7)
    keep = torch.tensor([True, True, False, True, False, True]) if with_mask else None
    if keep is not None:
        layer.apply_mask(keep)
    x, hx, g_out, g_h, g_c = _case(batch_first, seed=11)
    got = _grads_with_state(layer, x, hx, g_out, g_h, g_c, k, selection, keep)
    assert int(layer.hits.sum()) == B * k * T and int(layer.ref) == B * T
    if keep is not None:
        assert layer.hits[~keep].sum() == 0
        assert torch.all(got[-2][..., ~keep] == 0) and torch.all(got[-1][..., ~keep] == 0)
    assert got[0].data_ptr() != got[1].data_ptr()
    assert layer.bias_ih_l0.grad.data_ptr() != layer.bias_hh_l0.grad.data_ptr()


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_k_at_least_active_with_mask_is_masked_dense(selection):
    """k >= active width with a mask: every active unit is selected, so the gradient is
    the masked dense one (the manual BPTT without selection), and every unit counts."""
    keep = torch.tensor([True, False, True, True, False, True])
    layer = MePropLSTM(IN, H, batch_first=False, k=H, selection=selection, dtype=DT)
    _distinct_params(layer, seed=8)
    layer.apply_mask(keep)
    x, hx, g_out, g_h, g_c = _case(False, seed=12)
    _grads_with_state(layer, x, hx, g_out, g_h, g_c, 0, selection, keep)
    assert layer.hits[keep].tolist() == [B * T] * 4 and layer.hits[~keep].sum() == 0
    assert int(layer.ref) == B * T


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_masked_path_matches_reference(batch_first):
    """k = 0 with a mask runs the fused kernel with the masked units' gate rows zeroed;
    outputs and gradients (nonzero h0, c0 included) equal the multiplicative mask."""
    keep = torch.tensor([False, True, True, False, True, True])
    layer = MePropLSTM(IN, H, batch_first=batch_first, k=0, dtype=DT)
    _distinct_params(layer, seed=9)
    layer.apply_mask(keep)
    x, hx, g_out, g_h, g_c = _case(batch_first, seed=13)
    got = _grads_with_state(layer, x, hx, g_out, g_h, g_c, 0, "topk", keep)
    assert int(layer.ref) == 0  # the dense path does not count
    masked_rows = torch.cat([torch.arange(4) * H + j for j in (0, 3)])
    for grad in got[:4]:
        assert grad[masked_rows].abs().sum() == 0


def test_eval_path_is_fused_and_exactly_masked():
    """No grad (evaluation): the fused path, even with k > 0; masked units are exactly 0
    in float32 and the rest agrees with the masked reference."""
    torch.manual_seed(5)
    keep = torch.tensor([True, False, True, True, False, True])
    layer = MePropLSTM(IN, H, k=2)
    layer.apply_mask(keep)
    x = torch.randn(B, T, IN)
    hx = (torch.randn(1, B, H), torch.randn(1, B, H))
    with torch.no_grad():
        out, (h_n, c_n) = layer(x, hx)
        ref, h_r, c_r = ref_forward(
            [getattr(layer, n) for n in NAMES],
            x.transpose(0, 1),
            0,
            keep=keep,
            h0=hx[0][0],
            c0=hx[1][0],
        )
    assert torch.all(out[..., ~keep] == 0) and torch.all(c_n[..., ~keep] == 0)
    assert (out - ref.transpose(0, 1)).abs().max() <= 1e-6
    assert (h_n[0] - h_r).abs().max() <= 1e-6 and (c_n[0] - c_r).abs().max() <= 1e-6
    assert int(layer.ref) == 0


def test_sparse_partial_requires_grad():
    """Frozen parameters (only x needs grad), and x as data (only parameters do)."""
    k, sel = 2, "unified"
    layer = MePropLSTM(IN, H, k=k, selection=sel, dtype=DT)
    _distinct_params(layer, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, IN, generator=g, dtype=DT)
    g_out = torch.randn(B, T, H, generator=g, dtype=DT)
    params = [_leaf(getattr(layer, n)) for n in NAMES]
    xr = _leaf(x)
    ref_forward(params, xr.transpose(0, 1), k, sel)[0].transpose(0, 1).backward(g_out)
    for p in layer.parameters():
        p.requires_grad_(False)
    xl = _leaf(x)
    layer(xl)[0].backward(g_out)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for p in layer.parameters():
        p.requires_grad_(True)
    layer(x)[0].backward(g_out)
    for n, p in zip(NAMES, params, strict=True):
        torch.testing.assert_close(getattr(layer, n).grad, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_sparse_unbatched_equals_batch_of_one(selection):
    layer = MePropLSTM(IN, H, k=2, selection=selection, dtype=DT)
    _distinct_params(layer, seed=6)
    x = torch.randn(T, IN, dtype=DT)
    x1, x2 = _leaf(x), _leaf(x.unsqueeze(0))
    o1, (h1, c1) = layer(x1)
    assert o1.shape == (T, H) and h1.shape == (1, H) and c1.shape == (1, H)
    (o1.sum() + c1.sum()).backward()
    g1 = [getattr(layer, n).grad.clone() for n in NAMES]
    layer.zero_grad()
    o2, (_, c2) = layer(x2)
    (o2.sum() + c2.sum()).backward()
    torch.testing.assert_close(o1, o2[0], rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad[0], rtol=0, atol=1e-14)
    for a, n in zip(g1, NAMES, strict=True):
        torch.testing.assert_close(a, getattr(layer, n).grad, rtol=0, atol=1e-14)


def test_empty_sequence():
    layer = MePropLSTM(IN, H, k=2)
    out, (h_n, c_n) = layer(torch.randn(B, 0, IN, requires_grad=True))
    assert out.shape == (B, 0, H) and h_n.shape == (1, B, H) and c_n.shape == (1, B, H)


# --------------------------------------------------------------------------------------
# stacking: prune_lstm_input for the next layer
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (DT, 1e-10)])
def test_two_layer_stack_masked_equals_pruned(dtype, tol):
    torch.manual_seed(3)
    h1, h2 = 8, 7
    l1 = MePropLSTM(5, h1, k=3, selection="unified", dtype=dtype)
    l2 = MePropLSTM(h1, h2, k=2, dtype=dtype)
    keep1 = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    keep2 = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    l1.apply_mask(keep1)
    l2.apply_mask(keep2)
    idx1, idx2 = keep1.nonzero().squeeze(1), keep2.nonzero().squeeze(1)
    p1 = prune_lstm_hidden(l1, idx1)
    p2 = prune_lstm_input(prune_lstm_hidden(l2, idx2), idx1)
    assert type(p1) is nn.LSTM and type(p2) is nn.LSTM
    assert (p2.input_size, p2.hidden_size) == (5, 5)
    for p, (i, h) in [(p1, (5, 5)), (p2, (5, 5))]:
        plain = nn.LSTM(i, h, batch_first=True, dtype=dtype)
        plain.load_state_dict(p.state_dict())
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(3, 9, 5, generator=g) * 2).to(dtype)
        for grad in (False, True):  # the fused eval path and the meProp training path
            with torch.set_grad_enabled(grad):
                big = l2(l1(x)[0])[0][..., idx2]
                small = p2(p1(x)[0])[0]
            assert (big - small).abs().max() <= tol


def test_prune_lstm_input_keeps_meprop_state_and_validates():
    torch.manual_seed(0)
    lstm = MePropLSTM(6, H, k=2, selection="unified", dtype=DT)
    lstm.apply_mask(torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool))
    lstm.hits.copy_(torch.arange(H))
    lstm.ref.fill_(9)
    lstm.counting = False
    lstm.eval()
    keep = torch.tensor([0, 2, 5])
    new = prune_lstm_input(lstm, keep)
    assert type(new) is MePropLSTM and new.input_size == 3 and new.hidden_size == H
    assert new.meprop_config == lstm.meprop_config and new.k == lstm.k
    assert torch.equal(new.mask, lstm.mask) and torch.equal(new.hits, lstm.hits)
    assert int(new.ref) == 9 and not new.counting and not new.training
    assert torch.equal(new.weight_ih_l0, lstm.weight_ih_l0[:, keep])
    assert torch.equal(new.weight_hh_l0, lstm.weight_hh_l0)
    x = torch.randn(B, T, 6, dtype=DT)
    x[..., [1, 3, 4]] = 0  # the dropped inputs carry nothing: same output
    with torch.no_grad():
        torch.testing.assert_close(new(x[..., keep])[0], lstm(x)[0], rtol=0, atol=1e-12)
    plain = prune_lstm_input(lstm.to_lstm(), torch.tensor([True, False] * 3))
    assert type(plain) is nn.LSTM and plain.input_size == 3
    bads = [[0, 0], [], [6], [-1], [0.0, 1.0], [True, False]]  # dup, empty, range, dtype, len
    for bad in bads:
        with pytest.raises(BadInputError):
            prune_lstm_input(lstm, torch.tensor(bad, dtype=torch.long if bad == [] else None))
    with pytest.raises(BadInputError):
        prune_lstm_input(nn.Linear(3, 3), [0])


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_float32_grads_match_reference(monkeypatch, onednn, selection):
    """float32 through the fast GEMMs (oneDNN where available) and through torch's own,
    against the float64 reference on the same weights."""
    import mesimp.nn.lstm as mlstm

    monkeypatch.setattr(mlstm, "_USE_ONEDNN", onednn)
    k, hs, b, steps = 3, 16, 4, 7
    layer = MePropLSTM(5, hs, k=k, selection=selection)
    _distinct_params(layer, seed=21)
    layer.apply_mask(torch.arange(hs) % 5 != 2)
    keep = layer.mask.clone()
    g = torch.Generator().manual_seed(22)
    x = torch.randn(b, steps, 5, generator=g)
    g_out = torch.randn(b, steps, hs, generator=g)
    xl = _leaf(x)
    out, _ = layer(xl)
    out.backward(g_out)
    got = [getattr(layer, n).grad for n in NAMES] + [xl.grad]
    params = [_leaf(getattr(layer, n).double()) for n in NAMES]
    xr = _leaf(x.double())
    out_r, _, _ = ref_forward(params, xr.transpose(0, 1), k, selection, keep)
    out_r.transpose(0, 1).backward(g_out.double())
    want = [p.grad for p in params] + [xr.grad]
    assert (out.double() - out_r.transpose(0, 1)).abs().max() <= 1e-5
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-5)


def test_empty_batch():
    layer = MePropLSTM(IN, H, k=2)
    x = torch.randn(0, T, IN, requires_grad=True)
    out, (h_n, _) = layer(x)
    out.sum().backward()
    assert out.shape == (0, T, H) and h_n.shape == (1, 0, H)


# --------------------------------------------------------------------------------------
# MSBP: error feedback on the gate gradient, against the reference's own memory
# --------------------------------------------------------------------------------------
ALPHA = 0.5
# (B, T) of consecutive batches: then fewer rows and more steps, then more rows and
# fewer steps, so the memory is used on its (step, row) overlap both ways
MSBP_SHAPES = [(3, 5), (2, 7), (4, 3)]


def _msbp_layer(selection, with_mask, k=2, alpha=ALPHA, seed=31):
    layer = MePropLSTM(
        IN, H, dtype=DT, config=MePropConfig(k=k, selection=selection, msbp_alpha=alpha)
    )
    _distinct_params(layer, seed=seed)
    keep = torch.tensor([True, True, False, True, False, True]) if with_mask else None
    if keep is not None:
        layer.apply_mask(keep)
    return layer, keep


@pytest.mark.parametrize("selection", ["topk", "unified"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_msbp_consecutive_backwards_match_reference(selection, with_mask, batch_first):
    k = 2
    layer, keep = _msbp_layer(selection, with_mask, k)
    layer.batch_first = batch_first
    plain, _ = _msbp_layer(selection, with_mask, k, alpha=0.0)
    plain.load_state_dict(layer.state_dict())
    plain.batch_first = batch_first
    old = None
    for n, (b, steps) in enumerate(MSBP_SHAPES):
        case = _case(batch_first, seed=40 + n, b=b, steps=steps)
        layer.zero_grad(set_to_none=True)
        ref = RefMsbp(ALPHA, old)
        got = _grads_with_state(layer, *case, k, selection, keep, msbp=ref)
        old = ref.memory()
        mem = layer._state.memory
        assert mem.shape == (steps, b, 4 * H)
        torch.testing.assert_close(mem, old, rtol=1e-10, atol=1e-12)
        per_unit = mem.view(steps, b, 4, H).abs().sum(2)  # [T, B, h]
        assert torch.all((per_unit == 0).sum(-1) >= k)  # the selected units hold nothing
        if keep is not None:
            assert torch.all(per_unit[..., ~keep] == 0)
            assert layer.hits[~keep].sum() == 0
        # with a memory it is not plain meProp (which the reference also checks)
        plain.zero_grad(set_to_none=True)
        want_plain = _grads_with_state(plain, *case, k, selection, keep)
        assert plain._state.memory is None
        if n:
            assert not torch.allclose(got[1], want_plain[1])
        else:  # no memory yet: the first backward is plain meProp
            for a, w in zip(got, want_plain, strict=True):
                torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_msbp_alpha_zero_is_plain_meprop_exactly(selection):
    """alpha = 0 (given explicitly) is the old code path: bit-equal gradients, no memory."""
    layers = []
    for cfg in (MePropConfig(k=2, selection=selection, msbp_alpha=0.0), None):
        layer = MePropLSTM(IN, H, k=2, selection=selection, dtype=DT, config=cfg)
        _distinct_params(layer, seed=32)
        layers.append(layer)
    grads = []
    for layer in layers:
        torch.manual_seed(0)  # the same random draws
        run = []
        for n, (b, steps) in enumerate(MSBP_SHAPES[:2]):
            x, _, g_out, _, _ = _case(True, seed=50 + n, b=b, steps=steps)
            layer.zero_grad(set_to_none=True)
            xl = _leaf(x)
            layer(xl)[0].backward(g_out)
            run.append([getattr(layer, m).grad.clone() for m in NAMES] + [xl.grad])
            assert layer._state.memory is None
        grads.append(run)
    for a_run, b_run in zip(*grads, strict=True):
        for a, b in zip(a_run, b_run, strict=True):
            assert torch.equal(a, b)


def test_msbp_reset_memory_and_apply_mask_clear_it():
    layer, _ = _msbp_layer("unified", False)
    fresh, _ = _msbp_layer("unified", False, alpha=0.0)
    fresh.load_state_dict(layer.state_dict())
    x, hx, g_out, g_h, g_c = _case(True, seed=60)
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        _grads_with_state(layer, x, hx, g_out, g_h, g_c, 2, "unified", None, RefMsbp(ALPHA, None))
        assert layer._state.memory is not None and layer._state.memory.abs().sum() > 0
        layer.reset_memory()  # so the second pass is a first pass again
        assert layer._state.memory is None
    after_reset = layer.weight_hh_l0.grad.clone()
    _grads_with_state(fresh, x, hx, g_out, g_h, g_c, 2, "unified", None)
    assert torch.equal(after_reset, fresh.weight_hh_l0.grad)
    layer(_leaf(x))[0].backward(g_out)
    assert layer._state.memory is not None
    layer.apply_mask(torch.tensor([True, True, True, True, True, False]))
    assert layer._state.memory is None
    assert set(layer.state_dict()) == set(NAMES)  # the memory is not part of the weights


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_msbp_every_active_unit_selected_uses_and_empties_the_memory(selection):
    """k >= active width (mask): a given memory is added on the active units only (the
    masked units' part is ignored), everything is propagated, and nothing is left."""
    layer, keep = _msbp_layer(selection, True, k=H)
    g = torch.Generator().manual_seed(61)
    old = torch.randn(T + 1, B - 1, 4 * H, generator=g, dtype=DT)  # overlap: B-1 rows, T steps
    layer._state.memory = old.clone()
    case = _case(False, seed=62)
    layer.batch_first = False
    ref = RefMsbp(ALPHA, old)
    _grads_with_state(layer, *case, 4, "topk", keep, msbp=ref)  # 4 = every active unit
    assert layer._state.memory is None
    assert ref.memory().abs().max() == 0
    assert layer.hits[keep].tolist() == [B * T] * 4


def test_msbp_ignored_by_the_dense_paths_and_carried_by_conversions():
    from mesimp.nn.swap import meprop_

    cfg = MePropConfig(k=2, selection="unified", msbp_alpha=0.8)
    model = nn.Sequential(nn.LSTM(IN, H, batch_first=True, dtype=DT))
    meprop_(model, cfg)
    lstm = model[0]
    assert isinstance(lstm, MePropLSTM) and lstm.meprop_config.msbp_alpha == 0.8
    assert "msbp_alpha=0.8" in repr(lstm)
    conv = MePropLSTM.from_lstm(nn.LSTM(IN, H, batch_first=True, dtype=DT), cfg)
    assert conv.meprop_config.msbp_alpha == 0.8
    x = torch.randn(B, T, IN, dtype=DT)
    with torch.no_grad():  # evaluation: the fused path, no memory
        lstm(x)
    assert lstm._state.memory is None
    lstm(_leaf(x))[0].sum().backward()
    assert lstm._state.memory.shape == (T, B, 4 * H)
    # a stacked layer losing input features keeps its memory (its hidden units stay)
    pruned = prune_lstm_input(lstm, torch.tensor([0, 2, 3]))
    assert pruned.meprop_config.msbp_alpha == 0.8
    assert torch.equal(pruned._state.memory, lstm._state.memory)
    dense = MePropLSTM(IN, H, dtype=DT, config=MePropConfig(k=0, msbp_alpha=0.8))
    dense(_leaf(x))[0].sum().backward()  # k = 0: nn.LSTM's kernel, no memory
    assert dense._state.memory is None
