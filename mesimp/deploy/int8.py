"""int8 weight formats for onnxruntime's dynamic quantization, and whether this CPU's
integer kernels are exact for each.

Dynamic quantization turns activations into uint8 at run time and multiplies them with
stored int8 (or uint8) weights. onnxruntime's u8s8 GEMM on x86-64 CPUs without VNNI
(AVX2, and AVX-512 without VNNI) uses ``vpmaddubsw``, which adds two u8 x s8 products
into a *saturating* int16: 255 * 127 * 2 = 64,770 does not fit, so sums clip at 32,767
and the model's outputs change with the CPU. ``probe_u8s8_exact`` shows it on the spot
(measured on an AMD EPYC with AVX2: ``MatMulInteger`` of 64 x 255 by 64 x 127 gave
1,048,544 = 32 x 32,767 instead of 2,072,640). VNNI's ``vpdpbusd`` accumulates in int32
and is exact.

The modes (``mesimp export --int8 --int8-mode``), all recorded in the ONNX file's
``metadata_props`` (``int8_mode``, ``int8_portable``):

``s7`` (default)
    int8 weights limited to 7 bits (``reduce_range=True``, |w| <= 64): 255 * 64 * 2 =
    32,640 fits in int16, so the arithmetic is exact on every x86-64 CPU and the same
    file gives the same predictions wherever it is served. onnxruntime's quantization
    guide recommends it for non-VNNI machines; the machine that exports is often not
    the one that serves, so it is the default everywhere. On the demo models it is as
    fast as ``s8`` (the same kernel) and loses no accuracy (``benchmarks/int8_modes.py``).
``u8``
    uint8 weights (U8U8 kernels, which widen to int16 before multiplying: exact
    everywhere), but 1.1-1.4x slower than ``s7`` on an AVX2 CPU. onnxruntime's quantizer
    always stores LSTM weights as int8, so LSTM models refuse this mode.
``s8``
    full-range int8 weights: one more bit of weight precision, and the fastest kernels
    on VNNI CPUs, but it saturates without VNNI. ``int8_portable`` is ``false`` in the
    file, and ``mesimp bench`` warns when it runs such a file on a CPU that saturates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mesimp.errors import BadInputError

__all__ = ["DEFAULT_INT8_MODE", "INT8_MODES", "Int8Mode", "get_int8_mode", "probe_u8s8_exact"]


@dataclass(frozen=True)
class Int8Mode:
    """How ``quantize_dynamic`` stores weights."""

    weight_type: str  # "int8" | "uint8" (activations are always uint8)
    reduce_range: bool  # 7-bit weights
    portable: bool  # exact integer arithmetic on every x86-64 CPU
    lstm: bool  # available for graphs with LSTM nodes
    about: str


INT8_MODES: dict[str, Int8Mode] = {
    "s7": Int8Mode("int8", True, True, True, "int8 weights in 7 bits: exact on every x86-64"),
    "u8": Int8Mode("uint8", False, True, False, "uint8 weights: exact on every x86-64"),
    "s8": Int8Mode("int8", False, False, True, "8-bit int8 weights: saturates without VNNI"),
}
DEFAULT_INT8_MODE = "s7"


def get_int8_mode(name: str) -> Int8Mode:
    """The mode called ``name``, or a one-line ``BadInputError``."""
    if isinstance(name, str) and name in INT8_MODES:
        return INT8_MODES[name]
    raise BadInputError(f"unknown int8 mode {name!r} (choose from {', '.join(INT8_MODES)})")


@functools.cache
def probe_u8s8_exact() -> bool:
    """Whether onnxruntime's u8 x s8 integer GEMM is exact on this CPU (False: it
    saturates, i.e. a CPU without VNNI). One tiny ``MatMulInteger`` whose pair sums
    overflow int16, against numpy's exact product."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    b = np.full((k, n), 127, dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = np.full((4, k), 255, dtype=np.uint8)
    got = sess.run(None, {"a": a})[0].astype(np.int64)
    return bool(np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64)))
