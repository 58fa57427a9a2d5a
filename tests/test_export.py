"""ONNX export: onnxruntime parity with PyTorch, one self-contained file, metadata, int8,
and the refusals (bad input, failed parity) that must leave nothing behind.

The models are trained here on real Fashion-MNIST (a few hundred Adam steps, so accuracy
means something): a dense 784-64-64-10 MLP, the same MLP masked with ``meprop_`` +
``apply_mask``, and the masked one shrunk by hand to 784-24-16-10. Each is exported once
(module-scoped fixtures; the exporter is slow) and every reference value is computed
here with PyTorch or onnxruntime, never taken from the library's own report.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import FMNIST, hand_mlp, masked_forward
from helpers import files_in, run_main
from mesimp.cli.main import cli, main
from onnx import numpy_helper

import mesimp.deploy.verify
from mesimp._version import __version__
from mesimp.data import load_idx
from mesimp.deploy.bench import load_model_info
from mesimp.deploy.export import export_onnx
from mesimp.errors import VerificationError
from mesimp.files.checkpoint import make_checkpoint, save_checkpoint
from mesimp.models import MLPConfig
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

HIDDEN = [64, 64]
KEEP = [24, 16]  # neurons kept by the masks of the two hidden layers
N_TEST_IMAGES = 2000
N_CHECK = 1000  # export_onnx's default parity sample: the first 1000 test images
PARITY_TOL = 1e-4


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _fmnist(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (FMNIST / name).is_file():
            return FMNIST / name
    pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")


def _fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    s = _session(path)
    return s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


def _gemm_weights(proto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight as [out, in], bias) of every Gemm in graph order, from the initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type != "Gemm":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits[node.input[1]]
        out.append((w if attrs.get("transB", 0) else w.T, inits[node.input[2]]))
    return out


# --------------------------------------------------------------------------------------
# fixtures: data, trained models, exports (each built once per module)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, fmnist_raw):
    """5100 real training images (export loads with dev_size=5000) and the first
    N_TEST_IMAGES real test images, as an .npz for --data and as float arrays."""
    x_test = load_idx(_fmnist("t10k-images-idx3-ubyte"))[:N_TEST_IMAGES].copy()
    y_test = load_idx(_fmnist("t10k-labels-idx1-ubyte"))[:N_TEST_IMAGES].copy()
    npz = tmp_path_factory.mktemp("export-data") / "fmnist.npz"
    np.savez(
        npz,
        x_train=fmnist_raw["x_train"],
        y_train=fmnist_raw["y_train"],
        x_test=x_test,
        y_test=y_test,
    )
    x_train = fmnist_raw["x_train"].reshape(len(fmnist_raw["x_train"]), -1)
    return SimpleNamespace(
        npz=npz,
        x_train=torch.from_numpy(x_train.astype(np.float32) / 255.0),
        y_train=torch.from_numpy(fmnist_raw["y_train"].astype(np.int64)),
        x_test=x_test.reshape(N_TEST_IMAGES, -1).astype(np.float32) / 255.0,
        y_test=y_test.astype(np.int64),
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    """Dense, masked and shrunk MLPs trained on real data, saved as checkpoints (each in
    its own folder, so a folder listing shows exactly what export wrote)."""
    root = tmp_path_factory.mktemp("export-models")
    torch.manual_seed(0)
    dense = hand_mlp(HIDDEN)
    _fit(dense, data.x_train, data.y_train, steps=300, seed=0)

    masked = copy.deepcopy(dense)
    meprop_(masked, MePropConfig(k=0))
    masks = []
    for i, keep in zip((0, 2), KEEP, strict=True):
        norms = masked[i].weight.detach().norm(dim=1)
        m = torch.zeros(HIDDEN[i // 2], dtype=torch.bool)
        m[norms.argsort(descending=True)[:keep]] = True
        masked[i].apply_mask(m)
        masks.append(m)
    _fit(masked, data.x_train, data.y_train, steps=100, seed=1)

    # Shrink by hand: keep rows of layer l and columns of layer l+1 for the kept neurons.
    k0, k1 = (m.nonzero().squeeze(1) for m in masks)
    shrunk = hand_mlp(KEEP)
    with torch.no_grad():
        shrunk[0].weight.copy_(masked[0].weight[k0])
        shrunk[0].bias.copy_(masked[0].bias[k0])
        shrunk[2].weight.copy_(masked[2].weight[k1][:, k0])
        shrunk[2].bias.copy_(masked[2].bias[k1])
        shrunk[4].weight.copy_(masked[4].weight[:, k1])
        shrunk[4].bias.copy_(masked[4].bias)
    shrunk.eval()

    out = {}
    for name, model, hidden, cfg in (
        ("dense", dense, HIDDEN, None),
        ("masked", masked, HIDDEN, MePropConfig(k=0)),
        ("shrunk", shrunk, KEEP, None),
    ):
        d = root / name
        d.mkdir()
        arch = MLPConfig(hidden_sizes=hidden).to_dict()
        ckpt = d / f"{name}.pt"
        save_checkpoint(ckpt, make_checkpoint(model, arch, cfg))
        out[name] = SimpleNamespace(model=model, ckpt=ckpt, dir=d, hidden=hidden, masks=masks)
    return out


@pytest.fixture(scope="module")
def exported(models, data):
    """One export per model: dense and masked through the API (dense with the default
    output name), shrunk through the CLI (--json), and an int8 export of the dense one."""
    res = {
        "dense": export_onnx(models["dense"].ckpt, data=data.npz),
        "masked": export_onnx(
            models["masked"].ckpt, models["masked"].dir / "masked.onnx", data=data.npz
        ),
    }
    r = CliRunner().invoke(
        cli,
        [
            "export",
            str(models["shrunk"].ckpt),
            "--onnx",
            "-o",
            str(models["shrunk"].dir / "shrunk.onnx"),
            "--data",
            str(data.npz),
            "--json",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    res["shrunk"] = json.loads(r.stdout)  # exactly one JSON document on stdout
    res["int8"] = export_onnx(models["dense"].ckpt, int8=True, data=data.npz)
    return res


FP32 = ("dense", "masked", "shrunk")
ALL = (*FP32, "int8")


def _source(name: str) -> str:
    return "dense" if name == "int8" else name


# --------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------
def test_models_learned_something(models, data):
    x = torch.from_numpy(data.x_test)
    with torch.no_grad():
        for name in FP32:
            acc = (models[name].model(x).argmax(1).numpy() == data.y_test).mean()
            assert acc > 0.7, f"{name} test accuracy {acc:.3f}: training did not work"


@pytest.mark.parametrize("name", FP32)
def test_onnxruntime_matches_pytorch(name, models, exported, data):
    r = exported[name]
    path = Path(r["path"])
    assert path == models[name].dir / f"{name}.onnx"  # dense: the default name IN.onnx
    got = _ort(path, data.x_test)
    with torch.no_grad():
        ref = models[name].model(torch.from_numpy(data.x_test)).numpy()
    assert got.shape == ref.shape == (N_TEST_IMAGES, 10)
    mine_all = float(np.abs(got - ref).max())
    mine_check = float(np.abs(got[:N_CHECK] - ref[:N_CHECK]).max())
    assert mine_all <= PARITY_TOL
    # the reported figure: within tolerance, and what we measure on the same inputs
    assert r["n_check"] == N_CHECK and r["check_data"] == str(data.npz)
    assert 0.0 <= r["max_abs_diff"] <= PARITY_TOL
    assert r["max_abs_diff"] == pytest.approx(mine_check, abs=1e-5)
    # fp32 accuracy over the whole test set of --data, as onnxruntime computes it
    assert r["fp32_accuracy"] == pytest.approx(float((got.argmax(1) == data.y_test).mean()))
    assert r["int8"] is False


def test_masked_export_matches_masks_from_the_definition(models, exported, data):
    """The masked ONNX model computes relu((x W^T + b) * mask) layer by layer
    (conftest.masked_forward, written without mesimp's modules)."""
    m = models["masked"]
    for layer, keep in zip((m.model[0], m.model[2]), KEEP, strict=True):
        assert int(layer.mask.sum()) == keep and layer.active_width == keep
    sd = {k: v.detach() for k, v in m.model.state_dict().items()}
    ref = masked_forward(sd, m.masks, torch.from_numpy(data.x_test)).numpy()
    got = _ort(Path(exported["masked"]["path"]), data.x_test)
    assert float(np.abs(got - ref).max()) <= PARITY_TOL
    # and the masks matter: the same weights without masks give other logits
    plain = hand_mlp(HIDDEN)
    plain.load_state_dict(sd)
    with torch.no_grad():
        unmasked_logits = plain(torch.from_numpy(data.x_test)).numpy()
    assert float(np.abs(got - unmasked_logits).max()) > 1e-2


def test_masked_graph_folds_the_masks_into_the_weights(models, exported):
    """A plain Gemm/Relu graph at full width: masked rows of W and b are 0, kept rows are
    the trained weights, and no Mul by a mask constant is left."""
    proto = onnx.load(exported["masked"]["path"])
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    gemms = _gemm_weights(proto)
    model = models["masked"].model
    layers = (model[0], model[2])
    assert len(gemms) == 3
    for (w, b), layer, mask in zip(gemms[:2], layers, models["masked"].masks, strict=True):
        mask = mask.numpy()
        assert w.shape == tuple(layer.weight.shape)  # full width is kept
        assert not w[~mask].any() and not b[~mask].any()
        np.testing.assert_array_equal(w[mask], layer.weight.detach().numpy()[mask])
        np.testing.assert_array_equal(b[mask], layer.bias.detach().numpy()[mask])
    assert exported["masked"]["macs"] == 784 * 64 + 64 * 64 + 64 * 10


def test_shrunk_model_computes_the_masked_function(models, exported, data):
    small = _ort(Path(exported["shrunk"]["path"]), data.x_test)
    full = _ort(Path(exported["masked"]["path"]), data.x_test)
    assert float(np.abs(small - full).max()) <= PARITY_TOL
    proto = onnx.load(exported["shrunk"]["path"])
    assert [w.shape for w, _ in _gemm_weights(proto)] == [(24, 784), (16, 24), (10, 16)]
    assert exported["shrunk"]["macs"] == 784 * 24 + 24 * 16 + 16 * 10
    assert exported["shrunk"]["params"] == 784 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10


# --------------------------------------------------------------------------------------
# the file: single, valid, dynamic batch, metadata
# --------------------------------------------------------------------------------------
def test_only_the_onnx_files_are_written_next_to_the_checkpoints(models, exported):
    assert files_in(models["dense"].dir) == {"dense.pt", "dense.onnx", "dense.int8.onnx"}
    assert files_in(models["masked"].dir) == {"masked.pt", "masked.onnx"}
    assert files_in(models["shrunk"].dir) == {"shrunk.pt", "shrunk.onnx"}
    for name in ALL:
        p = Path(exported[name]["path"])
        assert not Path(f"{p}.data").exists() and not p.with_suffix(".data").exists()
        assert exported[name]["size_bytes"] == p.stat().st_size


@pytest.mark.parametrize("name", ALL)
def test_checker_full_check_and_dynamic_batch(name, models, exported, data):
    path = Path(exported[name]["path"])
    proto = onnx.load(str(path))  # loads: no external data needed
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    (outp,) = proto.graph.output
    assert (inp.name, outp.name) == ("input", "logits")
    for vi, width in ((inp, 784), (outp, 10)):
        d0, d1 = vi.type.tensor_type.shape.dim
        assert d0.dim_param and not d0.HasField("dim_value")  # symbolic batch axis
        assert d1.dim_value == width
    s = _session(path)
    for b in (1, 37):
        x = data.x_test[100 : 100 + b]
        out = s.run(None, {"input": x})[0]
        assert out.shape == (b, 10) and np.isfinite(out).all()
        if name != "int8":  # int8 activations are quantized per batch: no exact parity
            with torch.no_grad():
                ref = models[name].model(torch.from_numpy(x)).numpy()
            assert float(np.abs(out - ref).max()) <= PARITY_TOL


@pytest.mark.parametrize("name", ALL)
def test_metadata_props(name, models, exported):
    m = models[_source(name)]
    props = {p.key: p.value for p in onnx.load(exported[name]["path"]).metadata_props}
    assert props["mesimp_version"] == __version__
    assert json.loads(props["hidden_sizes"]) == m.hidden  # masked: full width (not shrunk)
    sha = hashlib.sha256(m.ckpt.read_bytes()).hexdigest()
    assert props["source_sha256"] == sha == exported[name]["source_sha256"]
    assert exported[name]["hidden_sizes"] == m.hidden


# --------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------
def test_int8_export(exported, data):
    fp32, q = exported["dense"], exported["int8"]
    qpath, fpath = Path(q["path"]), Path(fp32["path"])
    assert qpath != fpath and qpath.name == "dense.int8.onnx"
    assert qpath.stat().st_size < 0.5 * fpath.stat().st_size  # int8 weights: ~1/4
    assert q["int8"] is True
    proto = onnx.load(str(qpath))
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert "Gemm" not in ops  # every layer got quantized
    assert sorted(ops) == q["int8_ops"]
    # accuracies: reported, recomputed here with onnxruntime on the --data test set
    q_logits = _ort(qpath, data.x_test)
    f_logits = _ort(fpath, data.x_test)
    my_int8 = float((q_logits.argmax(1) == data.y_test).mean())
    my_fp32 = float((f_logits.argmax(1) == data.y_test).mean())
    assert q["int8_accuracy"] == pytest.approx(my_int8)
    assert q["fp32_accuracy"] == pytest.approx(my_fp32) == fp32["fp32_accuracy"]
    assert my_fp32 > 0.7
    assert q["fp32_accuracy"] - q["int8_accuracy"] < 0.05
    agreement = float((q_logits.argmax(1) == f_logits.argmax(1)).mean())
    assert q["int8_agreement"] == pytest.approx(agreement) and agreement >= 0.95
    assert 0.0 <= q["max_abs_diff"] <= PARITY_TOL  # the fp32 graph's parity, still checked
    # bench reads the quantized graph's MACs and metadata like the float one's
    q_info, f_info = load_model_info(qpath), load_model_info(fpath)
    assert q_info["macs"] == f_info["macs"] == 784 * 64 + 64 * 64 + 64 * 10
    assert "int8" in q_info["quantization"] and "quantization" not in f_info


# --------------------------------------------------------------------------------------
# refusals: nothing written, one line
# --------------------------------------------------------------------------------------
EXPORT_BAD = {  # case -> what the one-line message says
    "no --onnx": "--onnx",
    "text file": "not a PyTorch checkpoint",
    "torch file, not a checkpoint": "not a mesimp checkpoint",
    "missing checkpoint": "no such file",
    "output under a file": "cannot write",
    "output not .onnx": "must end in .onnx",
}


@pytest.mark.parametrize("case", EXPORT_BAD)
def test_cli_export_bad_input(case, tmp_path, capsys, models):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(models["dense"].ckpt.read_bytes())
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.pt")
    (tmp_path / "afile").write_text("x")
    args = {
        "no --onnx": [ckpt, "-o", tmp_path / "out.onnx"],
        "text file": [tmp_path / "notes.pt", "--onnx"],  # default output notes.onnx
        "torch file, not a checkpoint": [tmp_path / "plain.pt", "--onnx"],
        "missing checkpoint": [tmp_path / "nope.pt", "--onnx", "-o", tmp_path / "out.onnx"],
        "output under a file": [ckpt, "--onnx", "-o", tmp_path / "afile" / "out.onnx"],
        "output not .onnx": [ckpt, "--onnx", "-o", tmp_path / "out.txt"],
    }[case]
    before = files_in(tmp_path)
    code, out, err = run_main(capsys, "export", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert EXPORT_BAD[case] in lines[0]
    assert "Traceback" not in err and out == ""
    assert files_in(tmp_path) == before  # no output file, no temp file left


def test_failed_parity_raises_and_writes_nothing(tmp_path, models, data, monkeypatch):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(models["dense"].ckpt.read_bytes())
    # the parity check reads the module global at call time
    monkeypatch.setattr(mesimp.deploy.verify, "PARITY_TOL", -1.0)
    with pytest.raises(VerificationError, match="differ"):
        export_onnx(ckpt, tmp_path / "m.onnx", data=data.npz)
    assert files_in(tmp_path) == {"m.pt"}


@pytest.mark.parametrize("name", ["shrunk", "int8"])
def test_info_on_an_onnx_file(name, models, exported, capsys):
    """`mesimp info X.onnx --json`: widths, params and MACs counted from the graph by hand."""
    path = exported[name]["path"]
    code, out, err = run_main(capsys, "info", path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    weights = _gemm_weights(onnx.load(path)) if name == "shrunk" else None
    src = models["shrunk" if name == "shrunk" else "dense"].ckpt
    arch = torch.load(src, weights_only=True)["arch"]
    sizes = [arch["in_features"], *arch["hidden_sizes"], arch["out_features"]]
    assert doc["format"] == "onnx" and doc["hidden_sizes"] == arch["hidden_sizes"]
    assert doc["macs"] == sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert doc["params"] == doc["macs"] + sum(sizes[1:])
    assert doc["metadata"]["source_sha256"] == hashlib.sha256(Path(src).read_bytes()).hexdigest()
    if weights is not None:
        assert [w.shape[0] for w, _ in weights][:-1] == arch["hidden_sizes"]


def test_info_refuses_a_non_onnx_file(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_text("not a model")
    code, out, err = run_main(capsys, "info", bad)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_cli_export_is_quiet(tmp_path, models, data, capfd):
    """No wall of exporter warnings: with --json, stdout is one JSON document and
    stderr (at the file-descriptor level, where C++ code writes) is empty."""
    out = tmp_path / "quiet.onnx"
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            ["export", str(models["shrunk"].ckpt), "--onnx", "-o", str(out)]
            + ["--data", str(data.npz), "--json"]
        )
    assert e.value.code in (0, None)
    o, err = capfd.readouterr()
    assert err == ""
    assert json.loads(o)["path"] == str(out) and out.is_file()


def test_an_opset_the_exporter_cannot_produce_is_refused(tmp_path, models, data, capsys):
    """torch 2.13's dynamo exporter keeps opset 18 when asked for 13: say so, write
    nothing (a later torch that can convert must then really write opset 13)."""
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(models["shrunk"].ckpt.read_bytes())
    code, out, err = run_main(capsys, "export", ckpt, "--onnx", "--opset", "13", "--data", data.npz)
    if code == 0:
        opsets = {o.domain: o.version for o in onnx.load(tmp_path / "m.onnx").opset_import}
        assert opsets[""] == 13
        return
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "opset" in err and "Traceback" not in err
    assert files_in(tmp_path) == {"m.pt"}
    r = export_onnx(ckpt, tmp_path / "m17.onnx", opset=17, data=data.npz)
    opsets = {o.domain: o.version for o in onnx.load(r["path"]).opset_import}
    assert r["opset"] == 17 and opsets[""] == 17
