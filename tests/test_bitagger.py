"""The bidirectional tagger with sub-word features (``TaggerConfig(bidirectional=True,
feature_vocab_sizes=[...])``): the reversal, meProp per direction against plain
autograd on the masked gradient, masked == shrunk with a width per direction, old
checkpoints, the CLI from train to bench, and bad input.

References are independent of the code under test: ``test_lstm.ref_forward`` (a
hand-written LSTM loop whose gate gradients are unit-masked by hooks) run on sentences
reversed by hand, and the masked model before shrink, all in float64.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import run_main
from test_lstm import NAMES, _distinct_params, _leaf, ref_forward
from torch import nn

from mesimp.data.conllu import Vocab
from mesimp.data.tasks import tagging_data
from mesimp.data.word_features import word_shape
from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mesimp.models import LSTMTagger, TaggerConfig, build_model
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig
from mesimp.simplify.checkpoint_shrink import shrink_lstm_model
from mesimp.training.config import TrainConfig
from mesimp.training.sequence import meprop_lstms_

LENGTHS = [5, 3, 1, 4]  # padded to 5: rows with 2, 4 and 1 padding steps


def _tagger(hidden, seed=0, features=(7, 6)) -> LSTMTagger:
    cfg = TaggerConfig(
        vocab_size=11,
        num_tags=5,
        emb_dim=3,
        hidden=hidden,
        bidirectional=True,
        feature_vocab_sizes=list(features),
        feature_dim=2,
    )
    m = LSTMTagger(cfg).double()
    _distinct_params(m, seed)
    return m.eval()


def _batch(channels: int = 3, seed: int = 1) -> torch.Tensor:
    """Padded ids ``[4, 5, channels]`` (0 after each sentence's words)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(LENGTHS), max(LENGTHS), channels, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        x[i, :n] = torch.randint(1, 6, (n, channels), generator=g)
    return x


def _embed(m: LSTMTagger, x: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [m.embed(x[..., 0]), *(e(x[..., i + 1]) for i, e in enumerate(m.features))], -1
    )


# ------------------------------------------------------------------------- reversal
def test_backward_direction_reads_each_sentence_reversed_and_ignores_padding():
    m = _tagger([3, 2])
    x = _batch()
    logits = m(x)
    fwd_lstm, bwd_lstm = m.stack.lstms
    for i, n in enumerate(LENGTHS):
        e = _embed(m, x[i : i + 1, :n])  # the sentence alone, no padding
        f, _ = fwd_lstm(e)
        b, _ = bwd_lstm(e.flip(1))  # an nn.LSTM on the reversed sentence
        want = m.out(torch.cat([f, b.flip(1)], -1))[0]
        torch.testing.assert_close(logits[i, :n], want, rtol=0, atol=1e-12)
        torch.testing.assert_close(m(x[i : i + 1, :n])[0], want, rtol=0, atol=1e-12)


def test_word_only_bidirectional_tagger_runs_on_word_ids():
    m = _tagger([3, 3], features=())
    x = _batch(1)[..., 0]
    out = m(x)
    torch.testing.assert_close(out[1, :3], m(x[1:2, :3])[0], rtol=0, atol=1e-12)


# ------------------------------------------------- meProp per direction vs autograd
def _ref_logits(m: LSTMTagger, params, x, k, selection):
    """The tagger by hand: ``ref_forward`` per direction, the backward one on sentences
    reversed by explicit index lists, its gate gradients unit-masked (k > 0)."""
    e = _embed(m, x)  # [B, T, in]
    steps = x.shape[1]
    rev = torch.tensor(
        [[n - 1 - t if t < n else t for t in range(steps)] for n in LENGTHS], dtype=torch.long
    )
    e_rev = torch.stack([e[i, rev[i]] for i in range(len(LENGTHS))])
    f, _, _ = ref_forward(params[0], e.transpose(0, 1), k, selection)
    b, _, _ = ref_forward(params[1], e_rev.transpose(0, 1), k, selection)
    b = b.transpose(0, 1)
    b = torch.stack([b[i, rev[i]] for i in range(len(LENGTHS))])
    return m.out(torch.cat([f.transpose(0, 1), b], -1))


@pytest.mark.parametrize("selection", ["topk", "unified"])
def test_meprop_per_direction_matches_autograd_on_the_masked_gradient(selection):
    k = 2
    ref = _tagger([4, 3], seed=3)
    model = _tagger([4, 3], seed=3).train()
    meprop_lstms_(model, MePropConfig(k=k, selection=selection))
    assert all(isinstance(m, MePropLSTM) for m in model.stack.lstms)
    x = _batch(seed=4)
    real = (x[..., 0] != 0).unsqueeze(-1).double()
    g_out = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (model(x) * g_out * real).sum().backward()
    got = [[getattr(lstm, n).grad for n in NAMES] for lstm in model.stack.lstms]

    params = [[_leaf(getattr(lstm, n)) for n in NAMES] for lstm in ref.stack.lstms]
    (_ref_logits(ref, params, x, k, selection) * g_out * real).sum().backward()
    for d in range(2):
        for name, a, b in zip(NAMES, got[d], params[d], strict=True):
            torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12, msg=f"dir {d} {name}")
    # the embeddings' gradients went through both directions' sparse dx
    assert model.embed.weight.grad is not None and model.features[0].weight.grad is not None
    # and k < width really dropped something: the dense gradient differs
    dense = _tagger([4, 3], seed=3).train()
    (dense(x) * g_out * real).sum().backward()
    assert not torch.allclose(dense.stack.lstms[0].weight_hh_l0.grad, got[0][1])


# ------------------------------------------------------------------ masked == shrunk
def test_masked_equals_shrunk_with_a_width_per_direction():
    model = _tagger([5, 4, 4, 6], seed=7)  # two bidirectional layers
    meprop_lstms_(model, MePropConfig(k=2))
    keeps = [[0, 2, 4], [1, 3], [0, 1, 2, 3], [5]]
    for lstm, keep in zip(model.stack.lstms, keeps, strict=True):
        m = torch.zeros(lstm.hidden_size, dtype=torch.bool)
        m[keep] = True
        lstm.apply_mask(m)
    model.eval()
    small = shrink_lstm_model(model).double().eval()
    assert [lstm.hidden_size for lstm in small.stack.lstms] == [3, 2, 4, 1]
    assert all(type(lstm) is nn.LSTM for lstm in small.stack.lstms)
    assert small.stack.lstms[2].input_size == 5 and small.out.in_features == 5
    assert small.config.hidden == [3, 2, 4, 1] and small.config.bidirectional
    x = _batch(seed=8)
    real = x[..., 0] != 0
    with torch.no_grad():
        diff = (model(x) - small(x))[real].abs().max().item()
    assert diff < 1e-12
    # the shrunk model is a plain model rebuilt from its arch
    again = build_model(small.config.to_dict())
    again.load_state_dict(small.state_dict())


# ----------------------------------------------------------- backward compatibility
def test_old_unidirectional_arch_and_checkpoint_load_and_compute_as_before(tmp_path):
    old_arch = {  # the fields a tagger checkpoint had before the bidirectional tagger
        "vocab_size": 9,
        "num_tags": 4,
        "emb_dim": 3,
        "hidden": [4, 3],
        "dropout": 0.0,
        "model": "lstm-tagger",
    }
    model = build_model(old_arch)
    assert not model.config.bidirectional and model.config.feature_vocab_sizes == []
    assert sorted(model.state_dict()) == sorted(
        ["embed.weight", "out.weight", "out.bias"]
        + [f"stack.lstms.{i}.{n}" for i in range(2) for n in NAMES]
    )
    _distinct_params(model, 2)
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    # the tagger as it always was: embedding -> two nn.LSTMs -> Linear
    h, _ = model.stack.lstms[0](model.embed(x))
    h, _ = model.stack.lstms[1](h)
    want = model.out(h)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    from mesimp.files.checkpoint import make_checkpoint

    ckpt = make_checkpoint(model, old_arch, None, {})
    save_checkpoint(tmp_path / "old.pt", ckpt)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "old.pt"))
    torch.testing.assert_close(again(x), want, rtol=0, atol=0)


# -------------------------------------------------------------------------- features
def test_word_shape():
    assert [word_shape(w) for w in ("McDonald", "U.S.", "3.14", "well-known", "")] == [
        "XxXx",
        "X.X.",
        "d.d",
        "x-x",
        "",
    ]


def _tiny_conllu(path: Path, n: int, seed: int) -> Path:
    """Sentences over a small lexicon whose tags follow from the words (so a tagger can
    learn them); some words only ever appear once (unknown-word path)."""
    rng = random.Random(seed)
    lex = [("the", "DET"), ("a", "DET"), ("dog", "NOUN"), ("cats", "NOUN"), ("runs", "VERB")]
    lex += [("sleeps", "VERB"), ("quickly", "ADV"), ("Paris", "PROPN"), ("42", "NUM")]
    blocks = []
    for s in range(n):
        words = [rng.choice(lex) for _ in range(rng.randint(1, 9))]
        if s % 3 == 0:
            abc = "abcdefghijklmnopqrstuvwxyz"
            words.append((f"{abc[s % 26]}{abc[s // 26]}walking", "VERB"))  # seen once
        lines = [f"# sent_id = s{s}"]
        lines += [f"{i}\t{w}\t{w}\t{t}\t_\t_\t0\t_\t_\t_" for i, (w, t) in enumerate(words, 1)]
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return path


def test_features_and_bucketing_in_the_task(tmp_path):
    tr = _tiny_conllu(tmp_path / "tr.conllu", 60, 0)
    te = _tiny_conllu(tmp_path / "te.conllu", 20, 1)
    task = tagging_data(tr, te, te, features=True, bucket=16)
    assert task.x_train.shape[-1] == 3 and task.arch["feature_vocab_sizes"][1] > 4
    # a word seen once is <unk>, but its suffix "ing" (seen 20 times) has its own id
    unk = task.x_test[..., 0] == 1
    assert unk.any()
    suffixes = Vocab.from_dict(task.arch["feature_vocabs"][0])
    assert set(task.x_test[..., 1][unk].tolist()) == {suffixes.lookup("ing")}
    perm = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(0))
    order = task.order(perm, 4)
    assert sorted(order.tolist()) == list(range(len(perm)))
    lengths = (task.y_train != 0).sum(1)
    for start in range(0, len(order), 16):  # every window's batches come out sorted inside
        for b in torch.split(order[start : start + 16], 4):
            assert lengths[b].tolist() == sorted(lengths[b].tolist())
    assert torch.equal(tagging_data(tr, te, te).order(perm, 4), perm)  # off: unchanged


# ------------------------------------------------------------------------------- CLI
def test_cli_train_shrink_export_bench(tmp_path, capsys):
    tr = _tiny_conllu(tmp_path / "tr.conllu", 80, 0)
    dv = _tiny_conllu(tmp_path / "dv.conllu", 20, 1)
    out = tmp_path / "bi.pt"
    code, stdout, err = run_main(
        capsys, "train", "--model", "lstm-tagger", "--train", tr, "--dev", dv, "--test", dv,
        "--bidirectional", "--word-features", "--bucket", "32", "--hidden", "12",
        "--emb-dim", "8", "--k", "3", "--simplify", "--prune-rate", "0.1", "--epochs", "2",
        "--batch-size", "8", "--lr", "0.01", "--threads", "1", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(stdout)
    # compacted: the model ends at the active widths, smaller than --hidden
    assert r["hidden_sizes"] == r["active_widths"] and len(r["active_widths"]) == 2
    assert sum(r["active_widths"]) < 24
    code, stdout, err = run_main(capsys, "shrink", out, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["max_abs_diff"] < 1e-9 and s["after"]["hidden_sizes"] == r["active_widths"]
    small = Path(s["path"])
    onnx = tmp_path / "bi.onnx"
    code, stdout, err = run_main(capsys, "export", small, "--onnx", "-o", onnx, "--json")
    assert code == 0, err
    e = json.loads(stdout)
    assert e["lstm_nodes"] == 2 and e["max_abs_diff"] < 1e-4
    code, stdout, err = run_main(capsys, "export", small, "--onnx", "--int8", "--json")
    assert code == 0, err
    q = json.loads(stdout)
    assert q["int8_agreement"] > 0.8
    code, stdout, err = run_main(
        capsys, "bench", onnx, q["path"], "--threads", "1", "--sentences", "10",
        "--repeat", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(stdout)["results"]
    assert {row["batch_size"] for row in rows} == {1} and len(rows) == 2


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(BadInputError, match="even count"):
        TaggerConfig(vocab_size=5, num_tags=3, hidden=[4, 4, 4], bidirectional=True)
    with pytest.raises(BadInputError, match="feature_vocab_sizes"):
        TaggerConfig(vocab_size=5, num_tags=3, feature_vocab_sizes=[0])
    m = _tagger([3, 3])
    with pytest.raises(BadInputError, match=r"\[batch, seq, 3\]"):
        m(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(BadInputError, match="--bidirectional: for --model lstm-tagger only"):
        TrainConfig(model="lstm-rows", bidirectional=True)
    code, _, err = run_main(capsys, "train", "--model", "mlp", "--bidirectional")
    assert code == 2 and "--bidirectional" in err
    tr = _tiny_conllu(tmp_path / "tr.conllu", 10, 0)
    code, _, err = run_main(
        capsys, "train", "--model", "lstm-tagger", "--train", tr, "--test", tr, "--bucket", "-1"
    )
    assert code == 2 and "--bucket" in err and len(err.strip().splitlines()) == 1
