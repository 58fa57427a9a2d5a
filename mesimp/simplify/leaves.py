"""Modules the dependency graph treats as one node ("leaves"), with mesimp's pruners.

Torch-Pruning (TP) traces a model through autograd and sees every op inside a module
it does not know: a Hugging Face ``Conv1D`` (an ``addmm``) or an RMSNorm (``pow``,
``mean``, ``rsqrt``) become "element-wise" ops that couple input channel c to output
channel c, which is wrong for the first and hides the normalisation of the second;
inside an attention block, rotary embeddings and grouped-query ``repeat_kv`` make TP's
index mapping loop for minutes. So mesimp registers such modules as leaves with a
pruner of its own (``customized_pruners``), and while tracing replaces each leaf's
output by an opaque autograd node whose only inputs are the leaf's differentiable
inputs (``opaque_leaves``): TP then sees one node, its input channels and its output
channels, and nothing inside.

Kinds of leaves here: HF ``Conv1D`` (a Linear with the weight stored ``[in, out]``) and
the norms TP 1.6.1 does not register (``nn.RMSNorm``, Hugging Face's ``*RMSNorm``,
timm's ``RmsNorm``). Attention blocks are leaves too (``mesimp.simplify.attention``),
and ``nn.LSTM`` has mesimp's own pruner (``mesimp.simplify.lstm_pruner``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mesimp.nn.conv1d import is_conv1d

__all__ = [
    "Conv1DPruner",
    "LeafPruner",
    "NormPruner",
    "is_conv1d",
    "is_rms_norm",
    "keep_list",
    "opaque_leaves",
]


def keep_list(n: int, drop: Sequence[int]) -> list[int]:
    """The indices of ``range(n)`` not in ``drop``, sorted."""
    dropped = {int(i) for i in drop}
    return [i for i in range(n) if i not in dropped]


def _take(p: torch.Tensor, keep: list[int], dim: int) -> nn.Parameter:
    idx = torch.tensor(keep, dtype=torch.long, device=p.device)
    return nn.Parameter(p.detach().index_select(dim, idx).clone(), requires_grad=p.requires_grad)


def is_rms_norm(module: nn.Module) -> bool:
    """An RMS norm over the last dimension: ``nn.RMSNorm``, HF's ``*RMSNorm``, timm's
    ``RmsNorm`` (by class name: their only parameter is a per-channel ``weight``)."""
    if isinstance(module, nn.RMSNorm):
        return True
    name = type(module).__name__.lower()
    w = getattr(module, "weight", None)
    return "rmsnorm" in name and (w is None or (isinstance(w, torch.Tensor) and w.dim() == 1))


class LeafPruner:
    """What Torch-Pruning's ``DependencyGraph`` calls on a customized layer: the two
    pruning functions and the two widths (it also sets ``pruning_dim``). Duck-typed, so
    that ``import mesimp`` does not import torch_pruning (which imports timm and then
    torchvision when they are installed)."""

    pruning_dim = 1

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError

    def get_out_channels(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def get_in_channels(self, layer: nn.Module) -> int:
        raise NotImplementedError


class Conv1DPruner(LeafPruner):
    """HF ``Conv1D``: ``y = x @ W + b`` with ``W [in, out]``; out channels are columns."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = keep_list(layer.nf, idxs)
        layer.weight = _take(layer.weight, keep, 1)
        layer.bias = _take(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = keep_list(layer.weight.shape[0], idxs)
        layer.weight = _take(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.nf)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])


class NormPruner(LeafPruner):
    """A norm over the last dimension with per-channel affine parameters (RMSNorm): the
    channels go from ``weight`` (and ``bias``) and from ``normalized_shape``."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = keep_list(self.get_out_channels(layer), idxs)
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if isinstance(p, torch.Tensor):
                setattr(layer, name, _take(p, keep, 0))
        shape = getattr(layer, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            layer.normalized_shape = (*tuple(shape)[:-1], len(keep))
        return layer

    prune_in_channels = prune_out_channels  # channel c in is channel c out

    def get_out_channels(self, layer: nn.Module) -> int:
        w = getattr(layer, "weight", None)
        if isinstance(w, torch.Tensor):
            return int(w.shape[-1])
        return int(layer.normalized_shape[-1])

    get_in_channels = get_out_channels


class _Opaque(torch.autograd.Function):
    """An output value whose autograd inputs are only the leaf's own inputs."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # pragma: no cover - trace only
        raise RuntimeError("mesimp's tracing stubs do not differentiate")


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


@contextlib.contextmanager
def opaque_leaves(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While tracing: each module's (first) output becomes one opaque autograd node fed
    by the module's differentiable inputs, so the tracer sees nothing inside it."""
    patched = []
    for m in modules:
        m.forward = _opaque_forward(m.forward)  # an instance attribute shadows the method
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _opaque_forward(forward: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            out = forward(*args, **kwargs)
        inputs = [t for t in _tensors([*args, *kwargs.values()]) if t.requires_grad]
        first = out[0] if isinstance(out, tuple) else out
        new = _Opaque.apply(first, *inputs)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return wrapped
