"""onnxruntime benchmark: result schema, percentiles, throughput, speed-up, MAC ratio,
accuracy, interleaving, reports, the CLI, and the refusals.

Two MLPs of known widths (784-64-64-10 and 784-16-16-10) are trained briefly on real
Fashion-MNIST and exported once per module; a 100-input model is built by hand with
``onnx.helper``. Expected MACs, params and accuracies are computed here (by hand and with
onnxruntime), never taken from mesimp's helpers.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FMNIST, hand_mlp
from helpers import files_in, run_main
from onnx import TensorProto, helper, numpy_helper

from mesimp.data import load_idx
from mesimp.deploy.bench import bench, plot, write_markdown
from mesimp.deploy.export import export_onnx
from mesimp.errors import BadInputError
from mesimp.files.checkpoint import make_checkpoint, save_checkpoint
from mesimp.models import MLPConfig

WIDE, NARROW = [64, 64], [16, 16]
ROW_KEYS = {
    "model",
    "batch_size",
    "threads",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "runs",
    "throughput",
    "speedup",
    "mac_ratio",
}
MACHINE_KEYS = {
    "cpu_count",
    "affinity_cpus",
    "cpu_model",
    "platform",
    "python",
    "onnxruntime",
    "numpy",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def macs(sizes: list[int]) -> int:
    return sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))


def params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def _fmnist(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (FMNIST / name).is_file():
            return FMNIST / name
    pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")


def gemm_model(path: Path, in_features: int = 100, out: int = 10) -> Path:
    """A one-Gemm float model on [batch, in_features], written with onnx.helper."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((out, in_features), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(out, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "b"], ["logits"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory, fmnist_raw, verify_npz) -> SimpleNamespace:
    """wide.onnx (784-64-64-10), narrow.onnx (784-16-16-10), m100.onnx (100 inputs)."""
    d = tmp_path_factory.mktemp("bench-models")
    x = torch.from_numpy(fmnist_raw["x_train"].reshape(-1, 784).astype(np.float32) / 255.0)
    y = torch.from_numpy(fmnist_raw["y_train"].astype(np.int64))
    paths = {}
    for name, hidden in (("wide", WIDE), ("narrow", NARROW)):
        torch.manual_seed(0)
        model = hand_mlp(hidden)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpt = d / f"{name}.pt"
        save_checkpoint(ckpt, make_checkpoint(model, MLPConfig(hidden_sizes=hidden).to_dict()))
        paths[name] = Path(export_onnx(ckpt, d / f"{name}.onnx", data=verify_npz)["path"])
    return SimpleNamespace(
        wide=paths["wide"], narrow=paths["narrow"], m100=gemm_model(d / "m100.onnx"), dir=d
    )


@pytest.fixture(scope="module")
def fmnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The full real Fashion-MNIST test set as float32 [N, 784] in [0, 1] and labels."""
    x = load_idx(_fmnist("t10k-images-idx3-ubyte"))
    y = load_idx(_fmnist("t10k-labels-idx1-ubyte"))
    return x.reshape(len(x), -1).astype(np.float32) / 255.0, y.astype(np.int64)


@pytest.fixture(scope="module")
def result(onnx_models) -> dict:
    return bench(
        [onnx_models.wide, onnx_models.narrow],
        data=FMNIST,
        batch_sizes=(1, 8),
        threads=(1,),
        repeat=20,
        progress=False,
    )


def _ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    pred = np.concatenate(
        [s.run(None, {"input": x[i : i + 2500]})[0].argmax(1) for i in range(0, len(x), 2500)]
    )
    return float((pred == y).mean())


# --------------------------------------------------------------------------------------
# the result object
# --------------------------------------------------------------------------------------
def test_every_row_has_the_documented_fields(result, onnx_models):
    rows = result["results"]
    assert len(rows) == 2 * 2 * 1  # models x batch sizes x thread counts
    for r in rows:
        assert ROW_KEYS | {"accuracy"} <= set(r), set(r)
        assert r["runs"] == 20
        assert r["threads"] == 1 and r["batch_size"] in (1, 8)
        assert r["model"] in (str(onnx_models.wide), str(onnx_models.narrow))
    assert set(result) >= {"results", "models", "machine", "config"}
    assert MACHINE_KEYS <= set(result["machine"])
    cfg = result["config"]
    assert cfg["batch_sizes"] == [1, 8] and cfg["threads"] == [1]
    assert cfg["repeat"] == 20 and cfg["warmup"] == 5 and cfg["data"] == str(FMNIST)
    assert 1 <= cfg["rounds"] <= 20
    json.dumps(result)  # plain types only


def test_mlp_rows_have_no_sequence_fields(result):
    """The tagger fields (mode, tokens_per_s, ...) never leak into an MLP benchmark."""
    for r in result["results"]:
        assert set(r) == ROW_KEYS | {"accuracy"}, set(r)
    assert not {"sentences", "tokens", "word_ids"} & set(result["config"])


def test_percentiles_and_throughput(result):
    for r in result["results"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["mean_ms"] <= r["p99_ms"]  # with 20 runs the nearest-rank p99 is the max
        assert r["throughput"] == pytest.approx(r["batch_size"] / (r["p50_ms"] / 1000), rel=1e-9)


def test_speedup_and_mac_ratio(result, onnx_models):
    wide, narrow = str(onnx_models.wide), str(onnx_models.narrow)
    hand_ratio = macs([784, *WIDE, 10]) / macs([784, *NARROW, 10])
    assert hand_ratio == (784 * 64 + 64 * 64 + 64 * 10) / (784 * 16 + 16 * 16 + 16 * 10)
    for b in (1, 8):
        rows = {r["model"]: r for r in result["results"] if r["batch_size"] == b}
        assert rows[wide]["speedup"] == 1.0 and rows[wide]["mac_ratio"] == 1.0
        assert rows[narrow]["speedup"] == pytest.approx(
            rows[wide]["p50_ms"] / rows[narrow]["p50_ms"]
        )
        assert rows[narrow]["mac_ratio"] == pytest.approx(hand_ratio)
    m_wide, m_narrow = result["models"]
    assert (m_wide["path"], m_narrow["path"]) == (wide, narrow)
    assert m_wide["macs"] == macs([784, *WIDE, 10])
    assert m_narrow["macs"] == macs([784, *NARROW, 10])
    assert m_wide["params"] == params([784, *WIDE, 10])
    assert m_narrow["params"] == params([784, *NARROW, 10])
    assert (m_wide["hidden_sizes"], m_narrow["hidden_sizes"]) == (WIDE, NARROW)
    assert m_wide["size_bytes"] == onnx_models.wide.stat().st_size


def test_accuracy_matches_onnxruntime(result, onnx_models, fmnist_test):
    x, y = fmnist_test
    for path, m in zip((onnx_models.wide, onnx_models.narrow), result["models"], strict=True):
        mine = _ort_accuracy(path, x, y)
        assert mine > 0.6  # trained: far above chance
        assert m["accuracy"] == pytest.approx(mine, abs=1e-12)
        rows = [r for r in result["results"] if r["model"] == str(path)]
        assert len(rows) == 2 and all(r["accuracy"] == m["accuracy"] for r in rows)


def test_both_models_measured_in_every_configuration(result, onnx_models):
    order = [str(onnx_models.wide), str(onnx_models.narrow)]
    cfg = result["config"]
    for b, t in product(cfg["batch_sizes"], cfg["threads"]):
        rows = [r for r in result["results"] if (r["batch_size"], r["threads"]) == (b, t)]
        assert [r["model"] for r in rows] == order  # first model first: the speedup base


def test_without_data_there_is_no_accuracy(onnx_models):
    r = bench([onnx_models.narrow], batch_sizes=(3,), threads=(1,), repeat=4, progress=False)
    (row,) = r["results"]
    assert row["runs"] == 4 and row["batch_size"] == 3 and row["speedup"] == 1.0
    assert "accuracy" not in row and "accuracy" not in r["models"][0]
    assert r["config"]["data"] is None


def test_the_100_input_model_is_benchable_on_its_own(onnx_models):
    """So the refusals below are about the mismatch, not a broken file."""
    r = bench([onnx_models.m100], batch_sizes=(2,), threads=(1,), repeat=3, progress=False)
    assert r["models"][0]["macs"] == 100 * 10 and r["results"][0]["runs"] == 3


# --------------------------------------------------------------------------------------
# reports and the CLI
# --------------------------------------------------------------------------------------
def test_write_markdown_and_plot(result, tmp_path):
    md = write_markdown(result, tmp_path / "bench.md")
    text = Path(md).read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(result["results"])  # header, rule, one per row
    assert "wide.onnx" in text and "narrow.onnx" in text
    png = plot(result, tmp_path / "bench.png")
    data = Path(png).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert files_in(tmp_path) == {"bench.md", "bench.png"}  # no temp files left


def test_cli_bench_json(onnx_models, tmp_path, capsys):
    code, out, err = run_main(
        capsys,
        "bench",
        onnx_models.wide,
        onnx_models.narrow,
        "--batch-sizes",
        "1,4",
        "--threads",
        "1",
        "--repeat",
        "5",
        "--no-progress",
        "--json",
        "--markdown",
        tmp_path / "b.md",
        "--plot",
        tmp_path / "b.png",
    )
    assert code == 0, err
    doc = json.loads(out)  # one JSON document, nothing else on stdout
    assert len(doc["results"]) == 4 and all(r["runs"] == 5 for r in doc["results"])
    assert [m["path"] for m in doc["models"]] == [str(onnx_models.wide), str(onnx_models.narrow)]
    assert (tmp_path / "b.md").is_file()
    assert (tmp_path / "b.png").read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------
# refusals: BadInputError from the API, exit 2 and one line from the CLI
# --------------------------------------------------------------------------------------
BAD = ["not onnx", "missing", "batch 0", "signatures differ", "data mismatch"]


def _bad_case(case: str, m: SimpleNamespace, tmp: Path, npz: Path) -> tuple[list, dict, str]:
    """(models, keyword args, what the message says) for the API; the CLI gets the same
    as options."""
    (tmp / "x.onnx").write_text("this is a text file, not a model\n")
    return {
        "not onnx": ([tmp / "x.onnx"], {}, "not an ONNX model"),
        "missing": ([m.wide, tmp / "nope.onnx"], {}, "no such file"),
        "batch 0": ([m.wide, m.narrow], {"batch_sizes": (0,)}, "batch sizes must be positive"),
        "signatures differ": ([m.wide, m.m100], {}, "input signatures differ"),
        # real Fashion-MNIST has 784 features per example
        "data mismatch": ([m.m100], {"data": npz}, "100 input features"),
    }[case]


@pytest.mark.parametrize("case", BAD)
def test_api_refuses(case, onnx_models, tmp_path, verify_npz):
    models, kw, says = _bad_case(case, onnx_models, tmp_path, verify_npz)
    kw = {"batch_sizes": (1,), "threads": (1,), "repeat": 2, **kw}
    with pytest.raises(BadInputError, match=says):
        bench(models, progress=False, **kw)


def test_api_refuses_other_non_positive_settings(onnx_models):
    for kw in ({"threads": (0,)}, {"repeat": 0}, {"batch_sizes": ()}, {"batch_sizes": (-1,)}):
        with pytest.raises(BadInputError):
            bench([onnx_models.wide], progress=False, **{"batch_sizes": (1,), **kw})


@pytest.mark.parametrize("case", BAD)
def test_cli_refuses(case, onnx_models, tmp_path, capsys, verify_npz):
    models, kw, says = _bad_case(case, onnx_models, tmp_path, verify_npz)
    opts = ["--batch-sizes", ",".join(map(str, kw.get("batch_sizes", (1,))))]
    if "data" in kw:
        opts += ["--data", kw["data"]]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run_main(
        capsys,
        "bench",
        *models,
        *opts,
        "--threads",
        "1",
        "--repeat",
        "2",
        "--no-progress",
        "--markdown",
        out_dir / "b.md",
        "--plot",
        out_dir / "b.png",
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert (says if case != "batch 0" else "every value must be > 0") in lines[0]
    assert "Traceback" not in err and out == ""
    assert files_in(out_dir) == set()  # no report written


def test_bench_accepts_data_with_few_training_examples(tmp_path, onnx_models):
    """bench only needs the test split: a data file with 100 training images must work."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "small.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 255, (100, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 100),
        x_test=rng.integers(0, 255, (50, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 50),
    )
    r = bench(
        [onnx_models.narrow], data=npz, batch_sizes=(4,), threads=(1,), repeat=3, progress=False
    )
    assert 0.0 <= r["results"][0]["accuracy"] <= 1.0
