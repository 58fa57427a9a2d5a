"""What ``export_onnx`` asks of a model family: the interface its families implement.

The export pipeline (``mesimp.deploy.export``) is the same for every checkpoint: export
to a temporary file, check the graph, add metadata, compare onnxruntime with PyTorch,
measure accuracy, optionally quantize and compare again, write atomically. What differs
by family is the model, its inputs and check data, the graph it promises and how
outputs are compared:

* ``DenseExport`` (``export_dense``): feed-forward models (MLPs, CNNs), one input
  ``input [batch, features...]``, checked on test images;
* ``TaggerExport`` and ``RowsExport`` (``export_lstm``): LSTM taggers and row
  classifiers, one ``LSTM`` node per layer with dynamic batch and sequence axes,
  checked on sentences or on images read row by row.

``export_onnx`` picks the family from the checkpoint's ``arch["model"]`` in one place and
then only calls these methods. A family is built from the loaded checkpoint and the
options; it refuses the options it does not take and loads its check data then.
Methods are called in the pipeline's order: ``verify_fp32`` keeps the outputs that
``verify_int8`` compares with.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp._version import __version__

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ExportFamily", "Int8Check", "sha256"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class Int8Check:
    """How the int8 model compares with the fp32 one on a family's check data."""

    accuracy: float | None  # on labelled data, else None
    agreement: float  # fraction of predictions equal to fp32's
    max_abs_diff: float  # on the parity sample


class ExportFamily(ABC):
    """One model family's part in ``export_onnx``."""

    # arch["model"] recorded in the metadata and report as "model" (None: not recorded)
    kind: str | None = None
    default_exporter: str  # when export_onnx is given exporter=None
    int8_ops: list[str] | None = None  # what quantize_dynamic may quantize (None: all)
    agreement_over: str = "test set"  # what int8 agreement counts, in its error message
    input_name: str = INPUT_NAME
    axes: dict[str, dict[int, str]]  # torch_to_onnx's dynamic axes, input and output

    model: nn.Module  # what is exported (eval mode, plain torch.nn layers)
    hidden_sizes: list[int]
    public_arch: dict[str, Any]  # the arch as recorded in the metadata
    n_check: int  # inputs in the parity sample
    check_data: str  # where they come from: a path, or "random"

    @abstractmethod
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
    ) -> None: ...

    def metadata(self, src: Path) -> dict[str, str]:
        """The ``metadata_props`` of the exported file."""
        meta = {"mesimp_version": __version__}
        if self.kind is not None:
            meta["model"] = self.kind
        meta.update(
            hidden_sizes=json.dumps(self.hidden_sizes),
            arch=json.dumps(self.public_arch, sort_keys=True),
            source=src.name,
            source_sha256=sha256(src),
        )
        meta.update(self.extra_metadata())
        return meta

    def extra_metadata(self) -> dict[str, str]:
        """Family-specific metadata, after the common entries."""
        return {}

    @abstractmethod
    def example(self) -> torch.Tensor:
        """The example input the exporter traces."""

    def check_graph(self, proto: Any, exporter: str) -> None:
        """Refuse (``ExportError``) a graph that is not the one this family promises.
        By default nothing is promised beyond what ``onnx.checker`` checks."""
        return None

    @abstractmethod
    def verify_fp32(self, session: Any) -> tuple[float, float | None]:
        """Parity with PyTorch (``VerificationError`` beyond ``verify.PARITY_TOL``), then
        accuracy where there are labels: ``(max_abs_diff, fp32_accuracy)``."""

    def report(self, proto: Any) -> dict[str, Any]:
        """Family fields of the report that follow ``fp32_accuracy``."""
        return {}

    def check_int8_graph(self, payload: bytes, out: Path) -> None:
        """Refuse (``ExportError``) an int8 graph the quantizer did not quantize as promised
        (by default: any graph that passes ``onnx.checker``)."""
        return None

    @abstractmethod
    def verify_int8(self, session: Any) -> Int8Check:
        """The int8 model against the fp32 outputs kept by ``verify_fp32``."""

    def summary(self) -> dict[str, Any]:
        """Family fields that end the report."""
        return {}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the checkpoint an export came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
