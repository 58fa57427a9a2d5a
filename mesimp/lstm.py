"""``MePropLSTM``: a single-layer LSTM with a meProp backward at *hidden-unit* level.

Parameters have exactly ``nn.LSTM``'s names and layout (``weight_ih_l0 [4h, in]``,
``weight_hh_l0 [4h, h]``, ``bias_ih_l0``, ``bias_hh_l0``; gate order i, f, g, o), so
its ``state_dict`` loads into ``nn.LSTM(in, h)`` and back. Counters and the mask are
non-persistent buffers, as in ``MePropLinear``.

Backward, per time step, for the gradient ``dg [B, 4h]`` of the gate pre-activations
``g_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``:

* a hidden unit j owns the four gate rows ``gate*h + j``; its score is
  ``s_j = sum_gate |dg[:, gate*h + j]|`` (per example for ``topk``/``random``,
  summed over the batch for ``unified``; ``random`` draws uniform scores);
* the k best *active* units are selected (masked units score -1) and ``dg`` is kept
  only on their four gate rows before it flows into W_ih, W_hh, the biases, x_t and
  h_{t-1}. Selecting whole units keeps the structure removable by ``prune_lstm_hidden``.

The selection is an identity-forward autograd Function on the gate pre-activations;
the GEMMs after it stay dense (plain autograd). A sparse-GEMM backward (as in
``MePropLinearFunction``) is future work: this version is about correctness.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.errors import BadInputError
from mesimp.layers import MePropCounters
from mesimp.meprop import MePropConfig, select

__all__ = ["MePropLSTM", "prune_lstm_hidden"]


class _UnitTopK(torch.autograd.Function):
    """Identity forward; the backward keeps ``dg`` only on the selected units' gate rows."""

    @staticmethod
    def forward(ctx, gates, k, selection, state, masked):
        ctx.meprop = (k, selection, state, masked)
        return gates.view_as(gates)

    @staticmethod
    def backward(ctx, dg):
        k, selection, state, masked = ctx.meprop
        b, four_h = dg.shape
        h = four_h // 4
        dg4 = dg.reshape(b, 4, h)
        score = dg4.abs().sum(1)  # [B, h], one score per unit (and example)
        idx = select(score, k, selection, state.mask if masked else None)
        keep = torch.zeros_like(score, dtype=torch.bool)
        if selection == "unified":
            keep[:, idx] = True
            if state.count:
                state.hits.index_add_(0, idx, state.hits.new_full(idx.shape, b))
        else:
            keep.scatter_(1, idx, True)
            if state.count:
                state.hits.add_(torch.bincount(idx.reshape(-1), minlength=h))
        if state.count:
            state.ref.add_(b)
        return (dg4 * keep.unsqueeze(1)).reshape(b, four_h), None, None, None, None


def _unsupported(num_layers, bidirectional, proj_size, bias) -> None:
    bad = []
    if num_layers != 1:
        bad.append(f"num_layers={num_layers}")
    if bidirectional:
        bad.append("bidirectional=True")
    if proj_size:
        bad.append(f"proj_size={proj_size}")
    if not bias:
        bad.append("bias=False")
    if bad:
        raise BadInputError(
            f"MePropLSTM: {', '.join(bad)} not supported yet "
            "(only single-layer, unidirectional LSTMs with biases and no projection)"
        )


class MePropLSTM(MePropCounters, nn.Module):
    """Single-layer, unidirectional ``nn.LSTM`` whose backward propagates k hidden units.

    With ``k == 0`` or ``k >= hidden_size`` (and no mask) it computes exactly what
    ``nn.LSTM`` computes, with the same init (uniform(-1/sqrt(h), 1/sqrt(h)) drawn in
    the same parameter order, so equal seeds give equal weights).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        k: int | float = 0,
        selection: str = "topk",
        config: MePropConfig | None = None,
    ) -> None:
        super().__init__()
        _unsupported(num_layers, bidirectional, proj_size, bias)
        if input_size <= 0 or hidden_size <= 0:
            raise BadInputError(
                f"MePropLSTM needs input_size, hidden_size >= 1, got {input_size}, {hidden_size}"
            )
        self.meprop_config = config or MePropConfig(k=k, selection=selection)
        if self.meprop_config.msbp_alpha:
            raise BadInputError("MePropLSTM: msbp_alpha > 0 is not supported yet")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = 1
        self.batch_first = batch_first
        self.dropout = dropout  # single layer: nn.LSTM ignores it too
        fk = {"device": device, "dtype": dtype}
        h4 = 4 * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(h4, input_size, **fk))
        self.weight_hh_l0 = nn.Parameter(torch.empty(h4, hidden_size, **fk))
        self.bias_ih_l0 = nn.Parameter(torch.empty(h4, **fk))
        self.bias_hh_l0 = nn.Parameter(torch.empty(h4, **fk))
        self.reset_parameters()
        dev = self.weight_ih_l0.device
        self._init_counters(hidden_size, dev)

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s rule, same parameter order (so the same RNG draws)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    # -- conversion -------------------------------------------------------------------
    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, config: MePropConfig) -> MePropLSTM:
        """A ``MePropLSTM`` with a copy of ``lstm``'s parameters."""
        _unsupported(lstm.num_layers, lstm.bidirectional, lstm.proj_size, lstm.bias)
        w = lstm.weight_ih_l0
        new = cls(
            lstm.input_size,
            lstm.hidden_size,
            batch_first=lstm.batch_first,
            device=w.device,
            dtype=w.dtype,
            config=config,
        )
        new.load_state_dict(lstm.state_dict())
        return new

    def to_lstm(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` with a copy of the parameters (masks are not applied)."""
        w = self.weight_ih_l0
        lstm = nn.LSTM(
            self.input_size,
            self.hidden_size,
            batch_first=self.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        lstm.load_state_dict(self.state_dict())
        return lstm

    # -- forward ----------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise BadInputError(
                f"MePropLSTM expects input [.., .., {self.input_size}] (2-D or 3-D), "
                f"got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if self.batch_first:
            x = x.transpose(0, 1)  # [T, B, in]
        steps, b = x.shape[0], x.shape[1]
        hs = self.hidden_size
        if hx is None:
            h = x.new_zeros(b, hs)
            c = x.new_zeros(b, hs)
        else:
            h0, c0 = hx
            want = (1, hs) if unbatched else (1, b, hs)
            if tuple(h0.shape) != want or tuple(c0.shape) != want:
                raise BadInputError(
                    f"MePropLSTM expects h0, c0 of shape {want}, "
                    f"got {tuple(h0.shape)}, {tuple(c0.shape)}"
                )
            h = h0.reshape(b, hs)
            c = c0.reshape(b, hs)

        masked = self._active < hs
        k = self.k
        sparse = k > 0 and (k < hs or masked) and torch.is_grad_enabled()
        # Why multiply h_t and c_t by the mask rather than zeroing the unit's gate
        # pre-activations: sigmoid(0) = 0.5, so zeroed gates stay half open and
        # h = o * tanh(c) is zero only while c is exactly zero (not for a nonzero c0).
        # Multiplying the state makes a masked unit output 0 at every step and makes its
        # W_hh column inert, which is what lets prune_lstm_hidden remove it exactly.
        m = self.mask.to(x.dtype) if masked else None
        if m is not None:
            h = h * m
            c = c * m
        cfg = self.meprop_config
        # The input projection for all steps at once; the sparsified gradient of each
        # step's gates flows into its slice, so this is the same as doing it per step.
        xg = F.linear(x, self.weight_ih_l0, self.bias_ih_l0)  # [T, B, 4h]
        outs = []
        for t in range(steps):
            gates = xg[t] + F.linear(h, self.weight_hh_l0, self.bias_hh_l0)
            if sparse:
                gates = _UnitTopK.apply(gates, k, cfg.selection, self._state, masked)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if m is not None:
                c = c * m
            h = torch.sigmoid(o) * torch.tanh(c)
            if m is not None:
                h = h * m
            outs.append(h)
        if outs:
            out = torch.stack(outs, 0)
        else:
            out = x.new_zeros(0, b, hs)
        if self.batch_first:
            out = out.transpose(0, 1)
        h_n, c_n = h.unsqueeze(0), c.unsqueeze(0)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def extra_repr(self) -> str:
        c = self.meprop_config
        s = (
            f"{self.input_size}, {self.hidden_size}, batch_first={self.batch_first}, "
            f"k={c.k}, selection={c.selection}"
        )
        if self._active < self.hidden_size:
            s += f", active={self._active}"
        return s


def prune_lstm_hidden(lstm: MePropLSTM | nn.LSTM, keep_idx: torch.Tensor) -> nn.LSTM:
    """A plain, smaller ``nn.LSTM`` with only the hidden units in ``keep_idx``.

    Each kept unit j keeps its four gate rows (``gate*h + j``) of W_ih, W_hh and both
    biases, and its column j of W_hh; all of a unit's parts go together. The next
    layer's input columns are pruned separately (``mesimp.shrink.prune_linear_in``).
    A boolean ``keep_idx`` of length h is accepted too.
    """
    if isinstance(lstm, nn.LSTM):
        _unsupported(lstm.num_layers, lstm.bidirectional, lstm.proj_size, lstm.bias)
    elif not isinstance(lstm, MePropLSTM):
        raise BadInputError(f"prune_lstm_hidden needs an nn.LSTM or MePropLSTM, got {type(lstm)}")
    hs = lstm.hidden_size
    keep = torch.as_tensor(keep_idx)
    if keep.dtype == torch.bool:
        if keep.shape != (hs,):
            raise BadInputError(f"boolean keep must have shape ({hs},), got {tuple(keep.shape)}")
        keep = keep.nonzero().squeeze(1)
    keep = keep.to(device="cpu", dtype=torch.long).reshape(-1)
    if keep.numel() == 0:
        raise BadInputError("prune_lstm_hidden: keep at least one hidden unit")
    if int(keep.min()) < 0 or int(keep.max()) >= hs or keep.unique().numel() != keep.numel():
        raise BadInputError(f"keep indices must be distinct and in [0, {hs}), got {keep.tolist()}")
    w_ih = lstm.weight_ih_l0
    rows = torch.cat([keep + gate * hs for gate in range(4)]).to(w_ih.device)
    cols = keep.to(w_ih.device)
    new = nn.LSTM(
        lstm.input_size,
        keep.numel(),
        batch_first=lstm.batch_first,
        device=w_ih.device,
        dtype=w_ih.dtype,
    )
    with torch.no_grad():
        new.weight_ih_l0.copy_(w_ih[rows])
        new.weight_hh_l0.copy_(lstm.weight_hh_l0[rows][:, cols])
        new.bias_ih_l0.copy_(lstm.bias_ih_l0[rows])
        new.bias_hh_l0.copy_(lstm.bias_hh_l0[rows])
    return new
