"""int8 weight formats (``mesimp.deploy.int8``): exactness on this CPU and on every other, and
agreement with fp32 on models trained for a few epochs on real data.

What depends on the CPU, and what these tests assert about it:

* onnxruntime's u8 x s8 GEMM saturates on x86-64 CPUs without VNNI. The probe test
  accepts both outcomes for full-range int8 weights (exact, or the known saturated
  value) and asserts exactness only where it holds on every CPU (7-bit int8 and uint8
  weights).
* The agreement thresholds use trained models (an untrained model's logits are near
  ties, so its agreement says nothing). Modes ``s7`` and ``u8`` do exact integer
  arithmetic everywhere, so their agreement is the same on every CPU up to float
  rounding. ``s8`` is exact on VNNI CPUs and saturates elsewhere, so its agreement does
  depend on the CPU: its threshold holds on this model on a saturating CPU (AVX2, no
  VNNI: the worst case, measured) and with exact arithmetic it is the plain 8-bit
  quantization error, smaller than ``s7``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FMNIST
from helpers import files_in, run_main
from onnx import TensorProto, helper, numpy_helper

from mesimp.data import load_idx
from mesimp.data.tasks import tagging_data
from mesimp.deploy.bench import bench, load_model_info
from mesimp.deploy.export import export_onnx
from mesimp.deploy.int8 import DEFAULT_INT8_MODE, INT8_MODES, get_int8_mode, probe_u8s8_exact
from mesimp.errors import BadInputError
from mesimp.training.loop import TrainConfig, train
from mesimp.training.sequence import train_lstm

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
MIN_AGREEMENT = 0.99
N_TEST = 2000  # images: one disagreement is 0.05 %


# --------------------------------------------------------------------------------------
# the integer kernels themselves
# --------------------------------------------------------------------------------------
def _matmul_integer(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    k, n = b.shape
    btype = TensorProto.INT8 if b.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(b, "b")],
    )
    assert btype in (TensorProto.INT8, TensorProto.UINT8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"a": a})[0].astype(np.int64)


def test_which_weight_ranges_are_exact_on_every_cpu():
    k = 64
    a = np.full((3, k), 255, np.uint8)
    # 7-bit int8 weights (s7) and uint8 weights (u8): exact on every x86-64 CPU
    for b in (np.full((k, 8), 64, np.int8), np.full((k, 8), -64, np.int8)):
        np.testing.assert_array_equal(_matmul_integer(b, a), a.astype(np.int64) @ b)
    b = np.full((k, 8), 255, np.uint8)
    np.testing.assert_array_equal(_matmul_integer(b, a), a.astype(np.int64) @ b)
    # full-range int8 weights (s8): exact with VNNI; without it, every pair of products
    # (255 * 127 * 2 = 64,770) clips to int16's 32,767. Both are correct CPU behaviour.
    b = np.full((k, 8), 127, np.int8)
    got = int(_matmul_integer(b, a)[0, 0])
    exact = 255 * 127 * k
    assert got in (exact, 32767 * (k // 2))
    assert probe_u8s8_exact() is (got == exact)  # the library's probe agrees


def test_modes_are_named_and_validated():
    assert DEFAULT_INT8_MODE == "s7" and INT8_MODES["s7"].portable
    assert INT8_MODES["u8"].portable and not INT8_MODES["u8"].lstm
    assert not INT8_MODES["s8"].portable
    for bad in ("S7", "int8", "", None, 7):
        with pytest.raises(BadInputError, match="unknown int8 mode"):
            get_int8_mode(bad)


# --------------------------------------------------------------------------------------
# trained models on real data
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, Path]:
    """784-128-128-10 trained 3 epochs on 5,000 real Fashion-MNIST images; the data file
    holds 2,000 test images for the agreement."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")
    d = tmp_path_factory.mktemp("int8-mlp")
    npz = d / "fmnist.npz"
    np.savez(
        npz,
        x_train=load_idx(FMNIST / "train-images-idx3-ubyte.gz")[:5100],
        y_train=load_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:5100],
        x_test=load_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:N_TEST],
        y_test=load_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:N_TEST],
    )
    ckpt = d / "mlp.pt"
    cfg = TrainConfig(
        data=str(npz), hidden=128, layers=2, epochs=3, dev_size=100, output=str(ckpt), seed=1
    )
    r = train(cfg, progress=False, log=lambda _m: None)
    assert r["best"]["test_accuracy"] > 0.75  # it learned: agreement is meaningful
    return ckpt, npz


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-layer h=64 tagger trained 3 epochs on EWT dev; checked on the EWT test file."""
    dev, test = EWT / "en_ewt-ud-dev.conllu", EWT / "en_ewt-ud-test.conllu"
    if not (dev.is_file() and test.is_file()):
        pytest.skip(f"UD English EWT not found under {EWT}")
    ckpt = tmp_path_factory.mktemp("int8-tagger") / "tagger.pt"
    r = train_lstm(
        tagging_data(dev, test),
        hidden=[64],
        emb_dim=32,
        epochs=3,
        batch_size=32,
        lr=1e-2,
        seed=1,
        output=ckpt,
        progress=False,
    )
    assert r["best"]["test_accuracy"] > 0.7
    return ckpt, test


@pytest.mark.parametrize("mode", list(INT8_MODES))
def test_mlp_int8_agrees_with_fp32_in_every_mode(mode, mlp, tmp_path):
    ckpt, npz = mlp
    r = export_onnx(ckpt, tmp_path / f"{mode}.onnx", int8=True, int8_mode=mode, data=npz)
    # our own count, with onnxruntime, over the 2,000 test images
    data = np.load(npz)
    x = (data["x_test"].reshape(N_TEST, -1) / 255.0).astype(np.float32)
    fp32 = _run(export_onnx(ckpt, tmp_path / "fp32.onnx", data=npz)["path"], x)
    q = _run(r["path"], x)
    agreement = float((q.argmax(1) == fp32.argmax(1)).mean())
    assert agreement == pytest.approx(r["int8_agreement"]) and agreement >= MIN_AGREEMENT
    assert r["int8_mode"] == mode and r["int8_portable"] is INT8_MODES[mode].portable
    props = {p.key: p.value for p in onnx.load(r["path"]).metadata_props}
    assert props["int8_mode"] == mode
    assert json.loads(props["int8_portable"]) is INT8_MODES[mode].portable
    assert load_model_info(r["path"])["int8_mode"] == mode
    # the weights are stored in the mode's format and range
    qweights = [
        numpy_helper.to_array(t)
        for t in onnx.load(r["path"]).graph.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and t.dims
    ]
    assert qweights
    for w in qweights:
        if INT8_MODES[mode].weight_type == "uint8":
            assert w.dtype == np.uint8
        else:
            assert w.dtype == np.int8
            # 7 bits: |w| <= 64, so 255 * 64 * 2 = 32,640 fits the int16 pair sum
            lo, hi = (-64, 64) if INT8_MODES[mode].reduce_range else (-128, 127)
            assert lo <= int(w.min()) and int(w.max()) <= hi


@pytest.mark.parametrize("mode", [m for m, spec in INT8_MODES.items() if spec.lstm])
def test_tagger_int8_agrees_with_fp32_in_every_lstm_mode(mode, tagger, tmp_path):
    ckpt, test = tagger
    r = export_onnx(ckpt, tmp_path / f"{mode}.onnx", int8=True, int8_mode=mode, conllu=test)
    assert r["int8_agreement"] >= MIN_AGREEMENT, r["int8_agreement"]
    assert r["int8_mode"] == mode
    ops = {n.op_type for n in onnx.load(r["path"]).graph.node}
    assert "DynamicQuantizeLSTM" in ops


def test_tagger_refuses_uint8_weights_and_writes_nothing(tagger, tmp_path, capsys):
    ckpt, test = tagger
    with pytest.raises(BadInputError, match="not available for LSTM"):
        export_onnx(ckpt, tmp_path / "u8.onnx", int8=True, int8_mode="u8", conllu=test)
    code, out, err = run_main(
        capsys, "export", ckpt, "--onnx", "--int8", "--int8-mode", "u8", "-o", tmp_path / "x.onnx"
    )
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert files_in(tmp_path) == set()


def test_min_agreement_refuses_and_writes_nothing(mlp, tmp_path, capsys):
    ckpt, npz = mlp
    out = tmp_path / "q.onnx"
    for bad in (-0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(BadInputError, match="min_agreement"):
            export_onnx(ckpt, out, int8=True, data=npz, min_agreement=bad)
    # a model agrees on < 100 % of 2,000 images (measured: 99.x %), so 1.0 refuses it
    r = export_onnx(ckpt, out, int8=True, data=npz, min_agreement=0.0)
    out.unlink()
    if r["int8_agreement"] < 1.0:
        code, stdout, err = run_main(
            capsys, "export", ckpt, "--onnx", "--int8", "--data", npz, "--min-agreement", "1",
            "-o", out,
        )  # fmt: skip
        assert code == 1 and stdout == "" and "agree with fp32" in err
        assert len(err.strip().splitlines()) == 1
    assert files_in(tmp_path) == set()


def test_bench_warns_only_where_a_file_saturates(mlp, tmp_path):
    ckpt, npz = mlp
    paths = [
        export_onnx(ckpt, tmp_path / f"{m}.onnx", int8=True, int8_mode=m, data=npz)["path"]
        for m in ("s7", "s8")
    ]
    r = bench(paths, batch_sizes=[1], threads=[1], repeat=2, progress=False)
    assert [m["int8_mode"] for m in r["models"]] == ["s7", "s8"]
    assert r["machine"]["int8_u8s8_exact"] is probe_u8s8_exact()
    if probe_u8s8_exact():  # a VNNI CPU: the s8 file is exact here
        assert r["warnings"] == []
    else:
        assert len(r["warnings"]) == 1 and paths[1] in r["warnings"][0]


def _run(path: str, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]
