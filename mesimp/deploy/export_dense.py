"""Export of the feed-forward families (MLPs and CNNs: chains of Linear/Conv layers).

The file takes ``input`` ``[batch, in_features]`` (a CNN reshapes it inside) and gives
``logits`` ``[batch, classes]``, batch axis dynamic, through the ``torch.export``-based
exporter by default. Parity is checked on the first ``n_check`` test images of
``data`` (default data locations when ``None``; random inputs in [0, 1) if none is
found and ``int8`` is off), accuracy and int8 agreement on the whole test set.

Masks
    A masked ``MePropLinear`` computes ``linear(x) * mask`` at inference. The export
    folds the mask into the weights (masked rows of ``weight`` and ``bias`` set to 0),
    which gives exactly the same logits with a plain ``Gemm``/``Relu`` graph and no
    ``Mul`` by a mask constant. A masked model keeps its full width (and MACs) in ONNX;
    ``mesimp shrink`` is what makes it physically smaller. Masked conv channels are
    zeroed after their BatchNorm, which no plain graph folds: such checkpoints are
    refused (shrink them first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp.data import load_eval_data
from mesimp.deploy.export_family import INPUT_NAME, OUTPUT_NAME, ExportFamily, Int8Check
from mesimp.deploy.verify import check_parity
from mesimp.errors import BadInputError
from mesimp.files.checkpoint import model_from_checkpoint
from mesimp.models import hidden_sizes
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropLinear
from mesimp.nn.swap import unmeprop

__all__ = ["DenseExport", "plain_model"]


def plain_model(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's model with only ``torch.nn`` layers, masks folded into the weights.

    Computes exactly what ``model_from_checkpoint(ckpt)`` computes in eval mode: a masked
    neuron's output is 0 either way.
    """
    model = model_from_checkpoint(ckpt)
    for name, mod in model.named_modules():
        if isinstance(mod, MePropConv2d) and mod.active_width < mod.out_channels:
            # a masked channel is zeroed after its BatchNorm: no plain graph folds that
            raise BadInputError(
                f"the checkpoint holds masked channels ({name}): shrink it first (mesimp shrink)"
            )
    unmeprop(model, types=(MePropConv2d,))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, MePropLinear):
            continue
        # Built on "meta" so no init runs (and the global RNG is left alone).
        lin = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, device="meta")
        keep = mod.mask.to(mod.weight.dtype).detach()
        lin.weight = nn.Parameter(mod.weight.detach() * keep[:, None])
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach() * keep)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    return model.eval()


class DenseExport(ExportFamily):
    """MLPs and CNNs: ``input [batch, features]`` -> ``logits [batch, classes]``."""

    default_exporter = "dynamo"
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}

    def __init__(
        self,
        ckpt: dict[str, Any],
        src: Path,
        *,
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        n_check: int,
        int8: bool,
        int8_mode: str,
    ) -> None:
        if conllu is not None:
            raise BadInputError(
                f"--conllu is for lstm-tagger checkpoints; this one is {ckpt['arch']['model']}"
            )
        self.model = plain_model(ckpt)
        self.public_arch = ckpt["arch"]
        in_features = int(self.public_arch["in_features"])
        self.ds = load_eval_data(data, in_features, required=int8)  # int8 accuracy needs data
        if self.ds is not None:
            self.x_check = self.ds.x_test[:n_check].contiguous()
        else:
            g = torch.Generator().manual_seed(0)
            self.x_check = torch.rand(n_check, in_features, generator=g)
        self.hidden_sizes = hidden_sizes(self.model)
        self.n_check = len(self.x_check)
        self.check_data = self.ds.source if self.ds is not None else "random"

    def example(self) -> torch.Tensor:
        return self.x_check[:2].clone()

    def verify_fp32(self, session: Any) -> tuple[float, float | None]:
        with torch.no_grad():
            self.ref = self.model(self.x_check).numpy()
        got = _run(session, self.x_check.numpy())
        max_abs_diff = check_parity([got], [self.ref], len(self.x_check))
        if self.ds is None:  # no labels: int8 agreement is measured on the parity sample
            self.x_test, self.y_test, self.fp32_logits = self.x_check.numpy(), None, got
            return max_abs_diff, None
        self.x_test, self.y_test = self.ds.x_test.numpy(), self.ds.y_test.numpy()
        self.fp32_logits = _run(session, self.x_test)
        return max_abs_diff, _accuracy(self.fp32_logits, self.y_test)

    def verify_int8(self, session: Any) -> Int8Check:
        q_logits = _run(session, self.x_test)
        agreement = float((q_logits.argmax(-1) == self.fp32_logits.argmax(-1)).mean())
        q_check = q_logits[: len(self.x_check)] if self.ds is not None else q_logits
        return Int8Check(
            accuracy=_accuracy(q_logits, self.y_test) if self.y_test is not None else None,
            agreement=agreement,
            max_abs_diff=float(np.abs(q_check - self.ref).max()),
        )


def _run(session: Any, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float | None:
    return float((logits.argmax(-1) == y).mean()) if len(y) else None
