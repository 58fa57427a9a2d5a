"""``MePropConv2d``: a drop-in ``nn.Conv2d`` whose backward keeps the top-k output channels.

The CNN analogue of meProp (cf. ssProp, arXiv 2408.12561): a unit is an output
channel. Backward, for the output gradient ``dy: [N, C, H, W]``:

* score channel c by ``sum |dy[:, c]|`` over batch and positions (``unified``: one set
  of k channels for the minibatch), or by ``sum |dy[i, c]|`` over positions per
  example (``topk``), or draw k channels per example (``random``); masked channels
  are never chosen;
* keep dy only on the selected channels; dx, dW and db are then exactly plain
  autograd on that masked dy. With ``unified`` (and ``groups == 1``) the convolution
  backward runs on the k selected filters only: ``dx`` from ``W[S]`` and ``dy[:, S]``,
  ``dW`` nonzero in rows S.

Counters: ``hits[c]`` counts the examples for which channel c was selected, ``ref``
the examples, as for ``MePropLinear``; meSimp reads them. MSBP keeps the residual of
``dy`` (``[N, C, H, W]``), as the Linear layer does. Weight gradients are always dense
(a conv weight is small next to its activations). A masked channel outputs 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn.linear import MePropCounters, autocast_off
from mesimp.nn.meprop import MePropConfig

__all__ = ["MePropConv2d"]


def select_channels(
    u: torch.Tensor, k: int, selection: str, mask: torch.Tensor | None
) -> torch.Tensor:
    """The kept channels as a bool ``[C]`` (unified) or ``[N, C]`` (per example)."""
    if selection == "unified":
        score = u.abs().sum((0, 2, 3))
    elif selection == "topk":
        score = u.abs().sum((2, 3))
    else:
        score = torch.rand(u.shape[:2], dtype=u.dtype, device=u.device)
    if mask is not None:
        score = score.masked_fill(~mask, -1.0)
    idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=u.device).scatter_(-1, idx, True)


class MePropConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W, b) * mask`` with a channel-level meProp backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, k, selection, alpha, state, masked):
        stride, padding, dilation, groups = conv
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if masked:
            out.mul_(state.mask.view(1, -1, 1, 1))
        ctx.save_for_backward(x, weight)
        ctx.meprop = (conv, k, selection, alpha, state, masked, bias is not None)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        conv, k, selection, alpha, state, masked, has_bias = ctx.meprop
        stride, padding, dilation, groups = conv
        n = dy.shape[0]
        u = dy
        if alpha > 0 and state.memory is not None and state.memory.shape == dy.shape:
            u = dy + state.memory
        keep = select_channels(u, k, selection, state.mask if masked else None)
        if state.count:
            state.hits.add_(keep.long() * n if keep.dim() == 1 else keep.sum(0))
            state.ref.add_(n)

        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        if keep.dim() == 1 and groups == 1:
            # one set of channels for the batch: the backward on the k selected filters,
            # from the k channels of u gathered once (no masked copy of the whole dy: at
            # resnet18's first stage that pass cost as much as the convolutions)
            sel = keep.nonzero().squeeze(1)
            g_sel, w_sel = u.index_select(1, sel), weight.index_select(0, sel)
            if alpha > 0:
                state.memory = u.mul(alpha).index_fill_(1, sel, 0.0)
            if has_bias and ctx.needs_input_grad[2]:
                grad_b = u.new_zeros(u.shape[1]).index_copy_(0, sel, g_sel.sum((0, 2, 3)))
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g_sel, x, w_sel, None, stride, padding, dilation, False, [0, 0], 1,
                [need_x, need_w, False],
            )  # fmt: skip
            if need_w:
                grad_w = weight.new_zeros(weight.shape).index_copy_(0, sel, gw)
            grad_x = gx
            return grad_x, grad_w, grad_b, None, None, None, None, None, None
        shape = (1, -1, 1, 1) if keep.dim() == 1 else (*keep.shape, 1, 1)
        g = u * keep.view(shape).to(u.dtype)
        if alpha > 0:
            state.memory = (u - g).mul_(alpha)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3))
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            g, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_w, False],
        )  # fmt: skip
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class MePropConv2d(MePropCounters, nn.Conv2d):
    """``nn.Conv2d`` whose backward propagates only k output channels' gradient.

    Same weight layout, init and ``state_dict`` keys as ``nn.Conv2d`` (counters and the
    mask stay out of it, as in ``MePropLinear``). With ``k == 0`` or ``k >= out_channels`` (and no
    mask) it is ``nn.Conv2d``. Every padding mode works (non-zero modes pad first, as
    ``nn.Conv2d`` does).
    """

    def __init__(self, *args, config: MePropConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meprop_config = config or MePropConfig()
        self._init_counters(self.out_channels, self.weight.device)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: MePropConfig) -> MePropConv2d:
        """Wrap an existing ``nn.Conv2d``, sharing its parameters (no copy)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=torch.device("meta"),
            config=config,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new._init_counters(new.out_channels, conv.weight.device)
        return new

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's parameters (masks not applied)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = self._active < self.out_channels
        k = self.k
        if k == 0 or (k >= self.out_channels and not masked) or not torch.is_grad_enabled():
            out = self._conv_forward(x, self.weight, self.bias)
            return out * self.mask.view(-1, 1, 1).to(out.dtype) if masked else out
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            # pad outside the Function (autograd handles F.pad), then convolve unpadded
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        cfg = self.meprop_config
        weight, bias = self.weight, self.bias
        conv = (list(self.stride), list(padding), list(self.dilation), self.groups)
        with autocast_off(x) as dtype:
            if dtype is not None:
                x, weight = x.to(dtype), weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            out = MePropConv2dFunction.apply(
                x, weight, bias, conv, k, cfg.selection, cfg.msbp_alpha, self._state, masked
            )
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        c = self.meprop_config
        s = f"{super().extra_repr()}, k={c.k}, selection={c.selection}"
        if self._active < self.out_channels:
            s += f", active={self._active}"
        return s
