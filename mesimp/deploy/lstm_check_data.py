"""What an LSTM export is checked on: sentences for a tagger, image rows for a classifier.

A tagger is checked on real sentences when it can be: ``conllu``, else the CoNLL-U test
file recorded in the checkpoint at training, encoded with the checkpoint's
vocabularies; else random word ids of random lengths (1 to ``RANDOM_MAX_LEN`` words,
seed 0). Sentences of similar length are grouped into runs of ``CHECK_BATCH``, padded
with 0 after the words as in training, with masks marking the real tokens, so parity,
accuracy and int8 agreement count real tokens only. A row classifier is checked on
test images read as ``[N, rows, row_width]``, in runs of ``8 * CHECK_BATCH``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp.data import Vocab, read_conllu, tagging_tensors
from mesimp.data.word_features import feature_vocabs_from_arch, tagger_input
from mesimp.errors import BadInputError, CheckpointError, DataError

__all__ = ["CHECK_BATCH", "RANDOM_MAX_LEN", "SeqInputs", "rows_inputs", "tagger_inputs"]

# Parity without a CoNLL-U file: random sentences of 1..RANDOM_MAX_LEN words (seed 0).
RANDOM_MAX_LEN = 40
CHECK_BATCH = 64  # sentences (or 8x as many images) per onnxruntime/PyTorch run in checks


@dataclass
class SeqInputs:
    """What an LSTM export is checked on: model inputs in runs, with masks and labels.

    ``check``: the parity sample (PyTorch vs onnxruntime). ``evals``: the runs for
    accuracy with ``labels`` (tag ids ``[b, T]``, 0 = padding, or classes ``[b]``), or
    ``None`` without labelled data (int8 agreement then uses ``check``). ``masks`` mark
    the outputs that count (real tokens), one per run of ``evals`` (or of ``check``).
    """

    check: list[np.ndarray]
    check_masks: list[np.ndarray]
    evals: list[np.ndarray] | None
    labels: list[np.ndarray] | None
    masks: list[np.ndarray] | None
    source: str
    n_check: int
    tokens: int | None = None  # real tokens in the parity sample (taggers)
    steps: int | None = None  # image rows (row classifiers)


def _checkpoint_test_file(ckpt: dict[str, Any]) -> Path | None:
    """The CoNLL-U test file recorded by ``train_lstm``, if it still exists here."""
    train = ckpt.get("train")
    info = train.get("data") if isinstance(train, dict) else None
    path = info.get("test") if isinstance(info, dict) else None
    return Path(path) if isinstance(path, str) and Path(path).is_file() else None


def tagger_inputs(
    ckpt: dict[str, Any], conllu: str | os.PathLike | None, n_check: int
) -> SeqInputs:
    """Sentences for a tagger's checks: ``conllu`` (or the checkpoint's recorded test file)
    encoded with the checkpoint's vocabularies, else random word ids of random lengths."""
    arch = ckpt["arch"]
    vocab_size = int(arch["vocab_size"])
    feat_sizes = [int(n) for n in arch.get("feature_vocab_sizes") or []]
    path = Path(conllu) if conllu is not None else _checkpoint_test_file(ckpt)
    if path is None:
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, RANDOM_MAX_LEN + 1, n_check)
        seqs = [rng.integers(min(1, vocab_size - 1), vocab_size, n) for n in lengths]
        if feat_sizes:  # one column per feature, ids of its own table
            seqs = [
                np.stack([s, *(rng.integers(min(1, v - 1), v, len(s)) for v in feat_sizes)], -1)
                for s in seqs
            ]
        runs, _, masks = _sentence_runs(seqs, None)
        return SeqInputs(
            runs, masks, None, None, None, "random", n_check, tokens=int(lengths.sum())
        )
    if not isinstance(arch.get("word_vocab"), dict) or not isinstance(arch.get("tag_vocab"), dict):
        raise BadInputError(f"the checkpoint has no vocabularies to encode {path} with")
    word_vocab = Vocab.from_dict(arch["word_vocab"])
    tag_vocab = Vocab.from_dict(arch["tag_vocab"])
    if len(word_vocab) > vocab_size or len(tag_vocab) > int(arch["num_tags"]):
        raise CheckpointError(
            f"the checkpoint's vocabularies ({len(word_vocab)} words, {len(tag_vocab)} tags) "
            f"exceed its model ({vocab_size} words, {arch['num_tags']} tags)"
        )
    sents = read_conllu(path)
    words, tags, lengths = tagging_tensors(sents, word_vocab, tag_vocab)
    try:
        words = tagger_input(sents, words, feature_vocabs_from_arch(arch))
    except DataError as e:
        raise CheckpointError(f"the checkpoint's feature vocabularies: {e}") from e
    w, t = words.numpy(), tags.numpy()
    seqs = [w[i, :n] for i, n in enumerate(lengths.tolist())]
    labels = [t[i, :n] for i, n in enumerate(lengths.tolist())]
    check, _, check_masks = _sentence_runs(seqs[:n_check], None)
    evals, ev_labels, masks = _sentence_runs(seqs, labels)
    return SeqInputs(
        check,
        check_masks,
        evals,
        ev_labels,
        masks,
        str(path),
        min(n_check, len(seqs)),
        tokens=int(lengths[:n_check].sum()),
    )


def _sentence_runs(
    seqs: list[np.ndarray], labels: list[np.ndarray] | None
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]]:
    """Sentences grouped by length into runs of ``CHECK_BATCH``, each padded with 0 to its
    longest sentence (after the words, as in training): (word ids, tag ids, real-token masks)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    runs, tag_runs, masks = [], [], []
    for start in range(0, len(order), CHECK_BATCH):
        idx = order[start : start + CHECK_BATCH]
        t = max(len(seqs[i]) for i in idx)
        x = np.zeros((len(idx), t, *seqs[idx[0]].shape[1:]), np.int64)  # + feature columns
        y = np.zeros((len(idx), t), np.int64)
        m = np.zeros((len(idx), t), bool)
        for r, i in enumerate(idx):
            n = len(seqs[i])
            x[r, :n] = seqs[i]
            m[r, :n] = True
            if labels is not None:
                y[r, :n] = labels[i]
        runs.append(x)
        tag_runs.append(y)
        masks.append(m)
    return runs, (tag_runs if labels is not None else None), masks


def rows_inputs(
    data: str | os.PathLike | None, width: int, n_check: int, required: bool
) -> SeqInputs:
    """Test images as ``[N, rows, width]`` sequences (``load_eval_data``'s rules: the
    default data locations when ``data`` is None; random ``width x width`` images if none
    is found and the data is not ``required``)."""
    from mesimp.data import load_image_dataset

    chunk = 8 * CHECK_BATCH
    try:
        ds = load_image_dataset(data, dev_size=0)
    except DataError:
        if data is not None or required:
            raise
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n_check, width, width, generator=g).numpy()
        runs = [x[i : i + chunk] for i in range(0, len(x), chunk)]
        masks = [np.ones(len(r), bool) for r in runs]
        return SeqInputs(runs, masks, None, None, None, "random", n_check, steps=width)
    h, w = ds.image_shape
    if w != width:
        raise BadInputError(
            f"the model reads rows of {width} pixels but the images at {ds.source} are "
            f"{h}x{w}; pass the --data the model was trained on"
        )
    x = ds.x_test.numpy().reshape(-1, h, w)
    y = ds.y_test.numpy()
    check = [x[:n_check][i : i + chunk] for i in range(0, min(n_check, len(x)), chunk)]
    evals = [x[i : i + chunk] for i in range(0, len(x), chunk)]
    labels = [y[i : i + chunk] for i in range(0, len(y), chunk)]
    return SeqInputs(
        check,
        [np.ones(len(r), bool) for r in check],
        evals,
        labels,
        [np.ones(len(r), bool) for r in evals],
        ds.source,
        min(n_check, len(x)),
        steps=h,
    )
