"""The dependency parser: transition system, oracle, features, masked == shrunk, the CLI.

Independent references: the gold trees themselves (the oracle must rebuild them), a
brute-force arc-crossing check (projectivity), dependents found by sorting the arcs
built so far (features), the masked model before shrinking in float64 (shrink).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from mesimp.data.arcstandard import (
    SHIFT,
    Configuration,
    check_tree,
    is_projective,
    n_transitions,
    oracle,
)
from mesimp.data.conllu import Sentence
from mesimp.data.parse_decode import attachment_scores, parse
from mesimp.data.parse_features import NULL, OFFSET, ROOT, ParserVocabs, features
from mesimp.data.parsing import read_trees
from mesimp.errors import DataError
from mesimp.models import ParserConfig, build_model
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.graph_shrink import shrink

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
DEV = EWT / "en_ewt-ud-dev.conllu"


# ------------------------------------------------------------------ random trees
@st.composite
def projective_trees(draw, max_n: int = 14) -> list[int]:
    """Heads (0 = ROOT) of a random projective tree: each span gets a head, and the
    words left and right of it are cut into consecutive sub-spans whose heads attach
    to it (the root span's sub-heads attach to ROOT: one or several roots)."""
    n = draw(st.integers(1, max_n))
    heads = [0] * n

    def span(lo: int, hi: int, parent: int) -> None:  # words lo..hi (1-based), inclusive
        while lo <= hi:
            cut = draw(st.integers(lo, hi))  # a sub-span lo..cut under parent
            h = draw(st.integers(lo, cut))
            heads[h - 1] = parent
            span(lo, h - 1, h)
            span(h + 1, cut, h)
            lo = cut + 1

    span(1, n, 0)
    return heads


@st.composite
def any_trees(draw, max_n: int = 10) -> list[int]:
    """Heads of a random tree (projective or not): words attach in a random order, each
    to ROOT or to a word already attached."""
    n = draw(st.integers(1, max_n))
    order = draw(st.permutations(list(range(1, n + 1))))
    heads = [0] * n
    placed = [0]
    for w in order:
        heads[w - 1] = draw(st.sampled_from(placed))
        placed.append(w)
    return heads


def crossing(heads: list[int]) -> bool:
    """Brute force: do two arcs (ROOT's included) cross?"""
    arcs = [(min(h, d), max(h, d)) for d, h in enumerate(heads, start=1)]
    return any(a < c < b < e for a, b in arcs for c, e in arcs)


def run_oracle(heads: list[int], labels: list[int], n_labels: int) -> Configuration:
    c = Configuration(len(heads))
    for t in oracle(heads, labels, n_labels):
        c.apply(t, n_labels)
    assert c.terminal
    return c


# ------------------------------------------------------------------ transition system
@settings(max_examples=150, deadline=None)
@given(projective_trees(), st.randoms(use_true_random=False))
def test_oracle_rebuilds_random_projective_trees(heads, rnd):
    labels = [rnd.randrange(3) for _ in heads]
    c = run_oracle(heads, labels, 3)
    assert c.heads[1:] == heads
    assert c.labels[1:] == labels
    assert len(oracle(heads, labels, 3)) == 2 * len(heads)


@settings(max_examples=300, deadline=None)
@given(any_trees())
def test_projectivity_matches_brute_force_crossing(heads):
    check_tree(heads)
    assert is_projective(heads) == (not crossing(heads))
    if not is_projective(heads):
        with pytest.raises(DataError, match="non-projective"):
            oracle(heads, [0] * len(heads), 1)


@pytest.mark.skipif(not DEV.is_file(), reason=f"{DEV} not found")
def test_oracle_rebuilds_every_projective_ewt_dev_tree():
    sents = read_trees(DEV, 10_000)
    vocabs = ParserVocabs.build(sents)
    projective = [s for s in sents if is_projective(s.heads)]
    assert len(projective) > 0.95 * len(sents)  # EWT dev: 2001 sentences, ~1.6% not
    n = len(vocabs.label_names)
    for s in projective:
        labels = [vocabs.label_index(d) for d in s.deprels]
        c = run_oracle(s.heads, labels, n)
        assert c.heads[1:] == s.heads, s.where()
        assert [vocabs.label_names[i] for i in c.labels[1:]] == s.deprels, s.where()


def test_check_tree_refuses_cycles_and_self_loops():
    check_tree([2, 0, 2])
    with pytest.raises(DataError, match="cycle"):
        check_tree([2, 3, 1])
    with pytest.raises(DataError, match="cycle"):
        check_tree([0, 3, 2])
    with pytest.raises(DataError, match="own head"):
        check_tree([0, 2])


def test_legal_transitions():
    c = Configuration(2)
    assert c.legal(1) == (True, False, False)  # only ROOT on the stack
    c.apply(SHIFT, 1)
    assert c.legal(1) == (True, False, False)  # ROOT may take a dependent only at the end
    c.apply(SHIFT, 1)
    assert c.legal(1) == (False, True, True)
    c.apply(2, 1)  # RIGHT-ARC: 1 -> 2
    assert c.legal(1) == (False, False, True)
    c.apply(2, 1)  # RIGHT-ARC: ROOT -> 1
    assert c.terminal and c.heads == [-1, 0, 1]
    assert n_transitions(1) == 3


# ------------------------------------------------------------------ features
def reference_features(c: Configuration, words, tags, base) -> list[int]:
    """C&M's features with dependents found by sorting the arcs built so far."""
    deps = [[d for d in range(1, c.n + 1) if c.heads[d] == h] for h in range(c.n + 1)]

    def lc(k, i):
        if k < 0:
            return -1
        left = sorted(d for d in deps[k] if d < k)
        return left[i - 1] if len(left) >= i else -1

    def rc(k, i):
        if k < 0:
            return -1
        right = sorted((d for d in deps[k] if d > k), reverse=True)
        return right[i - 1] if len(right) >= i else -1

    st_ = c.stack
    s = [st_[-i] if len(st_) >= i else -1 for i in (1, 2, 3)]
    b = [c.next + i if c.next + i <= c.n else -1 for i in range(3)]
    kids = [lc(s[0], 1), rc(s[0], 1), lc(s[0], 2), rc(s[0], 2)]
    kids += [lc(s[1], 1), rc(s[1], 1), lc(s[1], 2), rc(s[1], 2)]
    kids += [lc(lc(s[0], 1), 1), rc(rc(s[0], 1), 1), lc(lc(s[1], 1), 1), rc(rc(s[1], 1), 1)]
    pos = s + b + kids
    return (
        [words[p] if p >= 0 else NULL for p in pos]
        + [tags[p] if p >= 0 else NULL for p in pos]
        + [base + c.labels[p] if p >= 0 else NULL for p in kids]
    )


@settings(max_examples=60, deadline=None)
@given(projective_trees(), st.randoms(use_true_random=False))
def test_features_match_sorted_dependents_along_the_oracle(heads, rnd):
    n = len(heads)
    labels = [rnd.randrange(4) for _ in heads]
    words = [ROOT] + [10 + i for i in range(n)]
    tags = [ROOT] + [50 + i for i in range(n)]
    c = Configuration(n)
    for t in oracle(heads, labels, 4):
        assert features(c, words, tags, 100) == reference_features(c, words, tags, 100)
        c.apply(t, 4)


def test_features_of_a_hand_example():
    # "She ate fish": She <-nsubj- ate -obj-> fish, ate <-root- ROOT
    s = Sentence(
        ["She", "ate", "fish"], ["PRON", "VERB", "NOUN"], [2, 0, 2], ["nsubj", "root", "obj"]
    )
    v = ParserVocabs.build([s], min_count=1)
    words, tags = v.encode(s)
    w = {x: OFFSET + v.words.lookup(x) for x in s.words}
    t = {x: OFFSET + v.tags.lookup(x) for x in s.upos}
    nsubj = v.label_feature(v.label_index("nsubj"))
    c = Configuration(3)
    c.apply(SHIFT, 3)
    c.apply(SHIFT, 3)
    c.apply(1 + v.label_index("nsubj"), 3)  # LEFT-ARC(nsubj): ate -> She
    f = features(c, words, tags, v.label_feature(0))
    assert len(f) == 48
    # stack [ROOT, ate], buffer [fish]
    assert f[:6] == [w["ate"], ROOT, NULL, w["fish"], NULL, NULL]
    assert f[6] == w["She"]  # lc1(s1)
    assert f[7:18] == [NULL] * 11
    assert f[18:24] == [t["VERB"], ROOT, NULL, t["NOUN"], NULL, NULL]
    assert f[24] == t["PRON"]
    assert f[36] == nsubj and f[37:] == [NULL] * 11


# ------------------------------------------------------------------ decoding
def test_decode_always_yields_a_tree_and_scores():
    sents = [
        Sentence(["a"] * n, ["X"] * n, [0] + [1] * (n - 1), ["root"] + ["dep"] * (n - 1))
        for n in (1, 2, 5, 9)
    ]
    v = ParserVocabs.build(sents, min_count=1)
    rng = np.random.default_rng(0)
    n_t = n_transitions(len(v.label_names))
    parses = parse(lambda x: rng.normal(size=(len(x), n_t)), sents, v, batch=3)
    for p, s in zip(parses, sents, strict=True):
        check_tree(p.heads)
        assert sum(h == 0 for h in p.heads) == 1  # one word on ROOT
        assert len(p.labels) == len(s)
    perfect = attachment_scores([type(parses[0])(s.heads, s.deprels) for s in sents], sents)
    assert perfect["uas"] == perfect["las"] == 1.0 and perfect["tokens"] == 17


# ------------------------------------------------------------------ masked == shrunk
@pytest.mark.parametrize("activation", ["relu", "cube"])
def test_masked_parser_equals_shrunk_in_float64(activation):
    torch.manual_seed(0)
    cfg = ParserConfig(
        n_words=30,
        n_tags=8,
        n_labels=7,
        n_transitions=11,
        emb_dim=6,
        hidden=24,
        activation=activation,
    )
    model = build_model(cfg)
    meprop_(model, MePropConfig(k=4))
    keep = torch.zeros(24, dtype=torch.bool)
    keep[[0, 3, 4, 10, 17, 23]] = True
    model.hidden.apply_mask(keep)
    g = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            torch.randint(0, 30, (40, 18), generator=g),
            torch.randint(0, 8, (40, 18), generator=g),
            torch.randint(0, 7, (40, 12), generator=g),
        ],
        1,
    )
    small = shrink(model.eval(), x[:8])
    assert small.hidden.out_features == 6 and small.out.in_features == 6
    # independent of shrink's own check: the masked model by hand, in float64
    m64 = model.double()
    with torch.no_grad():
        emb = torch.cat(
            [
                m64.word_emb(x[:, :18]).flatten(1),
                m64.tag_emb(x[:, 18:36]).flatten(1),
                m64.label_emb(x[:, 36:]).flatten(1),
            ],
            1,
        )
        pre = (emb @ m64.hidden.weight.T + m64.hidden.bias) * keep
        h = pre.relu() if activation == "relu" else pre**3
        want = h @ m64.out.weight.T + m64.out.bias
        got = small.double()(x)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


# ------------------------------------------------------------------ CLI
def _conllu(path: Path, n: int, seed: int) -> Path:
    """``n`` random projective sentences over a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["the", "dog", "cat", "saw", "a", "big", "ran", "."]
    lines = []
    for _ in range(n):
        m = int(rng.integers(2, 9))
        heads = list(range(0, m))  # a right-branching chain: 1 <- ROOT, k+1 <- k
        for w in range(1, m + 1):
            form = words[int(rng.integers(len(words)))]
            rel = "root" if heads[w - 1] == 0 else ("det" if form in ("the", "a") else "dep")
            pos = "DET" if rel == "det" else "NOUN"
            lines.append(f"{w}\t{form}\t_\t{pos}\t_\t_\t{heads[w - 1]}\t{rel}\t_\t_")
        lines.append("")
    path.write_text(f"# sent_id = {seed}\n" + "\n".join(lines) + "\n")
    return path


def test_cli_train_shrink_export_bench(tmp_path, capsys):
    train = _conllu(tmp_path / "train.conllu", 60, 0)
    test = _conllu(tmp_path / "test.conllu", 20, 1)
    out = tmp_path / "p.pt"
    code, so, err = run_main(
        capsys,
        "train",
        "--model",
        "parser",
        "--train",
        train,
        "--dev",
        test,
        "--test",
        test,
        "--hidden",
        "16",
        "--emb-dim",
        "8",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--k",
        "4",
        "--selection",
        "topk",
        "--simplify",
        "--prune-rate",
        "0.05",
        "--threads",
        "1",
        "-o",
        out,
        "--json",
    )
    assert code == 0, err
    r = json.loads(so)
    assert r["model"] == "parser" and r["hidden_sizes"] == r["active_widths"]  # compacted
    assert r["active_widths"][0] <= 16
    for key in ("dev_uas", "dev_las", "test_uas", "test_las"):
        assert 0.0 <= r["best"][key] <= 1.0
    assert r["best"]["test_las"] <= r["best"]["test_uas"]
    code, so, err = run_main(capsys, "shrink", out, "-o", tmp_path / "s.pt", "--json")
    assert code == 0, err
    s = json.loads(so)
    assert s["max_abs_diff"] <= 1e-6
    assert s["after"]["hidden_sizes"] == r["active_widths"]
    code, so, err = run_main(capsys, "info", tmp_path / "s.pt", "--json")
    assert code == 0, err
    assert json.loads(so)["test_uas"] == r["best"]["test_uas"]  # masked == shrunk
    code, so, err = run_main(capsys, "export", tmp_path / "s.pt", "--onnx", "--json")
    assert code == 0, err
    e = json.loads(so)
    assert e["model"] == "parser" and e["max_abs_diff"] <= 1e-4 and 0 <= e["uas"] <= 1
    code, so, err = run_main(
        capsys,
        "bench",
        e["path"],
        "--conllu",
        test,
        "--threads",
        "1",
        "--repeat",
        "1",
        "--batch-sizes",
        "1,8",
        "--json",
    )
    assert code == 0, err
    b = json.loads(so)
    assert [row["batch_size"] for row in b["results"]] == [1, 8]
    for row in b["results"]:
        assert row["mode"] == "parse" and row["sentences"] == 20 and row["sentences_per_s"] > 0
        # (not compared across batch sizes: GEMM blocking may flip a near-tie)
        assert 0.0 <= row["las"] <= row["uas"] <= 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ("1\tdog\t_\tNOUN\t_\t_\t_\troot\t_\t_\n", "HEAD"),  # no head
        ("1\ta\t_\tX\t_\t_\t2\tdep\t_\t_\n2\tb\t_\tX\t_\t_\t1\tdep\t_\t_\n", "cycle"),
        (None, "not found"),
    ],
)
def test_cli_bad_conllu_is_one_line_exit_2(tmp_path, capsys, bad, match):
    test = _conllu(tmp_path / "test.conllu", 5, 1)
    train = tmp_path / "bad.conllu"
    if bad is not None:
        train.write_text(bad + "\n")
    code, so, err = run_main(
        capsys,
        "train",
        "--model",
        "parser",
        "--train",
        train,
        "--test",
        test,
        "-o",
        tmp_path / "p.pt",
    )
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1


def test_export_parity_scales_with_the_logits_but_catches_wrong_outputs():
    from mesimp.deploy.export_parser import _check_scaled_parity
    from mesimp.errors import VerificationError

    ref = np.linspace(-300, 300, 99, dtype=np.float32)[None].repeat(4, 0)
    assert _check_scaled_parity(ref + 1e-3, ref) == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(VerificationError, match="largest"):
        _check_scaled_parity(ref * 1.01, ref)  # 1 % off: a wrong weight, not rounding
    small = np.ones((2, 3), np.float32)
    with pytest.raises(VerificationError):
        _check_scaled_parity(small + 2e-4, small)  # scale 1: the plain 1e-4 bound
