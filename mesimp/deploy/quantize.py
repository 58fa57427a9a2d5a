"""Dynamic int8 quantization of an exported fp32 graph (onnxruntime's quantizer).

``onnxruntime.quantization.quant_pre_process`` (shape inference + graph optimization)
then ``quantize_dynamic`` with int8 weights in the format of ``int8_mode`` (default
``s7``: 7-bit int8 weights, exact on every x86-64 CPU; ``mesimp.deploy.int8`` says why
and what the other modes cost), per tensor (``per_channel=False``: on the Fashion-MNIST
MLPs per-channel scales did not improve accuracy measurably and the per-tensor graph is
the simpler one). Activations are quantized dynamically at run time
(``DynamicQuantizeLinear`` + ``MatMulInteger``). The check for int8 is accuracy
agreement with the fp32 model over the test set (exact parity is not expected); each
model family (``mesimp.deploy.export_family``) measures it on its own check data.
"""

from __future__ import annotations

import json
from pathlib import Path

from mesimp.deploy.int8 import get_int8_mode
from mesimp.deploy.ort_errors import one_line
from mesimp.deploy.torch_onnx import ExportError, quiet
from mesimp.deploy.verify import check_model, set_metadata

__all__ = ["quantize_int8"]


def quantize_int8(
    fp32_bytes: bytes,
    tmp: Path,
    meta: dict[str, str],
    mode: str,
    op_types: list[str] | None = None,
) -> tuple[bytes, dict]:
    """Dynamic int8 quantization of a float model; returns the bytes and a few stats.

    ``mode``: a key of ``INT8_MODES`` (see ``mesimp.deploy.int8``). ``op_types``: what
    ``quantize_dynamic`` may quantize (``None``: all it knows)."""
    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    spec = get_int8_mode(mode)

    fp32, pre, q = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    fp32.write_bytes(fp32_bytes)
    try:
        with quiet():
            quant_pre_process(str(fp32), str(pre))
            quantize_dynamic(
                str(pre),
                str(q),
                op_types_to_quantize=op_types,
                weight_type=QuantType.QUInt8 if spec.weight_type == "uint8" else QuantType.QInt8,
                per_channel=False,
                reduce_range=spec.reduce_range,
            )
    except Exception as e:  # the quantizer raises many unrelated types
        raise ExportError(f"int8 quantization failed: {one_line(e, 300)}") from e
    proto = onnx.load(str(q))
    set_metadata(
        proto,
        {
            **meta,
            "quantization": f"dynamic int8 weights (onnxruntime), mode {mode}: {spec.about}",
            "int8_mode": mode,
            "int8_portable": json.dumps(spec.portable),
        },
    )
    check_model(proto, "int8 model")
    ops = [n.op_type for n in proto.graph.node]
    stats = {"int8_ops": sorted(set(ops)), "int8_mode": mode, "int8_portable": spec.portable}
    return proto.SerializeToString(), stats
