"""``MePropLinear``, a drop-in ``nn.Linear`` with a meProp backward (``mesimp.swap.meprop_``
puts it, ``MePropConv2d`` and ``MePropLSTM`` into a model).

Counters (per-process tensor attributes) and the mask (a non-persistent buffer) stay
out of the ``state_dict``: it has exactly ``nn.Linear``'s keys (``weight``, ``bias``),
so weights move freely between ``MePropLinear`` and ``nn.Linear``. Checkpoints save
counters and masks separately (``mesimp.checkpoint``), which is what meSimp and
``shrink`` read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn import grad_buffer
from mesimp.nn.meprop import MePropConfig, MePropLinearFunction, MePropState

__all__ = ["MePropConfig", "MePropCounters", "MePropLinear", "autocast_off", "meprop_linear"]


class MePropCounters:
    """Counters, mask and MSBP-memory handling shared by meProp layers (Linear, LSTM).

    A host ``nn.Module`` calls ``_init_counters(width, device)`` in ``__init__``; it then
    has ``hits`` (selections per unit) and ``ref`` (examples seen), per-process tensor
    attributes, the non-persistent buffer ``mask`` (active units), and ``_state``, the
    view the backward pass updates.
    """

    meprop_config: MePropConfig

    def _init_counters(self, width: int, device: torch.device | str | None) -> None:
        # hits and ref are plain tensor attributes, not buffers: each process counts its
        # own examples, and DDP broadcasts every buffer from rank 0 at each forward
        # (broadcast_buffers=True), which would overwrite the other ranks' counts.
        # The Simplifier sums them across ranks at each point (mesimp.simplifier).
        self.hits = torch.zeros(width, dtype=torch.long, device=device)
        self.ref = torch.zeros((), dtype=torch.long, device=device)
        self.register_buffer(
            "mask", torch.ones(width, dtype=torch.bool, device=device), persistent=False
        )
        self._state = MePropState(self.hits, self.ref, self.mask)
        self._active = width

    @property
    def active_width(self) -> int:
        return self._active

    @property
    def k(self) -> int:
        """The effective k now (0 = off), capped at or scaled with the active width."""
        return self.meprop_config.resolve_k(self._active, self.mask.numel())

    @property
    def counting(self) -> bool:
        return self._state.count

    @counting.setter
    def counting(self, on: bool) -> None:
        self._state.count = bool(on)

    def reset_counters(self) -> None:
        self.hits.zero_()
        self.ref.zero_()

    def reset_memory(self) -> None:
        self._state.memory = None

    def apply_mask(self, keep: torch.Tensor) -> None:
        """Mask every unit where ``keep`` is False. A masked unit never comes back."""
        keep = keep.to(device=self.mask.device, dtype=torch.bool)
        self.mask.logical_and_(keep)
        self._active = int(self.mask.sum())
        self._state.memory = None

    def meprop_state(self) -> dict[str, torch.Tensor]:
        return {
            "hits": self.hits.detach().cpu().clone(),
            "ref": self.ref.detach().cpu().clone(),
            "mask": self.mask.detach().cpu().clone(),
        }

    def load_meprop_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("hits", "ref", "mask"):
            if name in state:
                getattr(self, name).copy_(state[name])
        self._active = int(self.mask.sum())

    def _apply(self, fn, recurse=True):  # move the counters too; keep the backward's view
        result = super()._apply(fn, recurse)
        old = self._state
        self.hits, self.ref = fn(self.hits), fn(self.ref)
        self._state = MePropState(self.hits, self.ref, self.mask)
        # ...and what it holds besides: the MSBP memory and whether counting is on
        self._state.memory = fn(old.memory) if old.memory is not None else None
        self._state.count = old.count
        return result


@contextlib.contextmanager
def autocast_off(x: torch.Tensor) -> Iterator[torch.dtype | None]:
    """Inside ``torch.autocast``: yield its dtype (cast the inputs to it) and turn it
    off, since a custom autograd Function is not autocast by itself. ``None`` outside.
    The casts are autograd ops, so the fp32 parameters get fp32 gradients."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        yield None
        return
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        yield dtype


def meprop_linear(
    layer: MePropCounters,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    buffered: bool = True,
) -> torch.Tensor:
    """``x W^T + b`` (``weight [out, in]``) with the layer's meProp backward, counters
    and mask; any leading shape of ``x``. ``buffered``: the weight is the Parameter
    itself (not a view), so its dense gradient can live in a persistent buffer
    (``mesimp.nn.grad_buffer``)."""
    out_features, in_features = weight.shape
    masked = layer._active < out_features
    k = layer.k
    if k == 0 or (k >= out_features and not masked) or not torch.is_grad_enabled():
        out = F.linear(x, weight, bias)
        return out * layer.mask if masked else out
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    cfg = layer.meprop_config
    # the weight's persistent dense gradient (mesimp.nn.grad_buffer), where the backward
    # hands its gradient straight to the Parameter: not under autocast (the gradient
    # then goes through the cast to float32) nor with row-sparse gradients
    gb = None
    with autocast_off(x2) as dtype:  # torch.amp: the GEMMs run in autocast's dtype
        if dtype is not None:
            x2, weight = x2.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif not cfg.sparse_grad and buffered:
            gb = grad_buffer.of(weight)
        out = MePropLinearFunction.apply(
            x2, weight, bias, k, cfg.backward_selection, cfg.msbp_alpha, cfg.sparse_grad,
            layer._state, masked, cfg.dense_bias, gb,
        )  # fmt: skip
    return out.reshape(*lead, out_features)


class MePropLinear(MePropCounters, nn.Linear):
    """``nn.Linear`` whose backward propagates only k entries of the output gradient.

    Same ``[out, in]`` weight layout, same init, same ``state_dict`` keys. With
    ``k == 0`` or ``k >= out_features`` (and no mask) it *is* ``nn.Linear``.
    Inputs of any leading shape work: ``[in]``, ``[B, in]``, ``[B, T, in]``; each row
    of the flattened input counts as one example for the counters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        k: int | float = 0,
        selection: str = "topk",
        msbp_alpha: float = 0.0,
        sparse_grad: bool = False,
        config: MePropConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.meprop_config = config or MePropConfig(
            k=k, selection=selection, msbp_alpha=msbp_alpha, sparse_grad=sparse_grad
        )
        self._init_counters(out_features, self.weight.device)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: MePropConfig) -> MePropLinear:
        """Wrap an existing ``nn.Linear``, sharing its parameters (no copy)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=torch.device("meta"),
            config=config,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_counters(new.out_features, linear.weight.device)  # off "meta"
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (masks are not applied)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        self.weight.__dict__.pop(grad_buffer.ATTR, None)  # a plain layer's gradients are fresh
        return lin

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return meprop_linear(self, x, self.weight, self.bias)

    def extra_repr(self) -> str:
        c = self.meprop_config
        s = f"{super().extra_repr()}, k={c.k}, selection={c.selection}"
        if c.msbp_alpha:
            s += f", msbp_alpha={c.msbp_alpha}"
        if self._active < self.out_features:
            s += f", active={self._active}"
        return s
