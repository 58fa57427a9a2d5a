"""Property-based fuzzing of the two file parsers users feed untrusted files to.

Every case asserts the same contract: a file either loads or raises a
``mesimp.errors.MesimpError`` subclass with a one-line message (the CLI turns those into
``error: ...`` and an exit code); never another exception type, a hang or a memory
blow-up. Random byte strings are at most 64 KiB.

Examples per parser (``@settings(max_examples=N, deadline=None)`` on each test), 2,080
generated cases in all, about 10 s on a 2-core machine:

* checkpoints, ``load_checkpoint`` (+ ``model_from_checkpoint`` when it loads), 1,150:
    - random bytes (plain, or behind a zip / pickle / torch-zip prefix) ......... 300
    - byte flips and truncations of a valid checkpoint file ..................... 300
    - byte flips / replacement of ``data.pkl`` inside a re-zipped checkpoint .... 200
    - structurally mutated checkpoint dicts saved with ``torch.save`` ........... 300
      (plus 6 explicit examples: huge sizes, wrong-shape masks, non-dict sections)
    - malicious pickles (``__reduce__`` payloads, bare or inside a checkpoint) ... 50
      (plus the fixed-payload test in test_checkpoint.py)
    - 2 pinned regressions the fuzzers found (truncated length field, int persid)
* ONNX, ``mesimp.bench.load_model_info`` (what ``bench`` opens models with), 900:
    - random bytes (plain, or behind a protobuf-looking prefix) ................. 300
    - byte flips and truncations of a valid exported model ...................... 300
    - proto-level mutations (input dims/type, initializers, ops, attributes) .... 200
    - random ``hidden_sizes`` metadata text (+ 3 explicit: deep nesting) ......... 100
* ``bench()`` on proto-mutated models that ``load_model_info`` accepts ............ 30
  (plus 3 explicit: a 2**40 or negative feature axis, a NaN weight)
* the CLI: ``mesimp info`` / ``mesimp bench`` on random bytes: 4 fixed cases.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from mesimp.cli.main import main

from mesimp.deploy.bench import bench, load_model_info
from mesimp.errors import CheckpointError, MesimpError
from mesimp.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.models import MLPConfig, build_model
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

# torch.load warns about the odd pickle protocols random bytes claim
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

MAX_BYTES = 64 * 1024
# Shared by every test: the work dir is module-scoped (hypothesis reuses one path per test).
HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

# ------------------------------------------------------------------------------- strategies


@st.composite
def random_bytes(draw: st.DrawFn) -> bytes:
    """Up to 64 KiB: small strings hypothesis can shrink, or big seeded-random ones."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2048))
    n = draw(st.integers(0, MAX_BYTES))
    return random.Random(draw(st.integers(0, 2**32))).randbytes(n)


@st.composite
def mutated(draw: st.DrawFn, good: bytes) -> bytes:
    """``good`` with up to 8 bytes overwritten and maybe truncated (never longer)."""
    data = bytearray(good)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    else:
        assume(data != good)
    return bytes(data)


def _scalars() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.integers(-3, 10)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=8)
    )


def plain_values() -> st.SearchStrategy[Any]:
    """What ``weights_only`` can load besides tensors: None, bools, ints, floats, str,
    and lists/tuples/dicts of them."""
    return st.recursive(
        _scalars(),
        lambda c: (
            st.lists(c, max_size=3)
            | st.tuples(c, c)
            | st.dictionaries(st.text(max_size=6) | st.integers(-2, 5), c, max_size=3)
        ),
        max_leaves=6,
    )


@st.composite
def small_tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    dtype = draw(
        st.sampled_from(
            [torch.float32, torch.float64, torch.float16, torch.int64, torch.int8, torch.bool]
        )
    )
    t = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(shape)
    if draw(st.booleans()) and t.numel():
        t = t.float() * float(draw(st.sampled_from([1.0, -1.0, float("nan"), float("inf")])))
    return t.to(dtype)


def values() -> st.SearchStrategy[Any]:
    return plain_values() | small_tensors()


# --------------------------------------------------------------------------- checkpoint files


def _valid_ckpt(meprop: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=8, hidden_sizes=[5, 4], out_features=3))
    cfg = None
    if meprop:
        cfg = MePropConfig(k=2, selection="topk")
        meprop_(model, cfg)
        model[0].apply_mask(torch.tensor([True, False, True, True, False]))
        model(torch.randn(6, 8)).sum().backward()
    return make_checkpoint(model, model.config.to_dict(), cfg, train={"seed": 1, "epoch": 1.0})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


class _Quiet(dict):
    """A dict with a short repr, so hypothesis' failure reports stay readable."""

    def __repr__(self) -> str:
        return f"<{', '.join(map(str, self))}>"


@pytest.fixture(scope="module")
def good_ckpt(work) -> dict[str, Any]:
    """The valid dense and meProp checkpoints: dicts and file bytes."""
    out: dict[str, Any] = _Quiet()
    for name in ("dense", "meprop"):
        ckpt = _valid_ckpt(name == "meprop")
        path = save_checkpoint(work / f"{name}.pt", ckpt)
        out[name] = {"dict": ckpt, "bytes": Path(path).read_bytes()}
        # sanity: the unmutated files load
        model_from_checkpoint(load_checkpoint(path))
    return out


def load_or_refuse(path: Path) -> None:
    """``load_checkpoint`` + ``model_from_checkpoint``: success or a one-line MesimpError."""
    try:
        model = model_from_checkpoint(load_checkpoint(path))
    except MesimpError as e:
        assert "\n" not in str(e), str(e)
    else:
        assert isinstance(model, torch.nn.Module)


PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05\x95", b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."]


@settings(max_examples=300, deadline=None, suppress_health_check=HC)
@given(prefix=st.sampled_from(PREFIXES), data=random_bytes())
def test_checkpoint_random_bytes(work, prefix: bytes, data: bytes) -> None:
    path = work / "random.pt"
    path.write_bytes((prefix + data)[:MAX_BYTES])
    load_or_refuse(path)


@settings(max_examples=300, deadline=None, suppress_health_check=HC)
@given(data=st.data(), which=st.sampled_from(["dense", "meprop"]))
def test_checkpoint_flipped_bytes(work, good_ckpt, data, which: str) -> None:
    path = work / "flipped.pt"
    path.write_bytes(data.draw(mutated(good_ckpt[which]["bytes"])))
    load_or_refuse(path)


def _rezip(good: bytes, mutate_pkl) -> bytes:
    """A torch zip with its ``data.pkl`` member replaced (CRCs recomputed, so the mutation
    reaches the unpickler instead of stopping at the zip layer)."""
    src = zipfile.ZipFile(io.BytesIO(good))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("/data.pkl"):
                body = mutate_pkl(body)
            dst.writestr(info.filename, body)
    return buf.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=HC)
@given(data=st.data(), which=st.sampled_from(["dense", "meprop"]), replace=st.booleans())
def test_checkpoint_mutated_pickle_in_valid_zip(
    work, good_ckpt, data, which: str, replace: bool
) -> None:
    good = good_ckpt[which]["bytes"]
    if replace:
        pkl = data.draw(st.sampled_from(PREFIXES[1:])) + data.draw(st.binary(max_size=512))
        blob = _rezip(good, lambda _: pkl)
    else:
        name = next(n for n in zipfile.ZipFile(io.BytesIO(good)).namelist() if "data.pkl" in n)
        pkl = zipfile.ZipFile(io.BytesIO(good)).read(name)
        blob = _rezip(good, lambda _: data.draw(mutated(pkl)))
    path = work / "rezipped.pt"
    path.write_bytes(blob)
    load_or_refuse(path)


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02X\x06\x00",  # truncated length field: struct.error inside torch.load
        b"\x80\x02K\x01Q.",  # BINPERSID of an int: torch raises AssertionError
    ],
    ids=["truncated-length", "persid-int"],
)
def test_checkpoint_pickle_regressions(work, good_ckpt, pkl: bytes) -> None:
    """Inputs the fuzzers above found (fixed in ``load_checkpoint``), pinned."""
    path = work / "regression.pt"
    path.write_bytes(_rezip(good_ckpt["dense"]["bytes"], lambda _: pkl))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ----------------------------------------------------------------- structural mutations

TOP_KEYS = ["format", "version", "mesimp_version", "arch", "state_dict", "meprop", "train"]
ARCH_KEYS = ["in_features", "hidden_sizes", "out_features", "dropout", "model"]
SIZES = st.integers(-5, 12) | st.integers(-(2**63), 2**63 - 1) | st.sampled_from([10**5, 2**40])


@st.composite
def ckpt_mutation(draw: st.DrawFn) -> tuple:
    """One edit of a checkpoint dict, as a tuple the test applies (readable when shrunk)."""
    kind = draw(
        st.sampled_from(
            [
                "drop_top",
                "set_top",
                "version",
                "drop_arch",
                "set_arch",
                "arch_size",
                "arch_hidden",
                "arch_model",
                "drop_sd",
                "set_sd",
                "add_sd",
                "sd_shape",
                "meprop_config",
                "meprop_config_field",
                "meprop_layers",
                "meprop_layer",
                "meprop_layer_field",
            ]
        )
    )
    if kind == "drop_top":
        return (kind, draw(st.sampled_from(TOP_KEYS)))
    if kind == "set_top":
        return (kind, draw(st.sampled_from(TOP_KEYS)), draw(values()))
    if kind == "version":
        v = draw(
            st.integers(-(2**70), 2**70)
            | st.floats()
            | st.text(max_size=4)
            | st.sampled_from(["1", 1.0, True, None, 2**64])
        )
        return (kind, v)
    if kind == "drop_arch":
        return (kind, draw(st.sampled_from(ARCH_KEYS)))
    if kind == "set_arch":
        return (kind, draw(st.sampled_from([*ARCH_KEYS, "extra"])), draw(values()))
    if kind == "arch_size":
        return (kind, draw(st.sampled_from(["in_features", "out_features"])), draw(SIZES))
    if kind == "arch_hidden":
        return (kind, draw(st.lists(SIZES | st.text(max_size=3) | st.floats(), max_size=4)))
    if kind == "arch_model":
        return (kind, draw(st.text(max_size=8) | st.sampled_from(["mlp", "MLP", "transformer"])))
    if kind in ("drop_sd", "set_sd", "sd_shape"):
        key = draw(st.sampled_from([f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]))
        if kind == "drop_sd":
            return (kind, key)
        if kind == "set_sd":
            return (kind, key, draw(values()))
        return (kind, key, draw(st.lists(st.integers(0, 9), max_size=3)))
    if kind == "add_sd":
        return (kind, draw(st.text(max_size=8) | st.integers()), draw(values()))
    if kind == "meprop_config":
        return (kind, draw(values()))
    if kind == "meprop_config_field":
        field = draw(st.sampled_from(["k", "selection", "msbp_alpha", "sparse_grad", "other"]))
        return (kind, field, draw(plain_values()))
    if kind == "meprop_layers":
        return (kind, draw(values()))
    layer = draw(st.sampled_from(["0", "2", "4", "9", "x"]))
    if kind == "meprop_layer":
        return (kind, layer, draw(values()))
    field = draw(st.sampled_from(["hits", "ref", "mask", "other"]))
    return (kind, layer, field, draw(values()))


def _as_dict(obj: Any, key: Any) -> dict:
    """``obj[key]`` made a dict (replacing whatever was there) so a nested edit applies."""
    if not isinstance(obj.get(key), dict):
        obj[key] = {}
    return obj[key]


def apply_mutation(ckpt: dict[str, Any], m: tuple) -> None:
    kind, *args = m
    arch = _as_dict(ckpt, "arch") if "arch" in kind else {}
    if kind == "drop_top":
        ckpt.pop(args[0], None)
    elif kind == "set_top":
        ckpt[args[0]] = args[1]
    elif kind == "version":
        ckpt["version"] = args[0]
    elif kind == "drop_arch":
        arch.pop(args[0], None)
    elif kind == "set_arch":
        arch[args[0]] = args[1]
    elif kind == "arch_size":
        arch[args[0]] = args[1]
    elif kind == "arch_hidden":
        arch["hidden_sizes"] = args[0]
    elif kind == "arch_model":
        arch["model"] = args[0]
    elif kind in ("drop_sd", "set_sd", "add_sd", "sd_shape"):
        sd = _as_dict(ckpt, "state_dict")
        if kind == "drop_sd":
            sd.pop(args[0], None)
        elif kind in ("set_sd", "add_sd"):
            sd[args[0]] = args[1]
        else:
            sd[args[0]] = torch.zeros(args[1])
    else:
        mp = _as_dict(ckpt, "meprop")
        if kind == "meprop_config":
            mp["config"] = args[0]
        elif kind == "meprop_config_field":
            _as_dict(mp, "config")[args[0]] = args[1]
        elif kind == "meprop_layers":
            mp["layers"] = args[0]
        elif kind == "meprop_layer":
            _as_dict(mp, "layers")[args[0]] = args[1]
        else:
            _as_dict(_as_dict(mp, "layers"), args[0])[args[1]] = args[2]


@settings(max_examples=300, deadline=None, suppress_health_check=HC)
@given(
    which=st.sampled_from(["dense", "meprop"]),
    mutations=st.lists(ckpt_mutation(), min_size=1, max_size=3),
)
@example(which="meprop", mutations=[("arch_size", "in_features", 2**40)])
@example(which="dense", mutations=[("arch_hidden", [10**5, 10**5])])
@example(which="meprop", mutations=[("meprop_layer_field", "0", "mask", torch.zeros(7))])
@example(which="meprop", mutations=[("meprop_layers", "0")])
@example(which="meprop", mutations=[("set_top", "meprop", 3)])
@example(which="dense", mutations=[("arch_hidden", ["x"])])
def test_checkpoint_structural_mutations(work, good_ckpt, which: str, mutations) -> None:
    ckpt = copy.deepcopy(good_ckpt[which]["dict"])
    for m in mutations:
        apply_mutation(ckpt, m)
    path = work / "mutated.pt"
    torch.save(ckpt, path)
    load_or_refuse(path)


# ---------------------------------------------------------------------- malicious pickles


def _payload_call(kind: str, marker: Path) -> tuple:
    cmd = f"touch {marker}"
    return {
        "os.system": (os.system, (cmd,)),
        "subprocess": (subprocess.call, (["touch", str(marker)],)),
        "open": (open, (str(marker), "w")),
        "exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
        "eval": (eval, (f"open({str(marker)!r}, 'w')",)),
        "touch": (Path.touch, (marker,)),
        "copyfile": (shutil.copyfile, (__file__, str(marker))),
    }[kind]


class _Evil:
    def __init__(self, call: tuple) -> None:
        self.call = call

    def __reduce__(self):
        return self.call


@settings(max_examples=50, deadline=None, suppress_health_check=HC)
@given(
    kind=st.sampled_from(["os.system", "subprocess", "open", "exec", "eval", "touch", "copyfile"]),
    where=st.sampled_from(["bare", "top", "train", "state_dict", "arch"]),
    container=st.sampled_from(["torch.save", "pickle"]),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
)
def test_malicious_pickles_are_refused(
    work, good_ckpt, kind: str, where: str, container: str, protocol: int
) -> None:
    marker = work / "pwned"
    marker.unlink(missing_ok=True)
    evil = _Evil(_payload_call(kind, marker))
    if where == "bare":
        obj: Any = evil
    else:
        obj = copy.deepcopy(good_ckpt["meprop"]["dict"])
        if where == "top":
            obj["evil"] = evil
        else:
            obj[where]["evil"] = evil
    path = work / "evil.pt"
    if container == "torch.save":
        torch.save(obj, path, pickle_protocol=max(protocol, 2))
    else:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ ONNX


class _QuietBytes(bytes):
    def __repr__(self) -> str:
        return f"<{len(self)} bytes of ONNX>"


@pytest.fixture(scope="module")
def good_onnx(work) -> bytes:
    """A tiny 8-5-3 MLP exported once with the TorchScript exporter, plus mesimp metadata."""
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=8, hidden_sizes=[5], out_features=3)).eval()
    raw = work / "raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (torch.randn(2, 8),),
            str(raw),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(raw))
    for key, value in (("hidden_sizes", "[5]"), ("quantization", "none")):
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    blob = proto.SerializeToString()
    path = work / "good.onnx"
    path.write_bytes(blob)
    info = load_model_info(path)  # sanity: the unmutated model loads
    assert info["input"]["shape"] == [8] and info["hidden_sizes"] == [5]
    return _QuietBytes(blob)


def info_or_refuse(path: Path) -> dict[str, Any] | None:
    try:
        info = load_model_info(path)
    except MesimpError as e:
        assert "\n" not in str(e), str(e)
        return None
    json.dumps(info)  # plain data, as bench --json prints it
    return info


ONNX_PREFIXES = [b"", b"\x08\x07", b"\x08\x08\x12\x07pytorch", b":\x00"]


@settings(max_examples=300, deadline=None, suppress_health_check=HC)
@given(prefix=st.sampled_from(ONNX_PREFIXES), data=random_bytes())
def test_onnx_random_bytes(work, prefix: bytes, data: bytes) -> None:
    path = work / "x.onnx"
    path.write_bytes((prefix + data)[:MAX_BYTES])
    info_or_refuse(path)


@settings(max_examples=300, deadline=None, suppress_health_check=HC)
@given(data=st.data())
def test_onnx_flipped_bytes(work, good_onnx, data) -> None:
    path = work / "flipped.onnx"
    path.write_bytes(data.draw(mutated(good_onnx)))
    info_or_refuse(path)


@settings(max_examples=100, deadline=None, suppress_health_check=HC)
@given(text=st.text(max_size=64))
@example(text="[" * 100_000)
@example(text='{"a": ' * 50_000)
@example(text="1e999999")
def test_onnx_hidden_sizes_metadata(work, good_onnx, text: str) -> None:
    proto = onnx.load_from_string(good_onnx)
    for prop in proto.metadata_props:
        if prop.key == "hidden_sizes":
            prop.value = text
    path = work / "meta.onnx"
    path.write_bytes(proto.SerializeToString())
    assert info_or_refuse(path) is not None


DIMS = st.integers(-3, 16) | st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)])
OPS = ["Gemm", "MatMul", "Relu", "Add", "Identity", "Softmax", "Loop", "NoSuchOp"]


@st.composite
def onnx_mutation(draw: st.DrawFn) -> tuple:
    """One edit of the model proto; the result still parses as ONNX (it may not run)."""
    kind = draw(
        st.sampled_from(
            [
                "input_dim",
                "input_dim_param",
                "input_rank",
                "input_elem_type",
                "init_dims",
                "init_dtype",
                "init_bytes",
                "op_type",
                "drop_node",
                "attr",
                "rename_input",
                "opset",
                "drop_output",
                "metadata",
            ]
        )
    )
    if kind == "input_dim":
        return (kind, draw(st.integers(0, 1)), draw(DIMS))
    if kind == "input_dim_param":
        return (kind, draw(st.integers(0, 1)))
    if kind == "input_rank":
        return (kind, draw(st.lists(DIMS, max_size=4)))
    if kind == "input_elem_type":
        return (kind, draw(st.integers(0, 16)))
    if kind == "init_dims":
        return (kind, draw(st.integers(0, 3)), draw(st.lists(st.integers(-2, 9), max_size=3)))
    if kind == "init_dtype":
        return (kind, draw(st.integers(0, 3)), draw(st.integers(0, 16)))
    if kind == "init_bytes":
        return (kind, draw(st.integers(0, 3)), draw(st.integers(0, 200)), draw(st.integers(0, 255)))
    if kind == "op_type":
        return (kind, draw(st.integers(0, 2)), draw(st.sampled_from(OPS)))
    if kind == "drop_node":
        return (kind, draw(st.integers(0, 2)))
    if kind == "attr":
        name = draw(st.sampled_from(["alpha", "beta", "transA", "transB"]))
        return (kind, draw(st.integers(0, 2)), name, draw(st.integers(-2, 3) | st.floats()))
    if kind == "rename_input":
        return (kind, draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.text(max_size=4)))
    if kind == "opset":
        return (kind, draw(st.integers(0, 30)))
    if kind == "drop_output":
        return (kind,)
    return (kind, draw(st.sampled_from(["hidden_sizes", "quantization"])), draw(st.text()))


def apply_onnx_mutation(proto: Any, m: tuple) -> None:
    kind, *args = m
    graph = proto.graph
    shape = graph.input[0].type.tensor_type.shape if graph.input else None
    if kind == "input_dim" and shape is not None and args[0] < len(shape.dim):
        shape.dim[args[0]].dim_value = args[1]
    elif kind == "input_dim_param" and shape is not None and args[0] < len(shape.dim):
        shape.dim[args[0]].dim_param = "n"
    elif kind == "input_rank" and shape is not None:
        del shape.dim[:]
        for d in args[0]:
            shape.dim.add().dim_value = d
    elif kind == "input_elem_type" and graph.input:
        graph.input[0].type.tensor_type.elem_type = args[0]
    elif kind.startswith("init_") and args[0] < len(graph.initializer):
        init = graph.initializer[args[0]]
        if kind == "init_dims":
            del init.dims[:]
            init.dims.extend(args[1])
        elif kind == "init_dtype":
            init.data_type = args[1]
        elif init.raw_data:
            raw = bytearray(init.raw_data)
            raw[args[1] % len(raw)] = args[2]
            init.raw_data = bytes(raw)
    elif kind in ("op_type", "drop_node", "attr", "rename_input") and args[0] < len(graph.node):
        node = graph.node[args[0]]
        if kind == "op_type":
            node.op_type = args[1]
        elif kind == "drop_node":
            del graph.node[args[0]]
        elif kind == "attr":
            for a in node.attribute:
                if a.name == args[1]:
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute(args[1], args[2]))
        elif args[1] < len(node.input):
            node.input[args[1]] = args[2]
    elif kind == "opset":
        proto.opset_import[0].version = args[0]
    elif kind == "drop_output":
        del graph.output[:]
    elif kind == "metadata":
        for prop in proto.metadata_props:
            if prop.key == args[0]:
                prop.value = args[1]


def _mutated_onnx(good: bytes, mutations: list[tuple]) -> bytes:
    proto = onnx.load_from_string(good)
    for m in mutations:
        apply_onnx_mutation(proto, m)
    return proto.SerializeToString()


@settings(max_examples=200, deadline=None, suppress_health_check=HC)
@given(mutations=st.lists(onnx_mutation(), min_size=1, max_size=3))
def test_onnx_structural_mutations(work, good_onnx, mutations) -> None:
    path = work / "structural.onnx"
    path.write_bytes(_mutated_onnx(good_onnx, mutations))
    info_or_refuse(path)


BENCH_HC = [*HC, HealthCheck.filter_too_much]


@settings(max_examples=30, deadline=None, suppress_health_check=BENCH_HC)
@given(mutations=st.lists(onnx_mutation(), min_size=1, max_size=2))
@example(mutations=[("input_dim", 1, 2**40)])
@example(mutations=[("input_dim", 1, -1)])
@example(mutations=[("init_bytes", 0, 3, 0xFF), ("init_bytes", 0, 2, 0xC0)])  # a NaN weight
def test_bench_on_mutated_models(work, good_onnx, mutations) -> None:
    """``bench`` on models that ``load_model_info`` accepts: a result or a MesimpError."""
    path = work / "bench.onnx"
    path.write_bytes(_mutated_onnx(good_onnx, mutations))
    assume(info_or_refuse(path) is not None)
    try:
        out = bench([path], batch_sizes=(1,), threads=(1,), repeat=2, warmup=0, progress=False)
    except MesimpError as e:
        assert "\n" not in str(e)
    else:
        assert [r["runs"] for r in out["results"]] == [2]


# ------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("x.pt", ["info"]),
        ("x.pt", ["info", "--json"]),
        (
            "x.onnx",
            ["bench", "--batch-sizes", "1", "--threads", "1", "--repeat", "2", "--warmup", "0"],
        ),
        ("x.onnx", ["bench", "--no-progress", "--json"]),
    ],
)
def test_cli_random_bytes_one_error_line(tmp_path, capsys, name: str, argv: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(SystemExit) as e:
        main([*argv, str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0]


@pytest.mark.parametrize("train", [5, "x", [1, 2], {"metrics": 3}, {"metrics": [0.5]}])
def test_info_refuses_malformed_train_section(tmp_path, train, capsys):
    """`mesimp info` on a checkpoint whose `train` (or `train.metrics`) is not a dict."""
    from mesimp.cli.main import main

    from mesimp.models import MLPConfig, build_model

    model = build_model(MLPConfig(in_features=8, hidden_sizes=[5], out_features=3))
    ckpt = make_checkpoint(model, model.config.to_dict())
    ckpt["train"] = train
    path = tmp_path / "m.pt"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as e:
        main(["info", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
