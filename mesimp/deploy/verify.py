"""Checks an exported graph must pass before it is written: onnx.checker, parity.

Every ONNX file mesimp writes (``export_onnx`` for checkpoints, ``export_module`` for
any module) is held in memory until it passes ``onnx.checker.check_model(full_check=
True)`` and onnxruntime's outputs match PyTorch's within ``PARITY_TOL``; only then is
it written (atomically). The metadata goes in before the check, so the checked bytes
are the written bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mesimp.deploy.ort_errors import one_line, ort_message
from mesimp.errors import BadInputError, VerificationError

__all__ = ["PARITY_TOL", "check_model", "check_parity", "max_diff", "ort_session", "set_metadata"]

# onnxruntime vs PyTorch: the largest absolute difference an export may show.
PARITY_TOL = 1e-4


def set_metadata(model_proto: Any, meta: dict[str, str]) -> None:
    """Set ``meta`` in the model's ``metadata_props`` (replacing entries of the same key)."""
    keep = [p for p in model_proto.metadata_props if p.key not in meta]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value


def check_model(model_proto: Any, what: str) -> None:
    """``onnx.checker`` with ``full_check``, failing as one ``VerificationError`` line."""
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError, InferenceError, ...
        raise VerificationError(f"{what} fails onnx.checker: {one_line(e, 300)}") from e


def ort_session(model_bytes: bytes, threads: int = 0) -> Any:
    """An onnxruntime CPU session of an in-memory model (one to check it, not to time it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail/InvalidGraph/... share no base class
        # In practice: an opset newer than this onnxruntime supports (a user's --opset).
        raise BadInputError(
            f"onnxruntime {ort.__version__} cannot load the exported model "
            f"({ort_message(e)}); try the default --opset 18"
        ) from e


def check_parity(got: list[np.ndarray], ref: list[np.ndarray], n_inputs: int) -> float:
    """onnxruntime's outputs against PyTorch's, run by run: same shapes and a max |diff|
    within ``PARITY_TOL`` (NaN fails too), else ``VerificationError``; returns the diff."""
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            raise VerificationError(f"ONNX output shape {g.shape} != PyTorch's {r.shape}")
    max_abs_diff = max_diff(got, ref)
    if not max_abs_diff <= PARITY_TOL:
        raise VerificationError(
            f"ONNX and PyTorch outputs differ by {max_abs_diff:.3g} > {PARITY_TOL:g} on "
            f"{n_inputs} inputs; the export is not trustworthy"
        )
    return max_abs_diff


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over runs (NaN if any value is NaN, so a ``<=`` check fails)."""
    diffs = [float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True) if y.size]
    return float(np.max(diffs)) if diffs else 0.0
