"""ONNX export of a checkpoint, verified against PyTorch, with optional int8 quantization.

``export_onnx(ckpt.pt)`` writes ONE self-contained ``.onnx`` file (no ``.onnx.data``
side file) with a dynamic batch axis, input ``input`` ``[batch, in_features]`` and
output ``logits`` ``[batch, classes]`` (for MLPs and CNNs; the LSTM families' inputs and
outputs are in ``export_lstm``). Before the file is written it must pass
``onnx.checker.check_model(full_check=True)`` and a parity check: onnxruntime on real
test images against the PyTorch model, ``max_abs_diff <= 1e-4`` or
``VerificationError``. Files are written atomically, so a failed export leaves
nothing behind.

This module is the pipeline every checkpoint goes through (``export_onnx``); what
differs by model family sits behind one interface, ``export_family.ExportFamily``,
chosen here from ``arch["model"]`` (``FAMILIES``):

* ``export_dense``: MLPs and CNNs (masks folded into the weights);
* ``export_lstm``: LSTM taggers and row classifiers (one ``LSTM`` node per layer,
  dynamic sequence axis; check data from ``lstm_check_data``);
* ``export_parser``: dependency parsers (the transition scorer, int64 feature ids in,
  the vocabularies in the metadata).

The steps they share live in their own modules: ``torch_onnx`` (the one
``torch.onnx.export`` call and why the dynamo exporter is the default), ``verify``
(onnx.checker, parity within ``PARITY_TOL``), ``quantize`` (dynamic int8; the modes
are ``mesimp.deploy.int8``'s).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mesimp.deploy.export_dense import DenseExport, plain_model
from mesimp.deploy.export_family import OUTPUT_NAME, ExportFamily
from mesimp.deploy.export_lstm import RowsExport, TaggerExport
from mesimp.deploy.export_parser import ParserExport
from mesimp.deploy.int8 import DEFAULT_INT8_MODE, get_int8_mode
from mesimp.deploy.quantize import quantize_int8
from mesimp.deploy.torch_onnx import EXPORTERS, ExportError, torch_to_onnx
from mesimp.deploy.verify import PARITY_TOL, check_model, ort_session, set_metadata
from mesimp.errors import BadInputError, VerificationError
from mesimp.files.atomic import atomic_write_bytes, check_writable
from mesimp.files.checkpoint import load_checkpoint
from mesimp.models import count_macs, count_params

__all__ = [
    "EXPORTERS",
    "ExportError",
    "INT8_MIN_AGREEMENT",
    "PARITY_TOL",  # to read; the checks read (and tests patch) verify.PARITY_TOL
    "export_onnx",
    "plain_model",
    "torch_to_onnx",
]

# int8 predictions must agree with fp32 ones on at least this fraction of the inputs.
INT8_MIN_AGREEMENT = 0.95
# The family of each arch["model"]; any other model (MLP, CNN): DenseExport.
FAMILIES: dict[str, type[ExportFamily]] = {
    "lstm-tagger": TaggerExport,
    "lstm-rows": RowsExport,
    "parser": ParserExport,
}


def default_output(checkpoint_path: str | os.PathLike, int8: bool = False) -> Path:
    """``model.pt`` -> ``model.onnx`` (``model.int8.onnx`` for int8)."""
    return Path(checkpoint_path).with_suffix(".int8.onnx" if int8 else ".onnx")


def export_onnx(
    checkpoint_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    opset: int = 18,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    n_check: int = 1000,
    *,
    exporter: str | None = None,
    conllu: str | os.PathLike | None = None,
    int8_mode: str = DEFAULT_INT8_MODE,
    min_agreement: float = INT8_MIN_AGREEMENT,
) -> dict[str, Any]:
    """Export a checkpoint to one verified ONNX file; returns the ``export --json`` object.

    Parity is checked on the first ``n_check`` test images of ``data`` (default data
    locations when ``None``; random inputs in [0, 1) if none is found and ``int8`` is
    off). With ``int8`` the file holds the dynamically quantized model; ``max_abs_diff``
    is still the fp32 graph's parity, ``int8_max_abs_diff`` and ``int8_agreement``
    (fraction of test predictions equal to the fp32 ones) describe the int8 model.

    LSTM checkpoints (``mesimp.deploy.export_lstm``): ``conllu`` is a tagger's check file (its first
    ``n_check`` sentences for parity, all of them for token accuracy); ``data`` the
    images of a row classifier. ``int8_mode``: a key of ``mesimp.deploy.int8.INT8_MODES``.
    ``min_agreement``: the int8 file is written only if its predictions agree with
    fp32's on at least this fraction (0 accepts any; for an untrained model, whose
    logits are near ties, agreement says nothing about the quantization).
    ``exporter=None`` picks ``"dynamo"`` for MLPs and
    ``"torchscript"`` for LSTM models (see the module docstring).
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise BadInputError(f"opset must be an integer, got {opset!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not 13 <= opset <= max_opset:
        raise BadInputError(f"opset must be in [13, {max_opset}], got {opset}")
    if isinstance(n_check, bool) or not isinstance(n_check, int) or n_check <= 0:
        raise BadInputError(f"n_check must be a positive integer, got {n_check!r}")
    if exporter is not None and exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")

    get_int8_mode(int8_mode)
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)):
        raise BadInputError(f"min_agreement must be a number, got {min_agreement!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise BadInputError(f"min_agreement must be in [0, 1], got {min_agreement}")
    src = Path(checkpoint_path)
    ckpt = load_checkpoint(src)
    out = Path(output) if output is not None else default_output(src, int8)
    if out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx")
    if out.exists() and out.resolve() == src.resolve():
        raise BadInputError(f"output {out} would overwrite the checkpoint")
    check_writable(out)

    family = family_of(ckpt["arch"])(
        ckpt,
        src,
        data=data,
        conllu=conllu,
        n_check=n_check,
        int8=int8,
        int8_mode=int8_mode,
    )
    exporter = exporter or family.default_exporter
    meta = family.metadata(src)

    with tempfile.TemporaryDirectory(prefix="mesimp-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        torch_to_onnx(
            family.model,
            (family.example(),),
            raw,
            opset,
            family.axes,
            [family.input_name],
            [OUTPUT_NAME],
            exporter=exporter,
        )
        proto = onnx.load(str(raw))
        family.check_graph(proto, exporter)
        set_metadata(proto, meta)
        check_model(proto, "exported model")
        fp32_bytes = proto.SerializeToString()

        # Parity: onnxruntime vs PyTorch on real inputs, then accuracy.
        sess = ort_session(fp32_bytes)
        max_abs_diff, fp32_accuracy = family.verify_fp32(sess)
        result: dict[str, Any] = {"path": str(out)}
        if family.kind is not None:
            result["model"] = family.kind
        result.update(
            opset=opset,
            exporter=exporter,
            max_abs_diff=max_abs_diff,
            n_check=family.n_check,
            check_data=family.check_data,
            int8=bool(int8),
            fp32_accuracy=fp32_accuracy,
            **family.report(proto),
        )

        payload = fp32_bytes
        if int8:
            payload, stats = quantize_int8(fp32_bytes, Path(tmp), meta, int8_mode, family.int8_ops)
            family.check_int8_graph(payload, out)
            q = family.verify_int8(ort_session(payload))
            result.update(
                int8_accuracy=q.accuracy,
                int8_agreement=q.agreement,
                int8_max_abs_diff=q.max_abs_diff,
                **stats,
            )
            if q.agreement < min_agreement:
                raise VerificationError(
                    f"int8 predictions agree with fp32 on only {q.agreement:.1%} of the "
                    f"{family.agreement_over} (< {min_agreement:.1%}); not writing {out}"
                )

    atomic_write_bytes(out, payload)
    result.update(
        hidden_sizes=family.hidden_sizes,
        params=count_params(family.model),
        macs=count_macs(family.model),  # LSTMs: per time step, token or image row
        source=str(src),
        source_sha256=meta["source_sha256"],
        size_bytes=out.stat().st_size,
        **family.summary(),
    )
    return result


def family_of(arch: dict[str, Any]) -> type[ExportFamily]:
    """The export family of a checkpoint's ``arch`` (``FAMILIES``, else ``DenseExport``,
    which also gets anything malformed for ``model_from_checkpoint`` to refuse)."""
    model = arch.get("model")
    return FAMILIES.get(model, DenseExport) if isinstance(model, str) else DenseExport
