"""Tests for the LSTM POS tagger (mesimp.models.LSTMTagger, mesimp.tagging).

Real data: the first 300 sentences of UD English EWT's dev file for training (a 90/10
held-out split inside ``train_tagger``) and the next 100 for testing, with tiny widths
so each training run takes about a second. Skipped when the EWT files are absent.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from mesimp.data.conllu import Vocab, read_conllu, tagging_tensors
from mesimp.errors import BadInputError
from mesimp.models import MLP, LSTMTagger, MLPConfig, TaggerConfig, arch_from_dict, build_model
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.simplify.checkpoint_shrink import shrink_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.sequence import meprop_lstms_, shrink_tagger, tagger_accuracy, train_tagger

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
DEV = EWT / "en_ewt-ud-dev.conllu"
N_TRAIN, N_TEST = 300, 100
FAST = dict(hidden=32, emb_dim=16, epochs=2, batch_size=16, lr=1e-2)

pytestmark = pytest.mark.skipif(not DEV.is_file(), reason=f"{DEV} not found")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> tuple[Path, Path]:
    """CoNLL-U files with the first 300 / next 100 sentences of the EWT dev file."""
    blocks = [b for b in DEV.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    d = tmp_path_factory.mktemp("ewt")
    train, test = d / "train.conllu", d / "test.conllu"
    train.write_text("\n\n".join(blocks[:N_TRAIN]) + "\n\n", encoding="utf-8")
    test.write_text("\n\n".join(blocks[N_TRAIN : N_TRAIN + N_TEST]) + "\n\n", encoding="utf-8")
    return train, test


def _majority_baseline(train: Path, test: Path) -> float:
    top = Counter(t for s in read_conllu(train) for t in s.upos).most_common(1)[0][0]
    tags = [t for s in read_conllu(test) for t in s.upos]
    return sum(t == top for t in tags) / len(tags)


def _test_tensors(result: dict, test: Path) -> torch.Tensor:
    words = Vocab.from_dict(result["arch"]["word_vocab"])
    tags = Vocab.from_dict(result["arch"]["tag_vocab"])
    x, _, _ = tagging_tensors(read_conllu(test), words, tags)
    return x


# ---------------------------------------------------------------------------------- model
def test_tagger_shapes_and_config_validation():
    m = LSTMTagger(TaggerConfig(vocab_size=10, num_tags=5, emb_dim=4, hidden=6))
    assert m(torch.randint(0, 10, (3, 7))).shape == (3, 7, 5)
    for bad in ("vocab_size", "num_tags", "emb_dim", "hidden"):
        kw = dict(vocab_size=10, num_tags=5, emb_dim=4, hidden=6)
        kw[bad] = 0
        with pytest.raises(BadInputError):
            TaggerConfig(**kw)


def test_build_model_dispatch_keeps_mlp():
    assert isinstance(build_model({"model": "mlp"}), MLP)
    assert isinstance(build_model(MLPConfig()), MLP)
    arch = {"model": "lstm-tagger", "vocab_size": 9, "num_tags": 4, "emb_dim": 3, "hidden": 5}
    assert isinstance(arch_from_dict(arch), TaggerConfig)
    assert isinstance(build_model(arch), LSTMTagger)


def test_meprop_lstm_swap_is_exact_forward():
    torch.manual_seed(0)
    m = LSTMTagger(TaggerConfig(vocab_size=20, num_tags=4, emb_dim=5, hidden=8))
    x = torch.randint(1, 20, (2, 6))
    ref = m(x)
    meprop_lstms_(m, MePropConfig(k=3, selection="unified"))
    assert isinstance(m.stack.lstms[0], MePropLSTM)
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- training
def test_training_beats_majority_baseline(slices):
    train, test = slices
    r = train_tagger(train, test, **FAST)
    base = _majority_baseline(train, test)
    assert r["best"]["test_accuracy"] > base + 0.05, (r["best"]["test_accuracy"], base)
    assert r["active_widths"] == [32]
    acc = tagger_accuracy(r["module"], _test_tensors(r, test), _test_labels(r, test))
    assert acc == pytest.approx(r["best"]["test_accuracy"])


def _test_labels(result: dict, test: Path) -> torch.Tensor:
    words = Vocab.from_dict(result["arch"]["word_vocab"])
    tags = Vocab.from_dict(result["arch"]["tag_vocab"])
    return tagging_tensors(read_conllu(test), words, tags)[1]


def test_deterministic_for_a_seed(slices):
    train, test = slices
    a = train_tagger(train, test, k=8, **FAST, seed=3)
    b = train_tagger(train, test, k=8, **FAST, seed=3)
    assert a["best"]["test_accuracy"] == b["best"]["test_accuracy"]
    sa, sb = a["module"].state_dict(), b["module"].state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_mesimp_shrinks_and_shrunk_model_matches(slices, tmp_path):
    train, test = slices
    out = tmp_path / "tagger.pt"
    simp = SimplifyConfig(prune_rate=0.05, points_per_epoch=2)
    r = train_tagger(train, test, k=8, simplify=simp, output=out, **FAST)
    (width,) = r["active_widths"]
    assert 1 <= width < 32
    model = r["module"]
    assert model.stack.lstms[0].active_width == width
    small = shrink_tagger(model)
    assert small.config.hidden == width and small.stack.lstms[0].hidden_size == width
    assert small.out.in_features == width
    x = _test_tensors(r, test)
    model.eval()
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert (got - ref).abs().max().item() <= 1e-5

    # the shrunk checkpoint holds a plain model that rebuilds from arch alone
    ckpt = torch.load(shrink_checkpoint(out)["path"], weights_only=True)
    assert ckpt["arch"]["model"] == "lstm-tagger" and ckpt["arch"]["hidden"] == width
    assert Vocab.from_dict(ckpt["arch"]["word_vocab"]) == Vocab.from_dict(r["arch"]["word_vocab"])
    rebuilt = build_model(ckpt["arch"])
    rebuilt.load_state_dict(ckpt["state_dict"])
    rebuilt.eval()
    with torch.no_grad():
        assert (rebuilt(x) - ref).abs().max().item() <= 1e-5
    assert ckpt["train"]["metrics"]["test_accuracy"] == r["best"]["test_accuracy"]
    assert out.with_name("tagger.metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "kw",
    [
        {"k": -1},
        {"hidden": 0},
        {"hidden": -5},
        {"emb_dim": 0},
        {"epochs": 0},
        {"k": 0, "simplify": SimplifyConfig()},
    ],
)
def test_bad_inputs_raise(slices, kw):
    train, test = slices
    with pytest.raises(BadInputError):
        train_tagger(train, test, **kw)
