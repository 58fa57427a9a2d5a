"""Widths a model keeps in plain attributes, refreshed after a prune.

Torch-Pruning resizes parameters and the attributes of the modules it prunes
(``out_features``, ``num_features``); mesimp's head pruner updates head counts. Some
models also copy a width into an attribute of their own and read it in ``forward``:
torchvision's ``VisionTransformer`` reshapes its patch embedding with
``self.hidden_dim``. Each entry here names such a class and recomputes the attribute
from the pruned modules; without it, the trial shrink of the ``Simplifier`` (or the
check of ``mesimp.shrink``) finds the stale width and leaves the group alone.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["refresh_width_attributes"]


def _vision_transformer(m: nn.Module) -> None:
    conv = getattr(m, "conv_proj", None)
    if isinstance(conv, nn.Conv2d):
        m.hidden_dim = conv.out_channels


# (class name, module path prefix) -> how to recompute its width attributes
_FIXUPS: dict[tuple[str, str], Callable[[nn.Module], None]] = {
    ("VisionTransformer", "torchvision."): _vision_transformer,
}


def refresh_width_attributes(model: nn.Module) -> None:
    """Recompute, in place, the width attributes of the modules of ``model`` listed here."""
    for m in model.modules():
        t = type(m)
        for (name, prefix), fix in _FIXUPS.items():
            if t.__name__ == name and t.__module__.startswith(prefix):
                fix(m)
