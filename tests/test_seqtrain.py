"""Tests for the LSTM trainer (mesimp.seqtrain), its data (mesimp.seqdata) and the
``mesimp train --model lstm-*`` commands, on real data: UD English EWT slices and
Fashion-MNIST subsets. The reference for every shrink is the masked model itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import pytest
import torch
from mesimp.cli.main import main
from torch import nn

from mesimp.data.conllu import Vocab, read_conllu, tagging_tensors
from mesimp.data.tasks import SeqData, rows_data, tagging_data
from mesimp.errors import BadInputError, DataError
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint
from mesimp.models import (
    LSTMTagger,
    RowLSTMClassifier,
    RowLSTMConfig,
    TaggerConfig,
    arch_from_dict,
    build_model,
)
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.simplify.checkpoint_shrink import shrink_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.sequence import meprop_lstms_, shrink_lstm_model, train_lstm

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
DEV = EWT / "en_ewt-ud-dev.conllu"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FAST = dict(emb_dim=16, epochs=2, batch_size=16, lr=1e-2)

needs_ewt = pytest.mark.skipif(not DEV.is_file(), reason=f"{DEV} not found")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not found")


def _write(path: Path, blocks: list[str]) -> Path:
    path.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ewt(tmp_path_factory) -> tuple[Path, Path, Path]:
    """train / dev / test CoNLL-U slices (300 / 60 / 100 sentences) of the EWT dev file."""
    if not DEV.is_file():
        pytest.skip(f"{DEV} not found")
    blocks = [b for b in DEV.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    d = tmp_path_factory.mktemp("ewt")
    return (
        _write(d / "train.conllu", blocks[:300]),
        _write(d / "dev.conllu", blocks[300:360]),
        _write(d / "test.conllu", blocks[360:460]),
    )


def _sentences(test: Path, arch: dict) -> torch.Tensor:
    words, tags = Vocab.from_dict(arch["word_vocab"]), Vocab.from_dict(arch["tag_vocab"])
    return tagging_tensors(read_conllu(test), words, tags)[0]


def _mask(layer: MePropLSTM, keep: list[int]) -> None:
    m = torch.zeros(layer.hidden_size, dtype=torch.bool)
    m[keep] = True
    layer.apply_mask(m)


# ----------------------------------------------------------------------------- models
def test_configs_take_a_width_per_layer_and_validate():
    c = TaggerConfig(vocab_size=10, num_tags=4, hidden=[6, 5])
    m = build_model(c)
    assert [lstm.hidden_size for lstm in m.stack.lstms] == [6, 5]
    assert [lstm.input_size for lstm in m.stack.lstms] == [100, 6]
    assert m.out.in_features == 5
    assert TaggerConfig(vocab_size=10, num_tags=4, hidden=[7]).hidden == 7
    for bad in ([], [3, 0], "5", [2.5], True):
        with pytest.raises(BadInputError):
            TaggerConfig(vocab_size=10, num_tags=4, hidden=bad)
    r = RowLSTMClassifier(RowLSTMConfig(hidden=[8, 4]))
    assert r(torch.rand(3, 28, 28)).shape == (3, 10)
    assert isinstance(arch_from_dict(r.config.to_dict()), RowLSTMConfig)


def test_layers_are_plain_nn_lstm_state_dicts():
    m = LSTMTagger(TaggerConfig(vocab_size=10, num_tags=4, emb_dim=3, hidden=[6, 5]))
    for i, (inp, hid) in enumerate([(3, 6), (6, 5)]):
        ref = nn.LSTM(inp, hid, batch_first=True)
        sd = {
            k.removeprefix(f"stack.lstms.{i}."): v
            for k, v in m.state_dict().items()
            if k.startswith(f"stack.lstms.{i}.")
        }
        ref.load_state_dict(sd)  # strict: same names, same shapes


# ---------------------------------------------------------- masked == shrunk, 1 and 2 layers
@needs_ewt
@pytest.mark.parametrize("hidden", [[12], [12, 10]])
def test_masked_equals_shrunk_on_real_sentences(ewt, hidden):
    """Masks set by hand on every layer (so layer 2 is surely pruned): the shrunk plain
    model's logits equal the masked meProp model's on real EWT sentences."""
    train, _, test = ewt
    data = tagging_data(train, test)
    torch.manual_seed(0)
    model = build_model(TaggerConfig(data.arch["vocab_size"], data.arch["num_tags"], 8, hidden))
    meprop_lstms_(model, MePropConfig(k=3, selection="unified"))
    keeps = [[0, 2, 3, 7, 11], [1, 4, 5, 9]]
    for layer, keep in zip(model.stack.lstms, keeps, strict=False):
        _mask(layer, keep)
    small = shrink_lstm_model(model)
    assert [lstm.hidden_size for lstm in small.stack.lstms] == [5, 4][: len(hidden)]
    assert all(type(lstm) is nn.LSTM for lstm in small.stack.lstms)
    x = data.x_test
    model.eval()
    with torch.no_grad():
        ref, got = model(x), small(x)
    real = data.y_test != 0
    assert (got - ref)[real].abs().max().item() <= 1e-5
    # the shrunk LSTM layers load into fresh plain nn.LSTMs of the kept widths
    for lstm in small.stack.lstms:
        nn.LSTM(lstm.input_size, lstm.hidden_size, batch_first=True).load_state_dict(
            lstm.state_dict()
        )


@needs_ewt
def test_two_layer_mesimp_training_shrinks_and_matches(ewt, tmp_path):
    train, dev, test = ewt
    out = tmp_path / "tagger2.pt"
    data = tagging_data(train, test, dev)
    simp = SimplifyConfig(prune_rate=0.05, points_per_epoch=2)
    r = train_lstm(data, hidden=[24, 16], k=6, simplify=simp, output=out, seed=2, **FAST)
    assert len(r["active_widths"]) == 2 and r["active_widths"][0] < 24
    assert r["data"]["heldout_sentences"] == 60  # the given dev file, not a split
    small = r["shrunk"]
    assert [lstm.hidden_size for lstm in small.stack.lstms] == r["active_widths"]
    model = r["module"]
    model.eval()
    with torch.no_grad():
        diff = (model(data.x_test) - small(data.x_test))[data.y_test != 0].abs().max()
    assert diff.item() <= 1e-5
    # the checkpoint holds the compacted model (at the active widths) and its counters
    ckpt = load_checkpoint(out)
    assert ckpt["arch"]["hidden"] == r["active_widths"]
    restored = model_from_checkpoint(ckpt).eval()
    assert [m.active_width for m in restored.stack.lstms] == r["active_widths"]
    with torch.no_grad():
        assert torch.equal(restored(data.x_test), model(data.x_test))
    # `mesimp shrink`'s library call removes the masked units, checked on the test file
    report = shrink_checkpoint(out)
    assert report["max_abs_diff"] <= 1e-5 and "sentences" in report["verified_on"]
    assert report["after"]["hidden_sizes"] == r["active_widths"]
    small_ckpt = torch.load(report["path"], weights_only=True)
    rebuilt = build_model(small_ckpt["arch"])
    rebuilt.load_state_dict(small_ckpt["state_dict"])
    assert small_ckpt["arch"]["hidden"] == r["active_widths"]
    acc = data.accuracy(rebuilt, data.x_test, data.y_test)
    assert acc == pytest.approx(r["best"]["test_accuracy"])
    assert small_ckpt["train"]["metrics"]["test_accuracy"] == pytest.approx(acc)


# ------------------------------------------------------------------------------ data rules
@needs_ewt
def test_unknown_test_tags_are_mapped_and_reported(ewt, tmp_path):
    train, _, test = ewt
    lines = test.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        cols = line.split("\t")
        if len(cols) == 10 and cols[0].isdigit():
            cols[3] = "NEWTAG"
            lines[i] = "\t".join(cols)
            break
    odd = tmp_path / "odd.conllu"
    odd.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = tagging_data(train, odd)
    assert data.summary["unknown_test_tags"] == 1
    plain = tagging_data(train, test)
    assert plain.summary["unknown_test_tags"] == 0


@needs_ewt
def test_sentence_longer_than_the_limit_is_a_one_line_error(ewt):
    train, _, test = ewt
    longest = max(len(s) for s in read_conllu(train))
    with pytest.raises(DataError) as e:
        tagging_data(train, test, max_len=longest - 1)
    assert "\n" not in str(e.value) and str(longest - 1) in str(e.value)


@needs_ewt
@pytest.mark.parametrize(
    "kw",
    [
        {"k": -1},
        {"k": 99},
        {"hidden": [8, 0]},
        {"epochs": 0},
        {"k": 0, "simplify": SimplifyConfig()},
    ],
)
def test_bad_training_options_raise(ewt, kw):
    train, _, test = ewt
    data = tagging_data(train, test)
    with pytest.raises(BadInputError):
        train_lstm(data, **{"hidden": 8, **FAST, **kw})


# --------------------------------------------------------------- row-sequential images
@needs_fmnist
def test_row_sequential_fashion_mnist_learns_and_shrinks(tmp_path):
    full = rows_data(FMNIST, dev_size=500)
    assert full.x_train.shape[1:] == (28, 28)
    data = dataclasses.replace(
        full,
        x_train=full.x_train[:3000],
        y_train=full.y_train[:3000],
        x_test=full.x_test[:1000],
        y_test=full.y_test[:1000],
    )
    simp = SimplifyConfig(prune_rate=0.05, points_per_epoch=2)
    r = train_lstm(data, hidden=32, k=8, simplify=simp, epochs=2, batch_size=50, lr=5e-3)
    assert r["best"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    (width,) = r["active_widths"]
    assert width < 32
    model, small = r["module"], r["shrunk"]
    model.eval()
    with torch.no_grad():
        assert (model(data.x_test) - small(data.x_test)).abs().max().item() <= 1e-5


def test_seqdata_batch_trims_padding_only_for_tagging():
    x = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    y = torch.tensor([[1, 2, 0, 0], [1, 0, 0, 0]])
    d = SeqData("tagging", x, y, x, y, x, y, arch={})
    xb, yb = d.batch(x, y)
    assert xb.shape == (2, 2) and yb.shape == (2, 2)
    r = SeqData("rows", x, y, x, y, x, y, arch={})
    assert r.batch(x, y)[0].shape == (2, 4)


# -------------------------------------------------------------------------------- CLI
@needs_ewt
def test_cli_trains_a_tagger_then_shrinks_it(ewt, tmp_path, capsys):
    train, dev, test = ewt
    out = tmp_path / "t.pt"
    args = ["train", "--model", "lstm-tagger", "--train", train, "--dev", dev, "--test", test]
    args += ["--hidden", "16", "--emb-dim", "8", "--k", "4", "--simplify", "--prune-rate", "0.05"]
    args += ["--epochs", "2", "--seed", "3", "-o", out, "--json", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "lstm-tagger" and result["checkpoint"] == str(out)
    # compacted: the checkpoint is at the active widths
    assert torch.load(out, weights_only=True)["arch"]["hidden"] == result["active_widths"]
    with pytest.raises(SystemExit) as e:
        main(["shrink", str(out), "--json"])
    assert e.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    ckpt = torch.load(report["path"], weights_only=True)
    assert ckpt["arch"]["hidden"] == result["active_widths"][0] <= 16
    with pytest.raises(SystemExit) as e:  # an MLP-only shrink option is refused
        main(["shrink", str(out), "--round-to", "8"])
    assert e.value.code == 2


@needs_ewt
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data", "x.npz"], "--data"),
        (["--dev-size", "10"], "--dev-size"),
        (["--sparse-update"], "dense gradients"),
    ],
)
def test_cli_rejects_options_of_the_other_family(ewt, capsys, extra, needle):
    train, _, test = ewt
    with pytest.raises(SystemExit) as e:
        main(
            ["train", "--model", "lstm-tagger", "--train", str(train), "--test", str(test), *extra]
        )
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_tagger_needs_its_files(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "lstm-tagger"])
    assert e.value.code == 2
    assert "--train and --test" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--train", "x.conllu"])  # a tagger option on the MLP
    assert e.value.code == 2


# The README's ``train --json`` schema, one for every model family.
TRAIN_JSON = {
    "model": str,
    "checkpoint": str,
    "metrics_log": str,
    "hidden_sizes": list,
    "active_widths": list,
    "epoch_times_s": list,
    "params": int,
    "macs": int,
    "best": dict,
    "final": dict,
    "train_time_s": float,
    "wall_time_s": float,
    "optimizer_resets": int,
    "kernel": str,
    "step_path": str,
    "config": dict,
    "data": dict,
}


@needs_ewt
@needs_fmnist
def test_train_json_is_one_schema_across_model_families(ewt, tiny_npz, tmp_path, capsys):
    train, dev, test = ewt
    runs = {
        "mlp": ["--data", tiny_npz, "--hidden", "16", "--dev-size", "100", "--k", "4"],
        "lstm-tagger": ["--train", train, "--dev", dev, "--test", test, "--hidden", "8"],
        "lstm-rows": ["--data", tiny_npz, "--hidden", "8", "--dev-size", "100"],
        "cnn": ["--data", tiny_npz, "--hidden", "4,6", "--dev-size", "100", "--k", "2"],
    }
    docs = {}
    for family, extra in runs.items():
        out = tmp_path / f"{family}.pt"
        args = ["train", "--model", family, *extra, "--epochs", "1", "-o", out, "--json"]
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        assert e.value.code in (0, None)
        doc = json.loads(capsys.readouterr().out)
        assert set(doc) == set(TRAIN_JSON), family
        for key, kind in TRAIN_JSON.items():
            assert isinstance(doc[key], kind), (family, key)
        assert doc["model"] == family and doc["checkpoint"] == str(out)
        assert set(doc["best"]) == {"epoch", "step", "dev_accuracy", "test_accuracy"}
        assert set(doc["final"]) == {"dev_accuracy", "test_accuracy"}
        assert all(isinstance(w, int) for w in doc["hidden_sizes"] + doc["active_widths"])
        assert len(doc["active_widths"]) == len(doc["hidden_sizes"])
        assert 0.0 <= doc["best"]["test_accuracy"] <= 1.0
        docs[family] = doc
    # field by field: the same keys and types everywhere, down to the run's config
    config_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for family, doc in docs.items():
        assert set(doc["config"]) == config_keys, family
        assert doc["config"]["model"] == family
        for part in ("best", "final"):
            for key, value in doc[part].items():
                want = int if key == "step" else float
                assert isinstance(value, want), (family, part, key)
        for key in ("params", "macs", "optimizer_resets"):
            assert doc[key] >= 0, (family, key)
    for key in config_keys:
        kinds = {type(doc["config"][key]) for doc in docs.values()} - {type(None)}
        if key not in ("hidden", "k", "simplify"):  # int or list; int or float; dict or None
            assert len(kinds) <= 1, (key, kinds)
