"""``MePropConv2d`` against an independent reference: plain autograd through
``F.conv2d`` on the output gradient masked to the selected channels, in float64.

The reference selection is written here from the definition (channel scores summed
over positions, and over the batch for ``unified``), not taken from the library.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn.conv import MePropConv2d
from mesimp.nn.meprop import MePropConfig

DT = torch.float64


def ref_keep(dy: torch.Tensor, k: int, selection: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool [N, C]: the channels each example keeps."""
    n, c = dy.shape[:2]
    if selection == "unified":
        score = dy.abs().sum((0, 2, 3)).expand(n, c)
    else:
        score = dy.abs().sum((2, 3))
    if mask is not None:
        score = torch.where(mask, score, torch.full_like(score, -1.0))
    keep = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        keep[i, torch.argsort(score[i], descending=True)[:k]] = True
    return keep


def reference(conv: nn.Conv2d, x, dy, keep, mask=None):
    """dx, dW, db of plain autograd on ``dy * keep`` (and the forward ``* mask``)."""
    xr = x.detach().clone().requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(True)
    if conv.padding_mode != "zeros":
        y = F.conv2d(
            F.pad(xr, conv._reversed_padding_repeated_twice, mode=conv.padding_mode),
            w, b, conv.stride, 0, conv.dilation, conv.groups,
        )  # fmt: skip
    else:
        y = F.conv2d(xr, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    if mask is not None:
        y = y * mask.view(1, -1, 1, 1).to(y.dtype)
    y.backward(dy * keep[:, :, None, None].to(dy.dtype))
    return y.detach(), xr.grad, w.grad, None if b is None else b.grad


CASES = [
    dict(),
    dict(groups=2),
    dict(bias=False, stride=2),
    dict(padding_mode="reflect"),
    dict(padding="same", dilation=2),
]


@pytest.mark.parametrize("selection", ["unified", "topk"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("masked", [False, True])
def test_grads_equal_autograd_on_the_masked_dy(selection, case, masked):
    kw = {"padding": 1, **CASES[case]}
    torch.manual_seed(case)
    conv = MePropConv2d(4, 6, 3, dtype=DT, config=MePropConfig(k=3, selection=selection), **kw)
    mask = None
    if masked:
        mask = torch.tensor([True, False, True, True, False, True])
        conv.apply_mask(mask)
    x = torch.randn(5, 4, 9, 9, dtype=DT, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = ref_keep(dy, 3, selection, mask)
    y_ref, gx, gw, gb = reference(conv, x, dy, keep, mask)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.weight.grad, gw, rtol=1e-10, atol=1e-10)
    assert not conv.weight.grad.is_sparse
    if conv.bias is not None:
        torch.testing.assert_close(conv.bias.grad, gb, rtol=1e-10, atol=1e-10)
    # counters: per example, the selected channels; ref counts the examples
    assert conv.hits.tolist() == keep.sum(0).tolist() and int(conv.ref) == 5
    if masked:
        assert conv.hits[~mask].sum() == 0


def test_random_selection_keeps_k_active_channels_per_example():
    torch.manual_seed(0)
    conv = MePropConv2d(3, 8, 3, dtype=DT, config=MePropConfig(k=2, selection="random"))
    conv.apply_mask(torch.arange(8) % 2 == 0)
    x = torch.randn(6, 3, 7, 7, dtype=DT)
    conv(x).sum().backward()
    assert int(conv.hits.sum()) == 6 * 2 and conv.hits[1::2].sum() == 0
    nonzero = conv.weight.grad.abs().sum((1, 2, 3)) > 0
    assert not nonzero[1::2].any()


def test_k_zero_or_full_is_plain_conv_and_state_dict_is_nn_conv2d():
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 5, 3, padding=1, dtype=DT)
    for k in (0, 5, 9):
        conv = MePropConv2d.from_conv(ref, MePropConfig(k=k))
        assert conv.weight is ref.weight  # shared, no copy
        x = torch.randn(2, 3, 6, 6, dtype=DT)
        torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    back = nn.Conv2d(3, 5, 3, padding=1, dtype=DT)
    back.load_state_dict(conv.state_dict())  # strict: the same keys
    assert set(conv.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(conv.to_conv()(x), ref(x), rtol=0, atol=0)


def test_msbp_memory_is_the_unselected_residual():
    torch.manual_seed(0)
    conv = MePropConv2d(
        2, 4, 1, dtype=DT, config=MePropConfig(k=1, selection="unified", msbp_alpha=0.5)
    )
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = ref_keep(dy, 1, "unified", None)[0]
    mem = conv._state.memory
    torch.testing.assert_close(mem, 0.5 * dy * (~keep).view(1, -1, 1, 1).to(DT))
    # the next backward selects on dy + memory
    conv.weight.grad = None
    y2 = conv(x)
    dy2 = torch.randn_like(y2)
    y2.backward(dy2)
    u = dy2 + mem
    keep2 = ref_keep(u, 1, "unified", None)
    _, _, gw, _ = reference(conv, x, u, keep2)
    torch.testing.assert_close(conv.weight.grad, gw, rtol=1e-10, atol=1e-10)


def test_autocast_bf16_gives_fp32_parameter_grads():
    torch.manual_seed(0)
    conv = MePropConv2d(3, 4, 3, config=MePropConfig(k=2, selection="unified"))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    assert int((conv.weight.grad.abs().sum((1, 2, 3)) > 0).sum()) == 2
