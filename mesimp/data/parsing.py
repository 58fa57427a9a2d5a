"""Dependency-parsing data: CoNLL-U trees -> (features, oracle transition) examples.

:func:`parsing_data` builds the ``parsing`` :class:`~mesimp.data.tasks.Task` the one
training loop trains a Chen & Manning parser on:

* every sentence's heads must form a tree (``check_tree``: a cycle or a self-loop is a
  one-line ``DataError`` naming the file and line);
* training examples are the configurations the static oracle passes through on each
  *projective* training tree, ``x`` = their 48 feature ids (``[N, 48]`` int64), ``y`` =
  the oracle's transition; non-projective training trees are skipped and counted
  (``summary["train_nonprojective"]``);
* dev and test examples are made the same way (projective trees whose labels the
  training data has): the loop's cheap per-evaluation metric is *transition accuracy*
  on them;
* the real metrics come from actually parsing **every** dev and test sentence
  (``Task.metrics``: ``dev_uas``, ``dev_las``, ``test_uas``, ``test_las``, every token
  counted, punctuation included), computed at each evaluation.

Vocabularies come from the training part only and travel in the checkpoint's ``arch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesimp.data.arcstandard import Configuration, check_tree, is_projective, n_transitions, oracle
from mesimp.data.conllu import Sentence, read_conllu, read_splits
from mesimp.data.parse_decode import attachment_scores, parse, torch_scorer
from mesimp.data.parse_features import N_FEATURES, ParserVocabs, features, table_size
from mesimp.data.tasks import Task
from mesimp.errors import DataError

__all__ = [
    "oracle_examples",
    "parser_arch_fields",
    "parser_check_features",
    "parsing_data",
    "read_trees",
]

DECODE_BATCH = 1024  # sentences advanced together when evaluating


def read_trees(path: str | Path, max_len: int) -> list[Sentence]:
    """Read a CoNLL-U file and check that each sentence's heads form a tree."""
    sents = read_conllu(path, max_len)
    for s in sents:
        check_tree(s.heads, s.where())
    return sents


def oracle_examples(
    sentences: Sequence[Sentence], vocabs: ParserVocabs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``(x [N, 48], y [N])`` int64 along the oracle's path through every projective tree
    whose labels are all known, and counts of the sentences used and skipped."""
    n_labels = len(vocabs.label_names)
    base = vocabs.label_feature(0)
    xs: list[list[int]] = []
    ys: list[int] = []
    used = nonproj = unknown = 0
    for s in sentences:
        if not is_projective(s.heads):
            nonproj += 1
            continue
        labels = [vocabs.label_index(d) for d in s.deprels]
        if min(labels) < 0:
            unknown += 1
            continue
        words, tags = vocabs.encode(s)
        c = Configuration(len(s))
        for t in oracle(s.heads, labels, n_labels):
            xs.append(features(c, words, tags, base))
            ys.append(t)
            c.apply(t, n_labels)
        used += 1
    # numpy first: torch.tensor on 400k nested lists is several times slower
    x = torch.from_numpy(np.array(xs, dtype=np.int64).reshape(-1, N_FEATURES))
    y = torch.from_numpy(np.array(ys, dtype=np.int64))
    return x, y, {"used": used, "nonprojective": nonproj, "unknown_label": unknown}


def parser_arch_fields(vocabs: ParserVocabs) -> dict[str, Any]:
    """What the data fixes of a parser's ``arch``: table sizes, transitions, vocabularies."""
    return {
        "n_words": table_size(vocabs.words),
        "n_tags": table_size(vocabs.tags),
        "n_labels": table_size(vocabs.labels),
        "n_transitions": n_transitions(len(vocabs.label_names)),
        **vocabs.to_dict(),
    }


class ParseMetrics:
    """``Task.metrics`` of a parsing task: UAS/LAS by parsing dev and test with the model."""

    def __init__(self, vocabs: ParserVocabs, dev: list[Sentence], test: list[Sentence]) -> None:
        self.vocabs, self.dev, self.test = vocabs, dev, test

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            scorer = torch_scorer(model)
            out: dict[str, float] = {}
            for split, sents in (("dev", self.dev), ("test", self.test)):
                if not sents:
                    out[f"{split}_uas"] = out[f"{split}_las"] = float("nan")
                    continue
                s = attachment_scores(parse(scorer, sents, self.vocabs, DECODE_BATCH), sents)
                out[f"{split}_uas"], out[f"{split}_las"] = s["uas"], s["las"]
            return out
        finally:
            model.train(was_training)


def parsing_data(
    train: str | Path,
    test: str | Path,
    dev: str | Path | None = None,
    *,
    heldout: float = 0.1,
    max_len: int = 250,
    min_count: int = 2,
) -> Task:
    """The ``parsing`` Task of CoNLL-U files (module docstring). Without ``dev`` a fixed
    ``heldout`` fraction of ``train`` picks the model."""
    train_sents, dev_sents, test_sents = read_splits(read_trees, train, test, dev, heldout, max_len)
    vocabs = ParserVocabs.build(train_sents, min_count)
    if not vocabs.label_names:
        raise DataError(f"{train}: no dependency relations in the training sentences")
    x_train, y_train, c_train = oracle_examples(train_sents, vocabs)
    if not len(y_train):
        raise DataError(f"{train}: no projective training tree; nothing to learn from")
    x_dev, y_dev, c_dev = oracle_examples(dev_sents, vocabs)
    x_test, y_test, c_test = oracle_examples(test_sents, vocabs)
    return Task(
        kind="parsing",
        x_train=x_train,
        y_train=y_train,
        x_dev=x_dev,
        y_dev=y_dev,
        x_test=x_test,
        y_test=y_test,
        arch=parser_arch_fields(vocabs),
        summary={
            "task": "dependency-parsing",
            "train": str(train),
            "dev": str(dev) if dev is not None else f"{heldout:g} of train held out",
            "test": str(test),
            "train_sentences": len(train_sents),
            "train_nonprojective": c_train["nonprojective"],
            "train_examples": len(y_train),
            "dev_sentences": len(dev_sents),
            "test_sentences": len(test_sents),
            "test_tokens": sum(len(s) for s in test_sents),
            "transition_accuracy_on": "oracle paths of projective dev/test trees with known labels",
            "attachment_scores": "every dev/test sentence parsed; all tokens, punctuation included",
            "pos_features": "gold UPOS",
            "vocab_size": len(vocabs.words),
            "labels": len(vocabs.label_names),
            "max_len": max_len,
        },
        metrics=ParseMetrics(vocabs, dev_sents, test_sents),
    )


def parser_check_features(
    ckpt: dict[str, Any], conllu: str | Path | None = None, limit: int = 2000
) -> tuple[torch.Tensor, torch.Tensor | None, list[Sentence], str]:
    """Inputs to check a parser checkpoint on (shrink, export): the oracle feature rows
    of ``conllu``'s first 500 sentences (default: the test file recorded at training, if
    it still exists), encoded with the checkpoint's vocabularies, at most ``limit`` rows,
    with their oracle transitions and the sentences; else ``limit`` random id rows
    (seeded), no labels and no sentences. Returns ``(x, y, sentences, source)``."""
    arch = ckpt["arch"]
    if conllu is None:
        test = ((ckpt.get("train") or {}).get("data") or {}).get("test")
        conllu = test if test and Path(test).is_file() else None
    if conllu is not None:
        vocabs = ParserVocabs.from_dict(arch)
        sents = read_trees(conllu, 10_000)[:500]
        x, y, _ = oracle_examples(sents, vocabs)
        if len(x):
            n = min(len(x), limit)
            return x[:n], y[:n], sents, f"{conllu} (oracle features, {n} rows)"
    g = torch.Generator().manual_seed(0)
    sizes = (arch["n_words"], arch["n_tags"], arch["n_labels"])
    cols = [
        torch.randint(0, n, (limit, k), generator=g)
        for n, k in zip(sizes, (18, 18, 12), strict=True)
    ]
    return torch.cat(cols, 1), None, [], f"{limit} random feature rows"
