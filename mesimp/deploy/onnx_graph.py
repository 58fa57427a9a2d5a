"""Reading an ONNX file for bench and ``mesimp info``: what the graph itself says.

``load_model_info`` opens any ``.onnx`` file (ours or a user's) without running it and
reports what a comparison needs: the input signature and the kind of model it implies
(``KIND_NAMES``), MACs and parameters counted from the initializers, and the advisory
``metadata_props`` that ``mesimp export`` writes. Nothing here depends on onnxruntime,
so a malformed or forged file is refused (one line, ``BadInputError``) before any
session is opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mesimp.deploy.ort_errors import one_line
from mesimp.errors import BadInputError

__all__ = ["KIND_NAMES", "graph_macs", "load_model_info"]

_MATMUL_OPS = ("Gemm", "MatMul", "MatMulInteger")
_LSTM_OPS = ("LSTM", "DynamicQuantizeLSTM")
# The kinds ``_input_signature`` tells apart, as named in messages.
KIND_NAMES = {
    "dense": "an MLP",
    "rows": "an LSTM row classifier",
    "tagger": "an LSTM tagger",
    "parser": "a dependency parser",
}


def _load_onnx(path: Path) -> Any:
    import onnx

    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not an ONNX model")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{path}: not readable")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError, ... : not an ONNX file
        raise BadInputError(f"{path}: not an ONNX model ({one_line(e)})") from e
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise BadInputError(f"{path}: not an ONNX model (empty graph)")
    return proto


def graph_macs(proto: Any) -> int:
    """Multiply-accumulates per example: the sum of the weight sizes of every
    Gemm/MatMul/MatMulInteger whose weight (either operand) is a 2-D initializer, plus
    the ``W`` and ``R`` weight sizes of every ``LSTM`` (or onnxruntime's
    ``DynamicQuantizeLSTM``), i.e. ``4h * (input + h)``: for LSTM models MACs per time
    step (a token, an image row), as ``mesimp.models.count_macs`` counts them."""
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    macs = _conv_macs(proto, inits)
    for node in proto.graph.node:
        if node.op_type in _LSTM_OPS:
            for name in node.input[1:3]:  # W, R (initializers; either layout)
                dims = inits.get(name)
                if dims is not None and len(dims) == 3:
                    macs += math.prod(dims)
            continue
        if node.op_type not in _MATMUL_OPS:
            continue
        for name in node.input[:2]:
            dims = inits.get(name)
            if dims is not None and len(dims) == 2:
                macs += dims[0] * dims[1]
                break
    return macs


def _conv_macs(proto: Any, inits: dict[str, tuple[int, ...]]) -> int:
    """Per example, every ``Conv``/``ConvInteger`` with a 4-D weight initializer:
    output height x width (from onnx shape inference) x the weight's size."""
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvInteger")]
    if not convs:
        return 0
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # shape inference is best effort here: no spatial size, no count
        return 0
    shapes = {}
    for vi in [*graph.value_info, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    macs = 0
    for node in convs:
        w, out = inits.get(node.input[1]), shapes.get(node.output[0])
        if w is None or len(w) != 4 or not out or len(out) != 4 or None in out[2:]:
            continue
        macs += out[2] * out[3] * math.prod(w)
    return macs


def _graph_params(proto: Any) -> int:
    """Elements of all non-scalar initializers (weights and biases)."""
    return sum(math.prod(t.dims) for t in proto.graph.initializer if len(t.dims) >= 1)


def _input_signature(proto: Any, path: Path) -> tuple[str, tuple[int | None, ...], int | None, str]:
    """(input name, per-example shape, fixed batch size or None, kind) of a one-input model.

    Kinds: ``"dense"``, a float input with fixed feature axes (an MLP); and, for graphs
    with an ``LSTM``/``DynamicQuantizeLSTM`` node, ``"tagger"`` (int64 ``[batch, seq]``)
    and ``"rows"`` (float ``[batch, steps, width]``, fixed width); without one, an int64
    ``[batch, features]`` input is ``"parser"`` (feature ids). A dynamic sequence
    axis is ``None`` in the shape.
    """
    init_names = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise BadInputError(f"{path}: expected one input, the model has {len(inputs)}")
    inp = inputs[0]
    if not isinstance(inp.name, str):  # protobuf hands back bytes for invalid UTF-8
        raise BadInputError(f"{path}: the input name {inp.name!r} is not valid UTF-8")
    tt = inp.type.tensor_type
    dims = list(tt.shape.dim)
    fixed = int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None
    lstm = any(n.op_type in _LSTM_OPS for n in proto.graph.node)
    if lstm and tt.elem_type == 7 and len(dims) == 2:  # onnx.TensorProto.INT64
        seq = int(dims[1].dim_value) if dims[1].HasField("dim_value") else None
        return inp.name, (seq,), fixed, "tagger"
    if lstm and tt.elem_type == 7 and len(dims) == 3 and dims[2].HasField("dim_value"):
        # a tagger with sub-word features: [batch, seq, 1 + features] ids
        seq = int(dims[1].dim_value) if dims[1].HasField("dim_value") else None
        return inp.name, (seq, int(dims[2].dim_value)), fixed, "tagger"
    if lstm and tt.elem_type == 1 and len(dims) == 3:
        if not dims[2].HasField("dim_value"):
            raise BadInputError(f"{path}: input {inp.name!r} has a non-fixed row width")
        steps = int(dims[1].dim_value) if dims[1].HasField("dim_value") else None
        return inp.name, (steps, int(dims[2].dim_value)), fixed, "rows"
    if not lstm and tt.elem_type == 7 and len(dims) == 2 and dims[1].HasField("dim_value"):
        return inp.name, (int(dims[1].dim_value),), fixed, "parser"  # feature ids [b, 48]
    if tt.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise BadInputError(f"{path}: input {inp.name!r} is not float32")
    if len(dims) < 2:
        raise BadInputError(f"{path}: input {inp.name!r} must be [batch, features...]")
    rest = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise BadInputError(f"{path}: input {inp.name!r} has a non-fixed feature axis")
        rest.append(int(d.dim_value))
    return inp.name, tuple(rest), fixed, "dense"


def _embedding_rows(proto: Any, input_name: str) -> int | None:
    """Rows of the table a ``Gather`` looks the input's word ids up in (the vocabulary
    size), or None when the graph has no such lookup."""
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) >= 2 and node.input[1] == input_name:
            dims = inits.get(node.input[0])
            if dims is not None and len(dims) == 2 and dims[0] > 0:
                return int(dims[0])
    return None


def _positive_int_or_none(text: str | None) -> int | None:
    try:
        v = int(text) if text is not None else None
    except ValueError:
        return None
    return v if v is not None and 0 < v < 1 << 31 else None


def load_model_info(path: str | os.PathLike, metadata: bool = False) -> dict[str, Any]:
    """What bench reports per model: path, MACs and params from the graph, metadata.

    ``metadata=True`` also returns every (UTF-8) ``metadata_props`` entry under
    ``"metadata"`` and the parsed ``arch`` (for ``mesimp info``), from the same read.
    """
    p = Path(path)
    proto = _load_onnx(p)
    name, shape, fixed, kind = _input_signature(proto, p)
    # (protobuf hands back bytes, not str, for invalid UTF-8: such entries are skipped)
    meta = {m.key: m.value for m in proto.metadata_props if isinstance(m.value, str)}
    if kind == "rows":
        # the rows per image: fixed in the graph, else as exported (metadata), else square
        steps = shape[0] or _positive_int_or_none(meta.get("steps")) or int(shape[1] or 1)
        shape = (steps, shape[1])
    info: dict[str, Any] = {
        "path": str(p),
        "macs": graph_macs(proto),
        "params": _graph_params(proto),
        "size_bytes": p.stat().st_size,
        "input": {"name": name, "shape": list(shape), "batch": fixed, "kind": kind},
    }
    if kind == "tagger":
        info["vocab_size"] = _embedding_rows(proto, name) or _positive_int_or_none(
            meta.get("vocab_size")
        )
        feats = _json_or_none(meta.get("feature_vocab_sizes"))
        if len(shape) == 2:  # feature columns: each one's table size (bench draws below it)
            info["feature_vocab_sizes"] = feats if isinstance(feats, list) else None
    hidden = _json_or_none(meta.get("hidden_sizes"))
    if hidden is not None:
        info["hidden_sizes"] = hidden
    if "quantization" in meta:
        info["quantization"] = meta["quantization"]
    if "int8_mode" in meta:
        info["int8_mode"] = meta["int8_mode"]
        info["int8_portable"] = meta.get("int8_portable") != "false"
    if metadata or kind == "parser":  # a parser's vocabularies are in its metadata
        info["metadata"] = meta
        info["arch"] = _json_or_none(meta.get("arch"))
    return info


def _json_or_none(text: str | None) -> Any:
    """Parsed JSON metadata, or None when absent or malformed (metadata is advisory)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: deeply nested "[[[[..."
        return None
