"""ONNX export of a checkpoint, verified against PyTorch, with optional int8 quantization.

``export_onnx(ckpt.pt)`` writes ONE self-contained ``.onnx`` file (no ``.onnx.data``
side file) with a dynamic batch axis, input ``input`` ``[batch, in_features]`` and
output ``logits`` ``[batch, classes]``. Before the file is written it must pass
``onnx.checker.check_model(full_check=True)`` and a parity check: onnxruntime on real
test images against the PyTorch model, ``max_abs_diff <= 1e-4`` or
``VerificationError``. Files are written atomically, so a failed export leaves
nothing behind.

Masks
    A masked ``MePropLinear`` computes ``linear(x) * mask`` at inference. The export
    folds the mask into the weights (masked rows of ``weight`` and ``bias`` set to 0),
    which gives exactly the same logits with a plain ``Gemm``/``Relu`` graph and no
    ``Mul`` by a mask constant. A masked model keeps its full width (and MACs) in ONNX;
    ``mesimp shrink`` is what makes it physically smaller.

Exporter choice (measured with torch 2.13, onnxscript 0.7, MLP 784-500-500-10)
    Both exporters give the same graph for the MLP (``Gemm, Relu, Gemm, Relu, Gemm``,
    dynamic ``batch``) and both emit one ``LSTM`` node for ``nn.LSTM``. We use the
    ``torch.export``-based exporter (``dynamo=True``, ``external_data=False``):

    * it has been torch.onnx's default and supported path since PyTorch 2.9; the
      TorchScript exporter is deprecated and warns that it will be removed;
    * ``external_data=False`` gives the single file we want.

    Its costs: about 4 s for the first export in a process (0.9 s after), against
    0.1 s for the TorchScript exporter, and chattier logging, which ``_quiet``
    silences. The exporter call lives in one function, ``torch_to_onnx``, which also
    runs the TorchScript exporter (``exporter="torchscript"``), e.g. for the LSTM
    tagger if its graph turns out cleaner that way.

int8
    ``onnxruntime.quantization.quant_pre_process`` (shape inference + graph
    optimization) then ``quantize_dynamic`` with int8 weights, per tensor
    (``per_channel=False``: on the Fashion-MNIST MLPs per-channel scales did not
    improve accuracy measurably and the per-tensor graph is the simpler one).
    Activations are quantized dynamically at run time (``DynamicQuantizeLinear`` +
    ``MatMulInteger``). The check for int8 is accuracy agreement with the fp32 model
    over the test set (exact parity is not expected).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp._version import __version__
from mesimp.atomic import atomic_write_bytes, check_writable
from mesimp.bench import ort_message
from mesimp.checkpoint import load_checkpoint, model_from_checkpoint
from mesimp.data import load_eval_data
from mesimp.errors import BadInputError, MesimpError, VerificationError
from mesimp.layers import MePropLinear
from mesimp.models import count_macs, count_params, hidden_sizes

__all__ = [
    "EXPORTERS",
    "ExportError",
    "INT8_MIN_AGREEMENT",
    "PARITY_TOL",
    "export_onnx",
    "plain_model",
    "torch_to_onnx",
]

PARITY_TOL = 1e-4
# int8 predictions must agree with fp32 ones on at least this fraction of the inputs.
INT8_MIN_AGREEMENT = 0.95
EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# Loggers that print progress or harmless warnings during export/quantization.
_CHATTY_LOGGERS = (
    "",  # onnxruntime.quantization calls logging.warning() on the root logger
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch._export",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
    "onnxruntime",
)


class ExportError(MesimpError):
    """The exporter or the quantizer failed on a model (a runtime failure, exit code 1)."""


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence warnings, chatty loggers and stray prints; yields what was printed.

    Python-level output goes to the yielded buffer; output written straight to file
    descriptors 1 and 2 by C++ code (the TorchScript exporter dumps its whole IR graph
    there on failure) goes to a discarded temp file. Exceptions pass through untouched,
    so real errors still surface (as one line, from the caller).
    """
    buf = io.StringIO()
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _CHATTY_LOGGERS)]
    with contextlib.ExitStack() as stack:
        try:
            for lg, _ in saved:
                lg.setLevel(logging.ERROR)
            stack.enter_context(_fds_to_tempfile())
            stack.enter_context(warnings.catch_warnings())
            stack.enter_context(contextlib.redirect_stdout(buf))
            stack.enter_context(contextlib.redirect_stderr(buf))
            warnings.simplefilter("ignore")
            yield buf
        finally:
            for lg, level in saved:
                lg.setLevel(level)


@contextlib.contextmanager
def _fds_to_tempfile() -> Iterator[None]:
    """Point OS-level stdout/stderr at a temp file for the duration (restored after)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # no such descriptor (e.g. a daemon): nothing to silence
                    continue
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# -- model -------------------------------------------------------------------------------------
def plain_model(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's model with only ``torch.nn`` layers, masks folded into the weights.

    Computes exactly what ``model_from_checkpoint(ckpt)`` computes in eval mode: a masked
    neuron's output is 0 either way.
    """
    model = model_from_checkpoint(ckpt)
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


def torch_to_onnx(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    opset: int,
    dynamic_axes: dict[str, dict[int, str]],
    input_names: list[str],
    output_names: list[str],
    exporter: str = "dynamo",
) -> None:
    """The one place that calls ``torch.onnx.export``; writes a single ONNX file.

    ``dynamic_axes`` maps every input and output name to ``{axis: dim_name}``, the
    TorchScript exporter's format; for the dynamo exporter it is translated to
    ``dynamic_shapes`` (inputs only; output shapes follow). Logging and warnings are
    silenced; failures raise ``ExportError`` with the exporter's first line.
    """
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    kwargs: dict[str, Any] = {
        "input_names": input_names,
        "output_names": output_names,
        "opset_version": opset,
    }
    if exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}
        shapes = tuple(
            {
                axis: dims.setdefault(name, torch.export.Dim(name))
                for axis, name in dynamic_axes.get(inp, {}).items()
            }
            or None
            for inp in input_names
        )
        kwargs.update(
            dynamo=True,
            external_data=False,
            dynamic_shapes=shapes,
            verbose=False,
            optimize=True,
            report=False,
        )
    else:
        kwargs.update(dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=True)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, example, str(path), **kwargs)
    except Exception as e:  # the exporters raise many unrelated types
        raise ExportError(f"ONNX export failed ({exporter} exporter): {_first_line(e)}") from e
    # The dynamo exporter converts its opset-18 graph to older opsets with onnx's
    # version converter and, where that fails (opset 13 in torch 2.13), quietly keeps 18.
    import onnx

    got = {
        o.version
        for o in onnx.load(str(path), load_external_data=False).opset_import
        if o.domain in ("", "ai.onnx")
    }
    if got != {opset}:
        raise BadInputError(
            f"the {exporter} exporter produced opset {sorted(got)} instead of {opset}; "
            f"choose another --opset (18, the default, always works)"
        )


# -- onnx helpers ------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _set_metadata(model_proto: Any, meta: dict[str, str]) -> None:
    keep = [p for p in model_proto.metadata_props if p.key not in meta]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in meta.items():
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value


def _check(model_proto: Any, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError, InferenceError, ...
        raise VerificationError(f"{what} fails onnx.checker: {_first_line(e)}") from e


def _session(model_bytes: bytes, threads: int = 0) -> Any:
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


def _run(session: Any, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float | None:
    return float((logits.argmax(-1) == y).mean()) if len(y) else None


# -- export ------------------------------------------------------------------------------------
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
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Export a checkpoint to one verified ONNX file; returns the ``export --json`` object.

    Parity is checked on the first ``n_check`` test images of ``data`` (default data
    locations when ``None``; random inputs in [0, 1) if none is found and ``int8`` is
    off). With ``int8`` the file holds the dynamically quantized model; ``max_abs_diff``
    is still the fp32 graph's parity, ``int8_max_abs_diff`` and ``int8_agreement``
    (fraction of test predictions equal to the fp32 ones) describe the int8 model.
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int):
        raise BadInputError(f"opset must be an integer, got {opset!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not 13 <= opset <= max_opset:
        raise BadInputError(f"opset must be in [13, {max_opset}], got {opset}")
    if isinstance(n_check, bool) or not isinstance(n_check, int) or n_check <= 0:
        raise BadInputError(f"n_check must be a positive integer, got {n_check!r}")
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")

    src = Path(checkpoint_path)
    ckpt = load_checkpoint(src)
    out = Path(output) if output is not None else default_output(src, int8)
    if out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx")
    if out.exists() and out.resolve() == src.resolve():
        raise BadInputError(f"output {out} would overwrite the checkpoint")
    check_writable(out)

    model = plain_model(ckpt)
    arch = ckpt["arch"]
    in_features = int(arch["in_features"])
    ds = load_eval_data(data, in_features, required=int8)  # int8 accuracy needs data
    if ds is not None:
        x_check = ds.x_test[:n_check].contiguous()
    else:
        x_check = torch.rand(n_check, in_features, generator=torch.Generator().manual_seed(0))

    sizes = hidden_sizes(model)
    meta = {
        "mesimp_version": __version__,
        "hidden_sizes": json.dumps(sizes),
        "arch": json.dumps(arch, sort_keys=True),
        "source": src.name,
        "source_sha256": _sha256(src),
    }

    with tempfile.TemporaryDirectory(prefix="mesimp-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        torch_to_onnx(
            model,
            (x_check[:2].clone(),),
            raw,
            opset,
            {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            [INPUT_NAME],
            [OUTPUT_NAME],
            exporter=exporter,
        )
        if (Path(tmp) / "model.onnx.data").exists():  # guard the single-file promise
            raise ExportError("the exporter wrote external data; expected a single file")
        proto = onnx.load(str(raw))
        _set_metadata(proto, meta)
        _check(proto, "exported model")
        fp32_bytes = proto.SerializeToString()

        # Parity: onnxruntime vs PyTorch on real inputs.
        sess = _session(fp32_bytes)
        with torch.no_grad():
            ref = model(x_check).numpy()
        got = _run(sess, x_check.numpy())
        if got.shape != ref.shape:
            raise VerificationError(f"ONNX output shape {got.shape} != PyTorch's {ref.shape}")
        max_abs_diff = float(np.abs(got - ref).max()) if ref.size else 0.0
        if not max_abs_diff <= PARITY_TOL:  # also catches NaN
            raise VerificationError(
                f"ONNX and PyTorch outputs differ by {max_abs_diff:.3g} > {PARITY_TOL:g} on "
                f"{len(x_check)} inputs; the export is not trustworthy"
            )
        result: dict[str, Any] = {
            "path": str(out),
            "opset": opset,
            "exporter": exporter,
            "max_abs_diff": max_abs_diff,
            "n_check": len(x_check),
            "check_data": ds.source if ds is not None else "random",
            "int8": bool(int8),
            "fp32_accuracy": None,
        }
        if ds is not None:
            x_test, y_test = ds.x_test.numpy(), ds.y_test.numpy()
            fp32_logits = _run(sess, x_test)
            result["fp32_accuracy"] = _accuracy(fp32_logits, y_test)
        else:
            x_test, y_test, fp32_logits = x_check.numpy(), None, got

        payload = fp32_bytes
        if int8:
            payload, stats = _quantize_int8(fp32_bytes, Path(tmp), meta)
            qsess = _session(payload)
            q_logits = _run(qsess, x_test)
            agreement = float((q_logits.argmax(-1) == fp32_logits.argmax(-1)).mean())
            q_check = q_logits[: len(x_check)] if ds is not None else q_logits
            result.update(
                int8_accuracy=_accuracy(q_logits, y_test) if y_test is not None else None,
                int8_agreement=agreement,
                int8_max_abs_diff=float(np.abs(q_check - ref).max()),
                **stats,
            )
            if agreement < INT8_MIN_AGREEMENT:
                raise VerificationError(
                    f"int8 predictions agree with fp32 on only {agreement:.1%} of the test set "
                    f"(< {INT8_MIN_AGREEMENT:.0%}); not writing {out}"
                )

    atomic_write_bytes(out, payload)
    result.update(
        hidden_sizes=sizes,
        params=count_params(model),
        macs=count_macs(model),
        source=str(src),
        source_sha256=meta["source_sha256"],
        size_bytes=out.stat().st_size,
    )
    return result


def _quantize_int8(fp32_bytes: bytes, tmp: Path, meta: dict[str, str]) -> tuple[bytes, dict]:
    """Dynamic int8 quantization of a float model; returns the bytes and a few stats."""
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    fp32, pre, q = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    fp32.write_bytes(fp32_bytes)
    try:
        with _quiet():
            quant_pre_process(str(fp32), str(pre))
            quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8, per_channel=False)
    except Exception as e:  # the quantizer raises many unrelated types
        raise ExportError(f"int8 quantization failed: {_first_line(e)}") from e
    proto = onnx.load(str(q))
    _set_metadata(proto, {**meta, "quantization": "dynamic int8 weights (onnxruntime)"})
    _check(proto, "int8 model")
    ops = [n.op_type for n in proto.graph.node]
    return proto.SerializeToString(), {"int8_ops": sorted(set(ops))}
