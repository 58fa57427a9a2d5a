"""The pure-Python meProp path on every device: the core checks with ``device="cuda"``.

The compiled kernels are CPU-only; on a GPU every meProp layer, the gradient buffers and
the lazy optimizers run their Python path, which must compute there what it computes on
the CPU. Each test runs on ``cpu`` and, where a GPU exists, ``cuda`` (skipped otherwise),
against the same independent references as the CPU-only tests (plain autograd on the
masked gradient, a hand-written lazy AdamW), computed on the CPU in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_conv import ref_keep, reference
from test_lstm import IN as LSTM_IN
from test_lstm import NAMES, _distinct_params, _layer_and_ref_grads
from test_meprop import ref_grads, ref_mask
from test_optim import LazyAdamWRef, _adamw_case
from torch import nn

from mesimp.nn import grad_buffer, kernels
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import RowSparseAdamW

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
DT = torch.float64


@pytest.fixture(params=DEVICES)
def device(request):
    """The device, with the Python path (what a GPU runs) on the CPU too."""
    before = kernels.mode()
    kernels.set_kernels("python")
    yield torch.device(request.param)
    kernels.set_kernels(before)


@pytest.mark.parametrize("selection", ["topk", "unified"])
@pytest.mark.parametrize("sparse_grad", [True, False])
def test_linear_grads_are_autograd_on_the_masked_gradient(device, selection, sparse_grad):
    torch.manual_seed(0)
    layer = MePropLinear(5, 7, dtype=DT, k=3, selection=selection, sparse_grad=sparse_grad)
    layer = layer.to(device)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(4, 5, generator=g, dtype=DT), torch.randn(4, 7, generator=g, dtype=DT)
    xl = x.to(device).requires_grad_()
    layer(xl).backward(dy.to(device))
    m = ref_mask(dy, 3, selection)
    rx, rw, rb = ref_grads(x, layer.weight.cpu(), layer.bias.cpu(), dy * m)
    gw = layer.weight.grad
    torch.testing.assert_close(xl.grad.cpu(), rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((gw.to_dense() if gw.is_sparse else gw).cpu(), rw)
    torch.testing.assert_close(layer.bias.grad.cpu(), rb)
    assert layer.hits.device.type == device.type
    assert layer.hits.cpu().tolist() == m.sum(0).long().tolist()


def test_gradient_buffers_on_the_device(device):
    """A stock AdamW loop over a drop-in model: the buffered gradients are the fresh ones,
    and the buffer (on the device) is reused step after step."""

    def run(buffered: bool):
        torch.manual_seed(0)
        seq = nn.Sequential(
            nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
        )
        model = meprop_(seq, MePropConfig(k=3, selection="unified")).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(2)
        ptrs = set()
        with grad_buffer.enabled(buffered):
            for _ in range(4):
                x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x.to(device)), y.to(device)).backward()
                ptrs.add(model[0].weight.grad.data_ptr())
                opt.step()
        return [p.detach().cpu() for p in model.parameters()], ptrs

    fresh, _ = run(False)
    kept, ptrs = run(True)
    assert len(ptrs) == 1
    for a, b in zip(fresh, kept, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_row_sparse_adamw_on_the_device(device, layout):
    w, b, steps = _adamw_case(DT, layout)
    ref = LazyAdamWRef([w, b], lr=0.05, wd=0.1)
    w, b = (nn.Parameter(p.detach().to(device)) for p in (w, b))
    opt = RowSparseAdamW([w, b], lr=0.05, weight_decay=0.1)
    for gw, gb in steps:
        w.grad = gw.to(device)
        b.grad = None if gb is None else gb.to(device)
        opt.step()
        ref.step([gw, gb])
    torch.testing.assert_close(w.detach().cpu(), ref.params[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach().cpu(), ref.params[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection", ["unified", "topk"])
def test_conv_grads_are_autograd_on_the_masked_gradient(device, selection):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).double()
    layer = MePropConv2d.from_conv(conv, MePropConfig(k=2, selection=selection)).to(device)
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(2, c, 5, 5, generator=g, dtype=DT) for c in (3, 6))
    xl = x.to(device).requires_grad_()
    layer(xl).backward(dy.to(device))
    _, rx, rw, rb = reference(conv.cpu(), x, dy, ref_keep(dy, 2, selection, None))
    torch.testing.assert_close(xl.grad.cpu(), rx)
    torch.testing.assert_close(layer.weight.grad.cpu(), rw)
    torch.testing.assert_close(layer.bias.grad.cpu(), rb)


@pytest.mark.parametrize("selection", ["unified", "topk"])
def test_lstm_grads_match_the_reference(device, selection):
    layer = MePropLSTM(LSTM_IN, 4, k=2, selection=selection, dtype=DT)
    _distinct_params(layer, seed=1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, LSTM_IN, generator=g, dtype=DT)
    g_out = torch.randn(3, 5, 4, generator=g, dtype=DT)
    ref = _layer_and_ref_grads(layer, x, g_out, 2, selection)  # on the CPU
    on = MePropLSTM(LSTM_IN, 4, k=2, selection=selection, dtype=DT)
    on.load_state_dict(layer.state_dict())
    on = on.to(device)
    xl = x.to(device).requires_grad_()
    on(xl)[0].backward(g_out.to(device))
    got = [getattr(on, n).grad.cpu() for n in NAMES] + [xl.grad.cpu()]
    for a, b in zip(got, ref[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
