"""A meProp weight's dense gradient, kept between steps: O(k·in) per backward, not O(out·in).

With ``sparse_grad=False`` (the drop-in default) a meProp layer hands autograd an
ordinary dense ``[out, in]`` weight gradient that is zero outside the k selected rows, so
that every stock optimizer, ``clip_grad_norm_``, DDP and AMP take it. Writing a fresh
zero-filled ``out × in`` tensor every step costs what meProp saves: at 4000 × 4000 that is
64 MB of zeros (page faults included) for 20 useful rows.

So each meProp weight keeps one gradient buffer. A backward that finds the parameter's
``.grad`` unset (``zero_grad(set_to_none=True)``, torch's default) zeroes only the rows it
wrote the step before, writes this step's rows and hands autograd an alias of the buffer,
which ``AccumulateGrad`` adopts as ``.grad`` without a copy. The invariant is "the buffer
is zero outside ``rows``", and it is trusted only when nothing else can have written to
it since (:meth:`GradBuffer.take`):

* ``weight.grad`` is set (gradient accumulation, ``set_to_none=False``, DDP's bucket
  views): the buffer is not used; autograd adds a fresh gradient into ``.grad``, as for
  ``nn.Linear``;
* another tensor still shares the buffer's storage (a ``.grad`` the user kept, the
  engine holding this step's first gradient of a weight used twice): the buffer is given
  up to them and a new one allocated;
* the buffer's version counter moved since the write (``clip_grad_norm_``'s scaling,
  DDP's averaging, ``GradScaler.unscale_``, any in-place op on ``.grad``): all of it is
  zeroed, not only the old rows.

The state is three tensors (the buffer, the rows, the version recorded after the write)
so that the compiled kernels (``kernels.cpp``, ``take_grad_buffer``) run the same rules on
the same state; either path may serve a step. Memory: the buffer stays allocated between
steps, as ``.grad`` does with ``set_to_none=False``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch's count of the references to a storage (one per tensor using it, plus one for the
# temporary storage object the query creates); None on a torch without it: then a buffer
# is never reused (always correct, never faster)
_use_count = getattr(torch._C, "_storage_Use_Count", None)

ATTR = "_mesimp_grad_buffer"  # where a weight Parameter points at its GradBuffer
_enabled = True


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Within the block, meProp layers use their gradient buffers (True, the default) or
    hand autograd a fresh tensor every backward (False: the reference the tests and
    benchmarks compare the buffers with)."""
    global _enabled
    before, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = before


class GradBuffer:
    """One weight's reusable dense gradient (see the module docstring)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0)
        self.rows = torch.empty(0, dtype=torch.long)
        # buf's version counter right after the last write; -1: unknown (zero it all)
        self.version = torch.full((), -1, dtype=torch.long)

    def __reduce__(self) -> tuple:
        """Pickled copies start empty: a copied tensor's version counter starts over, so
        the recorded version would mean nothing, and the gradient itself is ``.grad``'s
        business. (``copy.deepcopy`` of a Parameter carries no attributes at all: the
        copy gets its own buffer on first use.)"""
        return (GradBuffer, ())

    def free(self) -> bool:
        """Whether only this object references the buffer's storage."""
        if _use_count is None:
            return False
        return _use_count(self.buf.untyped_storage()._cdata) <= 2

    @torch.no_grad()
    def take(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The buffer, zero everywhere, ready for this backward's rows; None where autograd
        must get a fresh tensor (``weight.grad`` already holds a gradient)."""
        if weight.grad is not None:
            return None
        self.match(weight)
        buf = self.buf
        if not (buf.shape == weight.shape and buf.is_contiguous() and self.free()):
            buf.set_(torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device))
        elif buf._version != int(self.version):
            buf.zero_()
        elif self.rows.numel():
            buf.index_fill_(0, self.rows, 0.0)
        return buf

    def match(self, weight: torch.Tensor) -> None:
        """A buffer of ``weight``'s dtype and device (a new, empty one if it was not: a
        tensor cannot change either in place)."""
        if self.buf.dtype != weight.dtype or self.buf.device != weight.device:
            self.buf = torch.empty(0, dtype=weight.dtype, device=weight.device)
            self.rows = torch.empty(0, dtype=torch.long, device=weight.device)
            self.version.fill_(-1)

    @torch.no_grad()
    def commit(self, rows: torch.Tensor) -> torch.Tensor:
        """Record that ``rows`` of the buffer were written; returns the gradient to hand
        autograd: an alias of the buffer (a new tensor object, so ``AccumulateGrad`` may
        adopt it as ``.grad`` without copying)."""
        self.rows.set_(rows.detach().to(self.rows.device, torch.long))
        self.version.fill_(self.buf._version)
        return self.buf.detach()

    def known_rows(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """The rows outside which ``grad`` is known to be zero: this buffer's last rows, if
        ``grad`` is the buffer (an alias of it) and nothing has written to it since."""
        buf = self.buf
        if grad is None or buf.numel() == 0 or buf._version != int(self.version):
            return None
        same = grad.data_ptr() == buf.data_ptr() and grad.shape == buf.shape
        return self.rows if same and grad.stride() == buf.stride() else None


def is_enabled() -> bool:
    return _enabled


def of(weight: torch.Tensor) -> GradBuffer | None:
    """``weight``'s GradBuffer, created on first use (kept in the Parameter's ``__dict__``
    so that an optimizer that sees only parameters finds it: ``RowSparseAdamW``); None
    while buffers are switched off (:func:`enabled`)."""
    if not _enabled:
        return None
    gb = weight.__dict__.get(ATTR)
    if gb is None:
        gb = GradBuffer()
        setattr(weight, ATTR, gb)
    return gb


def known_rows(param: torch.Tensor) -> torch.Tensor | None:
    """The rows outside which ``param.grad`` is zero, where a meProp layer's buffer knows
    them (its rows, unchanged since the backward wrote them); else None."""
    gb = param.__dict__.get(ATTR)
    return None if gb is None else gb.known_rows(param.grad)
