"""torchvision's model definitions beside the CPU build of torch 2.13.

PyPI's torchvision 0.28.0 (the release paired with torch 2.13.0) ships compiled ops
linked against torch's CUDA libraries; next to the CPU wheel they fail to load, and
``import torchvision`` then stops at ``operator torchvision::nms does not exist`` while
registering fake kernels for two detection ops. The model definitions are plain
Python and need none of them. ``load()`` declares the two operator schemas (no
kernels) when the compiled ops are absent, then imports torchvision. NMS and RoI ops
stay unusable; resnet18, VisionTransformer and the like work as usual.

Hugging Face ``transformers`` imports torchvision whenever it is installed (for its
image processors), so ``mesimp.integrations.transformers`` runs ``load()`` first, and
the tests and benchmarks that build torchvision models use it too
(``benchmarks/torchvision_cpu.py`` re-exports it).
"""

from __future__ import annotations

import types

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None


def load() -> types.ModuleType:
    """``import torchvision``, declaring the ops its import registers if they are missing."""
    global _LIB
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS.values():
            try:
                _LIB.define(schema)
            except RuntimeError:  # already declared
                pass
        import sys

        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # the half-imported package
        import torchvision
    return torchvision
