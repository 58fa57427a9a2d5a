"""ONNX export and onnxruntime benchmark of the LSTM models (``lstm-tagger``, ``lstm-rows``).

Small randomly initialised models (a one-layer and a stacked tagger, a stacked row
classifier) are saved as checkpoints the way ``train_lstm`` saves them (config fields
plus, for a tagger, the vocabularies), exported once per module, and checked against
PyTorch: one ONNX ``LSTM`` node per layer, dynamic batch and sequence axes,
``DynamicQuantizeLSTM`` in the int8 graph, parity, metadata; then ``bench`` in decode
mode and the CLI. Reference values are computed here (PyTorch, onnxruntime, hashlib,
counting by hand), never taken from the library's own report. Tests that need the real
UD English EWT test file or Fashion-MNIST skip when those are absent.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FMNIST
from helpers import files_in, run_main
from onnx import TensorProto, helper, numpy_helper

from mesimp.data.conllu import Vocab, read_conllu
from mesimp.deploy.bench import bench, format_table, load_model_info, to_markdown
from mesimp.deploy.export import export_onnx
from mesimp.errors import BadInputError, MesimpError
from mesimp.files.checkpoint import make_checkpoint, save_checkpoint
from mesimp.models import LSTMTagger, RowLSTMClassifier, RowLSTMConfig, TaggerConfig

EWT_TEST = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "ud-english-ewt"
    / "en_ewt-ud-test.conllu"
)
PARITY_TOL = 1e-4
UPOS = "ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X".split()
WORDS = (
    "the a of and to in is was I you it that for on with as be at this have from by not "
    "are but or an they we he she his her my all one would there their will so if what "
    "can about out up when which do time people year just like good new first last long"
).split()
# name -> (model family, hidden widths): a one-layer tagger, a stacked one, a small one to
# bench against, a stacked row classifier
SPECS = {
    "tagger": ("lstm-tagger", 48),
    "tagger2": ("lstm-tagger", [40, 24]),
    "small": ("lstm-tagger", 8),
    "rows": ("lstm-rows", [24, 16]),
}
EMB = 16


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _ewt() -> Path:
    if not EWT_TEST.is_file():
        pytest.skip(f"UD English EWT test file not found at {EWT_TEST}")
    return EWT_TEST


def _fmnist() -> None:
    if (
        not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()
        and not (FMNIST / "t10k-images-idx3-ubyte").is_file()
    ):
        pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")


def _session(path: Path | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort(path: Path | str, x: np.ndarray) -> np.ndarray:
    s = _session(path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _ops(path: Path | str) -> list[tuple[str, str]]:
    return [(n.op_type, n.domain) for n in onnx.load(str(path)).graph.node]


def _lstm_macs(widths: list[int], n_in: int, n_out: int) -> int:
    """Per time step, by hand: 4h(in + h) per LSTM layer, plus the output layer."""
    sizes = [n_in, *widths]
    return sum(4 * h * (i + h) for i, h in zip(sizes, sizes[1:], strict=False)) + sizes[-1] * n_out


def _one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


# --------------------------------------------------------------------------------------
# fixtures: checkpoints and exports (built once per module)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocabs() -> SimpleNamespace:
    words = Vocab.build([WORDS], 1, "word")
    tags = Vocab.build([UPOS], 1, "tag")
    return SimpleNamespace(words=words, tags=tags)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, vocabs) -> dict[str, SimpleNamespace]:
    """Randomly initialised models saved as checkpoints (each in its own folder)."""
    root = tmp_path_factory.mktemp("lstm-ckpts")
    out = {}
    for i, (name, (family, hidden)) in enumerate(SPECS.items()):
        torch.manual_seed(i)
        if family == "lstm-tagger":
            config = TaggerConfig(len(vocabs.words), len(vocabs.tags), EMB, hidden)
            model = LSTMTagger(config).eval()
            arch = {
                **config.to_dict(),
                "word_vocab": vocabs.words.to_dict(),
                "tag_vocab": vocabs.tags.to_dict(),
            }
        else:
            config = RowLSTMConfig(28, 10, hidden)
            model = RowLSTMClassifier(config).eval()
            arch = config.to_dict()
        d = root / name
        d.mkdir()
        path = d / f"{name}.pt"
        save_checkpoint(path, make_checkpoint(model, arch, None))
        widths = hidden if isinstance(hidden, list) else [hidden]
        out[name] = SimpleNamespace(model=model, ckpt=path, dir=d, widths=widths, family=family)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Real Fashion-MNIST, or (where it is absent) random 28x28 images as an .npz."""
    if (FMNIST / "t10k-images-idx3-ubyte.gz").is_file() or (
        FMNIST / "t10k-images-idx3-ubyte"
    ).is_file():
        return FMNIST
    rng = np.random.default_rng(0)
    npz = tmp_path_factory.mktemp("images") / "random.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 20),
        x_test=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 300),
    )
    return npz


@pytest.fixture(scope="module")
def exported(ckpts, images) -> dict[str, dict]:
    """fp32 and int8 exports of every model; taggers checked on random sentences.

    These models are untrained: their logits are near ties, so int8/fp32 agreement says
    nothing about the quantization and no threshold is applied (``min_agreement=0``).
    The agreement thresholds are tested on trained models in ``test_int8.py``."""
    res = {}
    for name, c in ckpts.items():
        data = images if c.family == "lstm-rows" else None
        res[name] = export_onnx(c.ckpt, data=data)
        res[f"{name}.int8"] = export_onnx(c.ckpt, int8=True, data=data, min_agreement=0.0)
    return res


def _random_words(b: int, t: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (b, t), dtype=np.int64)


# --------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_one_lstm_node_per_layer(name, ckpts, exported):
    r = exported[name]
    ops = [op for op, _ in _ops(r["path"])]
    assert ops.count("LSTM") == len(ckpts[name].widths) == r["lstm_nodes"]
    assert not {"Loop", "Scan", "If"} & set(ops)  # not unrolled, not looped
    assert r["exporter"] == "torchscript" and r["model"] == ckpts[name].family
    onnx.checker.check_model(onnx.load(r["path"]), full_check=True)


@pytest.mark.parametrize("name", list(SPECS))
def test_dynamic_batch_and_sequence_axes(name, ckpts, exported):
    c = ckpts[name]
    proto = onnx.load(exported[name]["path"])
    (inp,) = proto.graph.input
    (outp,) = proto.graph.output
    d = inp.type.tensor_type.shape.dim
    assert d[0].dim_param and d[1].dim_param  # symbolic batch and sequence axes
    tagger = c.family == "lstm-tagger"
    if tagger:
        assert (inp.name, inp.type.tensor_type.elem_type) == ("words", TensorProto.INT64)
        assert len(d) == 2 and len(outp.type.tensor_type.shape.dim) == 3
    else:
        assert (inp.name, inp.type.tensor_type.elem_type) == ("input", TensorProto.FLOAT)
        assert len(d) == 3 and d[2].dim_value == 28
    s = _session(exported[name]["path"])
    for b, t in ((1, 4), (3, 11), (5, 1)):
        if tagger:
            x = _random_words(b, t, c.model.config.vocab_size, seed=b * 100 + t)
            x[-1, t // 2 + 1 :] = 0  # a padded sentence
        else:
            x = np.random.default_rng(t).random((b, t, 28), dtype=np.float32)
        got = s.run(None, {inp.name: x})[0]
        with torch.no_grad():
            ref = c.model(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape == ((b, t, c.model.config.num_tags) if tagger else (b, 10))
        assert float(np.abs(got - ref).max()) <= PARITY_TOL


@pytest.mark.parametrize("name", list(SPECS))
def test_int8_graph_uses_dynamic_quantize_lstm(name, ckpts, exported):
    c, q, f = ckpts[name], exported[f"{name}.int8"], exported[name]
    ops = _ops(q["path"])
    assert ops.count(("DynamicQuantizeLSTM", "com.microsoft")) == len(c.widths)
    assert "LSTM" not in [op for op, _ in ops]
    assert "MatMulInteger" in [op for op, _ in ops]  # the output layer too
    assert Path(q["path"]).name == f"{name}.int8.onnx"
    assert Path(q["path"]).stat().st_size < Path(f["path"]).stat().st_size
    assert q["int8"] is True and 0.0 <= q["int8_agreement"] <= 1.0
    assert q["int8_mode"] == "s7" and q["int8_portable"] is True  # the portable default
    props = {p.key: p.value for p in onnx.load(q["path"]).metadata_props}
    assert props["int8_mode"] == "s7" and props["int8_portable"] == "true"
    assert 0.0 <= q["max_abs_diff"] <= PARITY_TOL  # the fp32 graph's parity, still checked
    # the int8 graph runs at other shapes and stays near the fp32 one
    x = (
        _random_words(2, 9, c.model.config.vocab_size, seed=3)
        if c.family == "lstm-tagger"
        else np.random.default_rng(3).random((2, 28, 28), dtype=np.float32)
    )
    assert float(np.abs(_ort(q["path"], x) - _ort(f["path"], x)).max()) < 0.05


@pytest.mark.parametrize("name", list(SPECS))
def test_parity_and_report(name, ckpts, exported):
    c, r = ckpts[name], exported[name]
    assert 0.0 <= r["max_abs_diff"] <= PARITY_TOL
    assert r["hidden_sizes"] == c.widths
    assert r["params"] == sum(p.numel() for p in c.model.parameters())
    n_in = EMB if c.family == "lstm-tagger" else 28
    n_out = c.model.config.num_tags if c.family == "lstm-tagger" else 10
    assert r["macs"] == _lstm_macs(c.widths, n_in, n_out)
    assert load_model_info(r["path"])["macs"] == r["macs"]  # bench counts from the graph
    assert load_model_info(exported[f"{name}.int8"]["path"])["macs"] == r["macs"]
    if c.family == "lstm-tagger":
        # no CoNLL-U file given and none recorded in the checkpoint: random sentences
        assert r["check_data"] == "random" and r["n_check"] == 1000
        assert r["fp32_accuracy"] is None and 1000 <= r["check_tokens"] <= 40 * 1000
    assert files_in(c.dir) == {f"{name}.pt", f"{name}.onnx", f"{name}.int8.onnx"}


@pytest.mark.parametrize("name", ["tagger2", "rows"])
def test_metadata_props(name, ckpts, exported, vocabs):
    c = ckpts[name]
    props = {p.key: p.value for p in onnx.load(exported[name]["path"]).metadata_props}
    assert props["model"] == c.family
    assert json.loads(props["hidden_sizes"]) == c.widths
    sha = hashlib.sha256(c.ckpt.read_bytes()).hexdigest()
    assert props["source_sha256"] == sha == exported[name]["source_sha256"]
    arch = json.loads(props["arch"])
    assert "word_vocab" not in arch and "tag_vocab" not in arch  # sizes only, not the words
    if c.family == "lstm-tagger":
        assert int(props["vocab_size"]) == len(vocabs.words) == arch["vocab_size"]
        assert int(props["num_tags"]) == len(vocabs.tags)
        assert json.loads(props["tags"]) == ["<pad>", "<unk-tag>", *vocabs.tags.tokens]
    else:
        assert props["steps"] == "28"


def test_dynamo_exporter_is_refused_for_a_stacked_tagger(ckpts, tmp_path):
    """Why the LSTM path uses the TorchScript exporter: the dynamo graph fixes the
    sequence length (caught by the graph check or the parity run); nothing is written."""
    with pytest.raises(MesimpError) as e:
        export_onnx(ckpts["tagger2"].ckpt, tmp_path / "dyn.onnx", exporter="dynamo")
    assert "\n" not in str(e.value)
    assert files_in(tmp_path) == set()


# --------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------
def test_tagger_parity_and_token_accuracy_on_ewt(ckpts, vocabs, tmp_path):
    ewt = _ewt()
    c = ckpts["tagger"]
    r = export_onnx(
        c.ckpt, tmp_path / "t.int8.onnx", int8=True, conllu=ewt, n_check=300, min_agreement=0.0
    )
    sents = read_conllu(ewt)
    assert r["check_data"] == str(ewt) and r["n_check"] == 300
    assert r["check_tokens"] == sum(len(s) for s in sents[:300])
    assert r["max_abs_diff"] <= PARITY_TOL
    # token accuracy by hand: PyTorch, one unpadded sentence at a time, gold UPOS ids
    correct = total = 0
    with torch.no_grad():
        for s in sents:
            x = torch.tensor([vocabs.words.encode(s.words)])
            pred = c.model(x)[0].argmax(-1).tolist()
            gold = [vocabs.tags.lookup(t) for t in s.upos]
            correct += sum(p == g for p, g in zip(pred, gold, strict=True))
            total += len(gold)
    assert r["fp32_accuracy"] == pytest.approx(correct / total, abs=1e-3)
    assert 0.0 <= r["int8_accuracy"] <= 1.0
    assert abs(r["int8_accuracy"] - r["fp32_accuracy"]) <= 1 - r["int8_agreement"] + 1e-9


def test_tagger_defaults_to_the_test_file_recorded_at_training(ckpts, tmp_path):
    """train_lstm records its CoNLL-U test file in train.data.test: export checks on it."""
    ewt = _ewt()
    c = ckpts["small"]
    ckpt = torch.load(c.ckpt, weights_only=True)
    ckpt["train"] = {"data": {"test": str(ewt)}}
    path = tmp_path / "recorded.pt"
    save_checkpoint(path, ckpt)
    r = export_onnx(path, n_check=50)
    assert r["check_data"] == str(ewt) and r["n_check"] == 50
    assert r["fp32_accuracy"] is not None and r["max_abs_diff"] <= PARITY_TOL


def test_rows_checked_on_fashion_mnist(ckpts, exported):
    _fmnist()
    from mesimp.data import load_idx

    r, c = exported["rows"], ckpts["rows"]
    assert r["check_data"] == str(FMNIST) and r["n_check"] == 1000 and r["steps"] == 28
    x = load_idx(FMNIST / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = load_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    with torch.no_grad():
        pred = c.model(torch.from_numpy(x)).argmax(1).numpy()
    assert r["fp32_accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-3)


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode(exported) -> dict:
    paths = [exported[n]["path"] for n in ("tagger", "small", "small.int8")]
    return bench(
        paths, batch_sizes=(1, 8), threads=(1,), repeat=1, warmup=1, sentences=60, progress=False
    )


def test_bench_decode_rows(decode, exported):
    rows = decode["results"]
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("decode", 1)] * 3 + [("batch", 8)] * 3
    lengths = np.clip(np.rint(np.random.default_rng(0).lognormal(2.1, 0.95, 60)), 1, 160)
    cfg = decode["config"]
    assert cfg["sentences"] == 60 and cfg["tokens"] == int(lengths.sum()) and cfg["data"] is None
    for r in rows:
        assert r["threads"] == 1 and r["passes"] == 1 and r["tokens"] == cfg["tokens"]
        vals = [r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "tokens_per_s", "speedup")]
        assert all(math.isfinite(v) and v > 0 for v in vals)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["runs"] == (60 if r["mode"] == "decode" else math.ceil(60 / 8))
        if r["mode"] == "decode":
            assert r["p50_ms_per_sentence"] == r["p50_ms"] <= r["p99_ms_per_sentence"]
        else:
            assert "p50_ms_per_sentence" not in r
    for b in (1, 8):
        group = [r for r in rows if r["batch_size"] == b]
        assert group[0]["speedup"] == 1.0
        for r in group:
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / group[0]["tokens_per_s"])
    big = _lstm_macs([48], EMB, len(UPOS) + 2)
    small = _lstm_macs([8], EMB, len(UPOS) + 2)
    assert rows[1]["mac_ratio"] == pytest.approx(big / small) == rows[2]["mac_ratio"]
    json.dumps(decode)
    table = format_table(decode)
    assert "decode" in table and "tok/s" in table
    assert "MACs/token" in to_markdown(decode)


def test_bench_decode_on_ewt_sentences(exported):
    ewt = _ewt()
    r = bench(
        [exported["tagger"]["path"], exported["tagger2"]["path"]],
        conllu=ewt,
        sentences=50,
        batch_sizes=(1,),
        threads=(1,),
        repeat=1,
        warmup=0,
        progress=False,
    )
    # token count by hand: word lines (integer IDs) of the first 50 sentences
    tokens = n = 0
    for block in ewt.read_text(encoding="utf-8").split("\n\n")[:50]:
        ids = [ln.split("\t")[0] for ln in block.splitlines() if ln and not ln.startswith("#")]
        tokens += sum(i.isdigit() for i in ids)
        n += 1
    assert r["config"]["data"] == str(ewt) and r["config"]["sentences"] == n == 50
    assert all(row["tokens"] == tokens and row["runs"] == 50 for row in r["results"])


def test_bench_rows_models_like_mlps(exported):
    paths = [exported["rows"]["path"], exported["rows.int8"]["path"]]
    r = bench(paths, batch_sizes=(1, 4), threads=(1,), repeat=3, warmup=1, progress=False)
    assert len(r["results"]) == 4
    for row in r["results"]:
        assert "mode" not in row and row["runs"] == 3
        assert row["throughput"] == pytest.approx(row["batch_size"] / (row["p50_ms"] / 1000))
    assert r["models"][0]["macs"] == _lstm_macs([24, 16], 28, 10)


def _gemm_model(path: Path) -> Path:
    """A one-Gemm float MLP on [batch, 784], written with onnx.helper."""
    w = numpy_helper.from_array(np.zeros((10, 784), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W"], ["logits"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_bench_refuses_mixing_mlp_and_sequence_models(exported, tmp_path, capsys):
    mlp = _gemm_model(tmp_path / "mlp.onnx")
    with pytest.raises(BadInputError, match="cannot bench an MLP"):
        bench([mlp, exported["tagger"]["path"]], threads=(1,), repeat=1, progress=False)
    for models in ([mlp, exported["tagger"]["path"]], [exported["rows"]["path"], mlp]):
        line = _one_error_line(*run_main(capsys, "bench", *models, "--threads", "1"))
        assert "cannot bench" in line and "MLP" in line


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def test_cli_export_and_bench_round_trip(ckpts, tmp_path, capsys):
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(ckpts["tagger2"].ckpt.read_bytes())
    code, out, err = run_main(
        capsys, "export", ckpt, "--onnx", "--int8", "--min-agreement", "0", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["path"] == str(tmp_path / "t.int8.onnx") and doc["lstm_nodes"] == 2
    code, out, err = run_main(capsys, "export", ckpt, "--onnx")
    assert code == 0, err
    assert "2 LSTM node(s)" in out and "t.onnx" in out
    code, out, err = run_main(
        capsys,
        "bench",
        tmp_path / "t.onnx",
        tmp_path / "t.int8.onnx",
        "--threads",
        "1",
        "--repeat",
        "1",
        "--sentences",
        "20",
        "--no-progress",
        "--json",
        "--markdown",
        tmp_path / "b.md",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert [r["mode"] for r in doc["results"]] == ["decode", "decode"]
    assert all(r["runs"] == 20 and r["tokens_per_s"] > 0 for r in doc["results"])
    assert "decode" in (tmp_path / "b.md").read_text()
    code, out, err = run_main(capsys, "info", tmp_path / "t.int8.onnx", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["input"]["kind"] == "tagger" and info["hidden_sizes"] == [40, 24]


def test_cli_tagger_bench_with_a_malformed_conllu_file(exported, tmp_path, capsys):
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tThe\tthe\tDET\n\n", encoding="utf-8")  # 4 columns, not 10
    line = _one_error_line(
        *run_main(capsys, "bench", exported["tagger"]["path"], "--conllu", bad, "--threads", "1")
    )
    assert str(bad) in line and "10 tab-separated columns" in line


@pytest.mark.parametrize("case", ["conllu for rows", "conllu without vocab", "data for tagger"])
def test_cli_export_refusals_write_nothing(case, ckpts, tmp_path, capsys):
    conllu = tmp_path / "s.conllu"
    conllu.write_text("1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\n", encoding="utf-8")
    if case == "conllu for rows":
        ckpt, opts, says = ckpts["rows"].ckpt, ["--conllu", conllu], "lstm-tagger"
    elif case == "conllu without vocab":
        blob = torch.load(ckpts["small"].ckpt, weights_only=True)
        del blob["arch"]["word_vocab"], blob["arch"]["tag_vocab"]
        ckpt = tmp_path / "novocab.pt"
        torch.save(blob, ckpt)
        opts, says = ["--conllu", conllu], "no vocabularies"
    else:
        ckpt, opts, says = ckpts["small"].ckpt, ["--data", FMNIST], "--conllu"
    before = files_in(tmp_path)
    out_path = tmp_path / "out.onnx"
    line = _one_error_line(*run_main(capsys, "export", ckpt, "--onnx", "-o", out_path, *opts))
    assert says in line
    assert files_in(tmp_path) == before
