"""``MePropLSTM``: a single-layer LSTM with a meProp backward at *hidden-unit* level.

Parameters have exactly ``nn.LSTM``'s names and layout (``weight_ih_l0 [4h, in]``,
``weight_hh_l0 [4h, h]``, ``bias_ih_l0``, ``bias_hh_l0``; gate order i, f, g, o), so
its ``state_dict`` loads into ``nn.LSTM(in, h)`` and back. Counters and the mask stay
out of the ``state_dict``, as in ``MePropLinear``.

Two paths:

* **dense** (``k == 0``, ``k >= hidden`` without a mask, or no gradient needed): torch's
  fused LSTM kernel (``_VF.lstm``, what ``nn.LSTM`` calls), so evaluation costs what
  ``nn.LSTM`` costs. A mask is applied by zeroing the masked units' four gate rows of
  W_ih, W_hh and both biases and their entries of h0, c0: a masked unit then has
  ``g = 0``, so ``c = f*0 + i*tanh(0) = 0`` and ``h = o*tanh(0) = 0`` at every step,
  exactly what multiplying h and c by the mask gives.
* **sparse** (``0 < k < active width``, or any k with a mask, and a gradient needed):
  ``_MePropLSTMFunction``, one autograd node for the whole sequence. Its forward runs
  the time loop without building a graph and saves the gate activations and states;
  its backward is a hand-written BPTT. Per step, for the gradient ``dg [B, 4h]`` of the
  gate pre-activations ``g_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``:

  - a hidden unit j owns the four gate rows ``gate*h + j``; its score is
    ``s_j = sum_gate |dg[:, gate*h + j]|`` (per example for ``topk``/``random``, summed
    over the batch for ``unified``; ``random`` draws uniform scores);
  - the k best *active* units are selected (``mesimp.meprop.select``; masked units
    score -1) and ``dg`` is kept only on their gate rows before it flows into W_ih,
    W_hh, the biases, x_t and h_{t-1}. Selecting whole units keeps the structure
    removable by ``prune_lstm_hidden``.

  ``unified`` (one set of 4k rows per step) is where the speed comes from: every
  backward GEMM of the step runs on the 4k selected rows instead of 4h:
  ``dh_{t-1} = dg[:, rows] W_hh[rows]``, ``dx_t = dg[:, rows] W_ih[rows]``, and
  ``dW_hh``, ``dW_ih``, both biases get ``index_add_`` of ``dg[:, rows]^T h_{t-1}``,
  ``dg[:, rows]^T x_t``, ``dg[:, rows].sum(0)``. What stays O(h) per step is the
  element-wise BPTT that produces ``dg`` (needed to score the units). ``topk`` and
  ``random`` select a different set per example, so a step's rows are a union that
  covers most of the 4h rows at realistic batch sizes: they zero the unselected
  entries of ``dg`` and run dense GEMMs, with no GEMM saving on CPU (as for
  per-example ``MePropLinear``, the paper's k/h gain needs sparse kernels). Parameter
  gradients are dense tensors: over T steps the selected rows cover most of W anyway.
  With ``k >=`` the active width (only reachable with a mask) every active unit is
  selected, so the backward skips the selection (and, for ``random``, the draw).
  The backward is ``once_differentiable`` (no double backward). With the compiled
  kernels on (float32 CPU, ``mesimp.nn.kernels``), the unified backward is one call of
  ``torch.ops.mesimp.lstm_backward`` (``mesimp/csrc/lstm_kernels.cpp``): the same loop
  with the element-wise part in one pass per step and two GEMMs on the 4k rows per step
  (``[dh | dx]`` and ``[dW_hh | dW_ih]``), giving the same selections and counters and
  gradients equal up to float32 rounding (2-3x faster backward at h=500, k=10-20). The
  dense case, ``topk`` and ``random`` stay on this Python loop, the reference.

MSBP (``msbp_alpha > 0``, error feedback as in ``MePropLinear``): the sparsified
quantity is ``dg``, so the memory is the unpropagated part of ``dg``, kept as
``state.memory [T, B, 4h]`` from the previous backward. At step t, before the
selection, ``u_t = dg_t + memory[t]``; units are scored and selected on ``u_t``, the
selected part of ``u_t`` is what flows into the weights, x_t and h_{t-1}, and the new
``memory[t] = alpha * u_t`` with the selected units' four gate columns zeroed (for
every row with ``unified``, per row with ``topk``/``random``). The memory is aligned by
(time step, batch row): tagger batches are trimmed to their longest sentence and the
last batch is smaller, so T and B change between batches; the memory is added on the
overlap (steps ``< min(T, T_mem)``, rows ``< min(B, B_mem)``) instead of being
dropped, which would switch MSBP off for most tagger batches. (``MePropLinear`` drops
it on any shape change; its shapes change only on the last batch.) Masked units get
``dg = 0``, and the memory is multiplied by the mask before use, so they never hold
memory. With every active unit selected (``k >=`` the active width) nothing is left
over and the memory becomes empty. The cell-state path ``dc_{t-1} = dc_t * f`` is not
sparsified and carries no memory. ``reset_memory()`` and ``apply_mask`` clear it; it
is not in the ``state_dict``.

Mask semantics (both paths): h_t and c_t are multiplied by the mask every step, and
h0, c0 too; masked units output exactly 0, are never selected and never counted.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import _VF, nn

from mesimp.errors import BadInputError
from mesimp.nn import kernels
from mesimp.nn.linear import MePropCounters
from mesimp.nn.meprop import MePropConfig, MePropState, select

__all__ = ["MePropLSTM", "prune_lstm_hidden", "prune_lstm_input"]

# -- GEMMs --------------------------------------------------------------------------------
# Why oneDNN: torch's float32 CPU GEMM is MKL, which runs its AVX2 code on AMD CPUs
# (measured ~85 GFLOP/s per core on an AVX-512 EPYC), while nn.LSTM's fused kernel and
# oneDNN's linear run AVX-512 (~200 GFLOP/s with a prepacked weight). Without it the
# time loop here would be ~2x slower than nn.LSTM's forward on such machines. It is the
# op TorchInductor's CPU backend uses (private API), so it is probed once and every
# other dtype/device, or a build without it, falls back to torch's own GEMMs.
_USE_ONEDNN = True  # tests and benchmarks switch it off to compare


@functools.cache
def _onednn_works() -> bool:
    try:
        a = torch.arange(15.0).reshape(3, 5) / 7
        w = torch.arange(20.0).reshape(4, 5).cos()
        b = torch.arange(4.0)
        y1 = torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
        wp = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        y2 = torch.ops.mkldnn._linear_pointwise(a.t().contiguous().t(), wp, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    want = a @ w.t()
    return bool(torch.allclose(y1, want + b, atol=1e-5) and torch.allclose(y2, want, atol=1e-5))


def _onednn(t: torch.Tensor) -> bool:
    return (
        _USE_ONEDNN
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and _onednn_works()
    )


def _pack(w: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``w [N, K]`` prepacked by oneDNN for repeated ``x @ w^T`` with ``batch`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch) if _onednn(w) else None


def _linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w^T (+ b)`` for 2-D x (transposed views are fine)."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    if _onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


class _MePropLSTMFunction(torch.autograd.Function):
    """The whole single-layer LSTM over ``x [T, B, in]`` with a unit-level meProp BPTT.

    Returns ``(out [T, B, h], h_n [B, h], c_n [B, h])``; needs ``T, B >= 1``. ``m`` is
    the mask as ``x``'s dtype, or None. ``all_units`` (``k >=`` the active width): every
    active unit is selected, so the backward skips the selection (dense manual BPTT,
    still counted; masked units' ``dg`` is exactly 0 there anyway). ``alpha > 0``: MSBP
    with ``state.memory`` (module docstring).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, k, selection, all_units, alpha, state, m):
        steps, b, n_in = x.shape
        hs = w_hh.shape[1]
        h = h0 * m if m is not None else h0
        c = c0 * m if m is not None else c0
        # One buffer for the input projection and, step by step, the gate activations
        # (i, f, o after sigmoid, g after tanh): fresh multi-MB buffers cost page faults.
        acts = _linear(x.view(steps * b, n_in), w_ih, b_ih + b_hh).view(steps, b, 4 * hs)
        cs = x.new_empty(steps + 1, b, hs)  # c_0 (masked) .. c_T
        tcs = x.new_empty(steps, b, hs)  # tanh(c_t)
        out = x.new_empty(steps, b, hs)
        cs[0] = c
        h_init = h
        w_hh_p = _pack(w_hh, b)
        g_cols = slice(2 * hs, 3 * hs)
        for t in range(steps):
            a = acts[t]
            gates = _linear(h, w_hh, packed=w_hh_p).add_(a)
            # tanh(z) = 2 sigmoid(2z) - 1: torch's CPU tanh is ~3x slower than sigmoid
            # here; |error| < 2e-7 in float32 (below the GEMMs' rounding), tanh(0) = 0.
            gates[:, g_cols].mul_(2)
            torch.sigmoid(gates, out=a)
            a[:, g_cols].mul_(2).sub_(1)
            i, f, g, o = a.chunk(4, 1)
            c_new = cs[t + 1]
            torch.mul(f, cs[t], out=c_new).addcmul_(i, g)
            if m is not None:
                c_new.mul_(m)
            torch.mul(c_new, 2, out=tcs[t]).sigmoid_().mul_(2).sub_(1)
            h = torch.mul(o, tcs[t], out=out[t])
            if m is not None:
                h.mul_(m)
        ctx.save_for_backward(x, h_init, w_ih, w_hh, acts, cs, tcs, out)
        ctx.meprop = (k, selection, all_units, alpha, state, m)
        return out, h.clone(), cs[steps].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dh_n, dc_n):
        x, h_init, w_ih, w_hh, acts, cs, tcs, out = ctx.saved_tensors
        k, selection, dense, alpha, state, m = ctx.meprop
        if selection == "unified" and not dense and _compiled_ok(dout, x, w_hh):
            return _compiled_backward(ctx, dout, dh_n, dc_n)
        need = ctx.needs_input_grad
        steps, b, n_in = x.shape
        hs = w_hh.shape[1]
        h4 = 4 * hs
        masked = m is not None
        unified = selection == "unified" and not dense
        # MSBP: the previous backward's residual and its overlap with this batch
        mem = _msbp_memory(state, h4, m, x) if alpha > 0 else None
        t_mem = min(steps, mem.shape[0]) if mem is not None else 0
        b_mem = min(b, mem.shape[1]) if mem is not None else 0
        new_mem = x.new_empty(steps, b, h4) if alpha > 0 and not dense else None

        dh = dh_n.clone()
        dc = dc_n.clone()
        dg = x.new_empty(b, h4)
        di, df, dgg, do = dg.chunk(4, 1)
        dx = dw_ih = dw_hh = db = None
        if unified:
            # Accumulated step by step on the 4k selected rows (small GEMMs, no
            # [T, 4k, h]-sized temporaries).
            gate_off = (torch.arange(4, device=x.device) * hs).unsqueeze(1)
            dx = x.new_empty(steps, b, n_in) if need[0] else None
            dw_ih = torch.zeros_like(w_ih) if need[3] else None
            dw_hh = torch.zeros_like(w_hh) if need[4] else None
            db = x.new_zeros(h4) if need[5] or need[6] else None
        else:
            dgs = x.new_empty(steps, b, h4)  # the kept dg of every step, for batched GEMMs
            w_hh_t = w_hh.t().contiguous()  # dh = dg @ W_hh as a linear with weight W_hh^T
            w_hh_t_p = _pack(w_hh_t, b)
        picked = []
        g_cols = slice(2 * hs, 3 * hs)
        for t in range(steps - 1, -1, -1):
            a = acts[t]
            i, f, g, o = a.chunk(4, 1)
            tc = tcs[t]
            dh.add_(dout[t])
            if masked:
                dh.mul_(m)
            # h = o * tanh(c);  c = f * c_prev + i * g  (then both times the mask);
            # gate derivatives: a (1 - a) for the sigmoids i, f, o, 1 - g^2 for tanh.
            torch.mul(dh, tc, out=do)
            dc.addcmul_(dh * o, 1 - tc * tc)
            if masked:
                dc.mul_(m)
            torch.mul(dc, g, out=di)
            torch.mul(dc, cs[t], out=df)
            torch.mul(dc, i, out=dgg)
            deriv = a - a * a
            torch.mul(g, g, out=deriv[:, g_cols]).neg_().add_(1)
            dg.mul_(deriv)
            if t < t_mem:  # MSBP: u_t = dg_t + memory[t] on the overlap
                dg[:b_mem].add_(mem[t, :b_mem])
            dc.mul_(f)
            if dense:
                dgs[t] = dg
                dh = _linear(dg, w_hh_t, packed=w_hh_t_p)
                continue
            if unified:  # the batch sum first: same scores, a quarter of the work
                score = dg.abs().sum(0).view(4, hs).sum(0, keepdim=True)  # [1, h]
            else:
                score = dg.view(b, 4, hs).abs().sum(1)  # [B, h], per unit and example
            idx = select(score, k, selection, state.mask if masked else None)
            picked.append(idx)
            if unified:
                rows = (gate_off + idx).view(-1)  # the k units' 4 gate rows, gate-major
                sel = dg.index_select(1, rows)  # [B, 4k]
                if new_mem is not None:  # the residual: every row, the k units zeroed
                    torch.mul(dg, alpha, out=new_mem[t]).index_fill_(1, rows, 0.0)
                dh = sel @ w_hh.index_select(0, rows)
                sel_t = sel.t()
                if dx is not None:
                    torch.mm(sel, w_ih.index_select(0, rows), out=dx[t])
                if dw_ih is not None:
                    dw_ih.index_add_(0, rows, sel_t @ x[t])
                if dw_hh is not None:
                    dw_hh.index_add_(0, rows, sel_t @ (out[t - 1] if t else h_init))
                if db is not None:
                    db.index_add_(0, rows, sel.sum(0))
            else:
                keep = torch.zeros(b, 1, hs, dtype=dg.dtype, device=dg.device)
                keep.view(b, hs).scatter_(1, idx, 1.0)
                torch.mul(dg.view(b, 4, hs), keep, out=dgs[t].view(b, 4, hs))
                if new_mem is not None:  # the residual: each row's own units zeroed
                    torch.sub(dg, dgs[t], out=new_mem[t]).mul_(alpha)
                dh = _linear(dgs[t], w_hh_t, packed=w_hh_t_p)
        _count(state, dense, selection, picked, steps, b, hs, m)
        if alpha > 0:
            state.memory = new_mem  # None when every active unit was selected

        dh0 = (dh * m if masked else dh) if need[1] else None
        dc0 = (dc * m if masked else dc) if need[2] else None
        if not unified:
            g2 = dgs.view(steps * b, h4)
            if need[0]:
                dx = _linear(g2, w_ih.t().contiguous()).view(steps, b, n_in)
            if need[3]:
                dw_ih = _linear(g2.t(), x.view(steps * b, n_in).t())
            if need[4]:
                h_prev = torch.cat([h_init.unsqueeze(0), out[:-1]], 0)  # [T, B, h]
                dw_hh = _linear(g2.t(), h_prev.view(steps * b, hs).t())
            if need[5] or need[6]:
                db = g2.sum(0)
        # Both biases get the same gradient; two tensors, since autograd may keep a
        # returned tensor as the parameter's .grad and accumulate into it in place.
        db_ih = db if need[5] else None
        db_hh = (db.clone() if need[5] else db) if need[6] else None
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None, None, None


def lstm_op_built() -> bool:
    """Whether ``mesimp._C`` loads and has ``lstm_backward`` (an older build has only the
    MLP kernels; the LSTM then keeps the Python loop)."""
    return kernels.available() and hasattr(torch.ops.mesimp, "lstm_backward")


def _compiled_ok(dout: torch.Tensor, x: torch.Tensor, w_hh: torch.Tensor) -> bool:
    """Whether this unified backward takes ``torch.ops.mesimp.lstm_backward``: float32
    CPU, the op built and on; torch.compile traces with fake tensors, which the op has no
    rule for."""
    return kernels.usable(dout, x, w_hh) and lstm_op_built() and not torch.compiler.is_compiling()


def _compiled_backward(
    ctx: torch.autograd.function.FunctionCtx,
    dout: torch.Tensor,
    dh_n: torch.Tensor,
    dc_n: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The unified BPTT in one call of ``torch.ops.mesimp.lstm_backward`` (same results as
    the Python loop up to float32 rounding; the same selections and counters)."""
    x, h_init, w_ih, w_hh, acts, cs, tcs, out = ctx.saved_tensors
    k, _selection, _dense, alpha, state, m = ctx.meprop
    need = ctx.needs_input_grad
    h4 = 4 * w_hh.shape[1]
    mem = _msbp_memory(state, h4, m, x) if alpha > 0 else None
    dx, dh0, dc0, dw_ih, dw_hh, db, new_mem = torch.ops.mesimp.lstm_backward(
        dout, dh_n, dc_n, x, h_init, w_ih, w_hh, acts, cs, tcs, out, m, mem, state.hits,
        state.ref, k, float(alpha), state.count, need[0], need[1], need[2], need[3], need[4],
        need[5] or need[6],
    )  # fmt: skip
    if alpha > 0:
        state.memory = new_mem
    db_ih = db if need[5] else None
    db_hh = (db.clone() if need[5] else db) if need[6] else None
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None, None, None


def _msbp_memory(
    state: MePropState, h4: int, m: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor | None:
    """The stored MSBP memory ready to add (masked units zeroed), or None if there is none.

    A memory whose last dimension is not ``4h`` (not this layer's gates) is ignored, as
    ``MePropLinear`` ignores a memory of another shape; T and B may differ (overlap).
    The mask product keeps a masked unit memory-free even if the memory came from
    elsewhere (a resume file); ``apply_mask`` clears it anyway.
    """
    mem = state.memory
    if mem is None or mem.dim() != 3 or mem.shape[2] != h4:
        return None
    mem = mem.to(device=like.device, dtype=like.dtype)
    return mem * m.repeat(4) if m is not None else mem


def _count(
    state: MePropState,
    dense: bool,
    selection: str,
    picked: list[torch.Tensor],
    steps: int,
    b: int,
    hs: int,
    m: torch.Tensor | None,
) -> None:
    """meSimp counters: per example and step, +1 per selected unit and +1 to ``ref``."""
    if not state.count:
        return
    if dense:  # every active unit selected at every step, for every example
        if m is None:
            state.hits.add_(steps * b)
        else:
            state.hits.add_(state.mask.long() * (steps * b))
    elif selection == "unified":
        idx = torch.cat(picked)
        state.hits.index_add_(0, idx, state.hits.new_full(idx.shape, b))
    else:
        state.hits.add_(torch.bincount(torch.cat(picked).view(-1), minlength=hs))
    state.ref.add_(steps * b)


def _unsupported(num_layers: int, bidirectional: bool, proj_size: int, bias: bool) -> None:
    if num_layers != 1:
        raise BadInputError(
            f"MePropLSTM: num_layers={num_layers} not supported: meSimp gives each layer "
            "its own kept width, which one nn.LSTM(num_layers=n) cannot hold; stack "
            "single-layer LSTMs instead (the tagger's hidden=[h1, h2])"
        )
    bad = []
    if bidirectional:
        bad.append("bidirectional=True")
    if proj_size:
        bad.append(f"proj_size={proj_size}")
    if not bias:
        bad.append("bias=False")
    if bad:
        raise BadInputError(
            f"MePropLSTM: {', '.join(bad)} not supported "
            "(only unidirectional LSTMs with biases and no projection)"
        )


class MePropLSTM(MePropCounters, nn.Module):
    """Single-layer, unidirectional ``nn.LSTM`` whose backward propagates k hidden units.

    With ``k == 0`` or ``k >= hidden_size`` (and no mask) it computes exactly what
    ``nn.LSTM`` computes, with the same kernel and the same init (uniform(-1/sqrt(h),
    1/sqrt(h)) drawn in the same parameter order, so equal seeds give equal weights).
    For several layers, stack MePropLSTMs: each gets its own mask and kept width.
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
        msbp_alpha: float = 0.0,
        config: MePropConfig | None = None,
    ) -> None:
        super().__init__()
        _unsupported(num_layers, bidirectional, proj_size, bias)
        if input_size <= 0 or hidden_size <= 0:
            raise BadInputError(
                f"MePropLSTM needs input_size, hidden_size >= 1, got {input_size}, {hidden_size}"
            )
        self.meprop_config = config or MePropConfig(k=k, selection=selection, msbp_alpha=msbp_alpha)
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
    def _params(self) -> list[torch.Tensor]:
        return [self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0]

    def _use_sparse(self, k: int, masked: bool, tensors: list[torch.Tensor]) -> bool:
        """The meProp path runs only when its backward would (and differ from dense)."""
        if k == 0 or (k >= self.hidden_size and not masked) or not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in tensors)

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``nn.LSTM``'s call convention: ``x [B, T, in]`` (batch_first), ``[T, B, in]``
        or unbatched ``[T, in]``; ``hx = (h0, c0)``, each ``[1, B, h]`` (``[1, h]``)."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise BadInputError(
                f"MePropLSTM expects input [.., .., {self.input_size}] (2-D or 3-D), "
                f"got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        bdim = 0 if self.batch_first else 1
        steps, b = x.shape[1 - bdim], x.shape[bdim]
        hs = self.hidden_size
        if hx is None:
            h0 = c0 = x.new_zeros(b, hs)
        else:
            h0, c0 = hx
            want = (1, hs) if unbatched else (1, b, hs)
            if tuple(h0.shape) != want or tuple(c0.shape) != want:
                raise BadInputError(
                    f"MePropLSTM expects h0, c0 of shape {want}, "
                    f"got {tuple(h0.shape)}, {tuple(c0.shape)}"
                )
            h0, c0 = h0.reshape(b, hs), c0.reshape(b, hs)

        masked = self._active < hs
        m = self.mask.to(x.dtype) if masked else None
        k = self.k
        params = self._params()
        if steps == 0:  # nn.LSTM refuses T = 0; keep the old answer (empty output)
            out = x.new_zeros(b, 0, hs) if self.batch_first else x.new_zeros(0, b, hs)
            h_n, c_n = (h0 * m, c0 * m) if m is not None else (h0, c0)
        elif b > 0 and self._use_sparse(k, masked, [x, h0, c0, *params]):
            x_tb = x.transpose(0, 1) if self.batch_first else x
            cfg = self.meprop_config
            out, h_n, c_n = _MePropLSTMFunction.apply(
                x_tb.contiguous(),
                h0,
                c0,
                *params,
                k,
                cfg.selection,
                k >= self._active,
                cfg.msbp_alpha,
                self._state,
                m,
            )
            if self.batch_first:
                out = out.transpose(0, 1)
        else:
            if m is not None:
                rows = m.repeat(4)
                params = [
                    params[0] * rows.unsqueeze(1),
                    params[1] * rows.unsqueeze(1),
                    params[2] * rows,
                    params[3] * rows,
                ]
                h0, c0 = h0 * m, c0 * m
            out, h_n, c_n = _VF.lstm(
                x,
                (h0.unsqueeze(0), c0.unsqueeze(0)),
                params,
                True,  # has biases
                1,  # num_layers
                0.0,  # dropout
                self.training,
                False,  # bidirectional
                self.batch_first,
            )
            h_n, c_n = h_n.squeeze(0), c_n.squeeze(0)
        h_n, c_n = h_n.unsqueeze(0), c_n.unsqueeze(0)
        if unbatched:
            out = out.squeeze(bdim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def extra_repr(self) -> str:
        c = self.meprop_config
        s = (
            f"{self.input_size}, {self.hidden_size}, batch_first={self.batch_first}, "
            f"k={c.k}, selection={c.selection}"
        )
        if c.msbp_alpha:
            s += f", msbp_alpha={c.msbp_alpha}"
        if self._active < self.hidden_size:
            s += f", active={self._active}"
        return s


# -- shrinking --------------------------------------------------------------------------
def _check_lstm(lstm: object, who: str) -> None:
    if isinstance(lstm, nn.LSTM):
        _unsupported(lstm.num_layers, lstm.bidirectional, lstm.proj_size, lstm.bias)
    elif not isinstance(lstm, MePropLSTM):
        raise BadInputError(f"{who} needs an nn.LSTM or MePropLSTM, got {type(lstm).__name__}")


def _keep_indices(keep_idx: torch.Tensor, n: int, who: str) -> torch.Tensor:
    """Validated, long, CPU indices from ``keep_idx`` (indices or a boolean mask of n)."""
    keep = torch.as_tensor(keep_idx)
    if keep.dtype == torch.bool:
        if keep.shape != (n,):
            raise BadInputError(
                f"{who}: boolean keep must have shape ({n},), got {tuple(keep.shape)}"
            )
        keep = keep.nonzero().squeeze(1)
    if keep.is_floating_point() or keep.is_complex():
        raise BadInputError(f"{who}: keep indices must be integers, got {keep.dtype}")
    keep = keep.to(device="cpu", dtype=torch.long).reshape(-1)
    if keep.numel() == 0:
        raise BadInputError(f"{who}: keep at least one unit")
    if int(keep.min()) < 0 or int(keep.max()) >= n or keep.unique().numel() != keep.numel():
        raise BadInputError(
            f"{who}: keep indices must be distinct and in [0, {n}), got {keep.tolist()}"
        )
    return keep


def prune_lstm_hidden(lstm: MePropLSTM | nn.LSTM, keep_idx: torch.Tensor) -> nn.LSTM:
    """A plain, smaller ``nn.LSTM`` with only the hidden units in ``keep_idx``.

    Each kept unit j keeps its four gate rows (``gate*h + j``) of W_ih, W_hh and both
    biases, and its column j of W_hh; all of a unit's parts go together. The next
    layer's input columns are pruned separately (``mesimp.checkpoint_shrink.prune_linear_in`` for a
    Linear head, ``prune_lstm_input`` for a stacked LSTM). A boolean ``keep_idx`` of
    length h is accepted too.
    """
    _check_lstm(lstm, "prune_lstm_hidden")
    hs = lstm.hidden_size
    keep = _keep_indices(keep_idx, hs, "prune_lstm_hidden")
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


def prune_lstm_input(lstm: MePropLSTM | nn.LSTM, keep_idx: torch.Tensor) -> MePropLSTM | nn.LSTM:
    """The same LSTM reading only the input features in ``keep_idx`` (columns of W_ih).

    For the next layer of a stack whose previous layer lost hidden units. Returns the
    same type: an ``nn.LSTM`` stays an ``nn.LSTM``; a ``MePropLSTM`` stays a
    ``MePropLSTM`` with the same config, counters, mask and counting flag (its hidden
    units are untouched) and MSBP memory, so a stack can be shrunk mid-training. A boolean
    ``keep_idx`` of length ``input_size`` is accepted too.
    """
    _check_lstm(lstm, "prune_lstm_input")
    w_ih = lstm.weight_ih_l0
    cols = _keep_indices(keep_idx, lstm.input_size, "prune_lstm_input").to(w_ih.device)
    fk = {"batch_first": lstm.batch_first, "device": w_ih.device, "dtype": w_ih.dtype}
    if isinstance(lstm, MePropLSTM):
        config = MePropConfig.from_dict(lstm.meprop_config.to_dict())
        new = MePropLSTM(cols.numel(), lstm.hidden_size, config=config, **fk)
        new.load_meprop_state(lstm.meprop_state())
        new.counting = lstm.counting
        mem = lstm._state.memory  # over the hidden units' gates, which are unchanged
        new._state.memory = mem.clone() if mem is not None else None
    else:
        new = nn.LSTM(cols.numel(), lstm.hidden_size, **fk)
    new.train(lstm.training)
    with torch.no_grad():
        new.weight_ih_l0.copy_(w_ih[:, cols])
        new.weight_hh_l0.copy_(lstm.weight_hh_l0)
        new.bias_ih_l0.copy_(lstm.bias_ih_l0)
        new.bias_hh_l0.copy_(lstm.bias_hh_l0)
    return new
