"""Tasks: what the training loop needs to know about data, for every model family.

A :class:`Task` is the three splits as tensors plus the task's rules: how a batch is
cut, the loss, the accuracy, and the model sizes the data fixes (input size, classes,
vocabularies). The one training loop (``mesimp.training.loop``) sees only this
interface, so meProp, meSimp, evaluation, resume and the run safety are written once.

* ``images``: inputs ``[N, H*W]`` floats in [0, 1], targets ``[N]`` (MLP, CNN).
* ``rows``: inputs ``[N, rows, row_width]``, targets ``[N]`` (the row-sequential LSTM).
* ``tagging``: inputs ``[N, T]`` word ids (0 = padding), targets ``[N, T]`` tag ids (0 =
  padding, ignored by loss and accuracy). A batch is trimmed to its longest sentence, so
  the LSTM runs no steps over pure padding. Unknown test tags map to ``<unk-tag>``, which
  no prediction matches: they count as errors and are reported, never a crash.
* ``parsing``: inputs ``[N, 48]`` feature ids of parser configurations, targets ``[N]``
  oracle transitions (``mesimp.data.parsing``); ``metrics`` parses dev and test (UAS/LAS).
* Any other ``kind`` (a user's own data through the Python API) is classification:
  targets ``[N]``, cross-entropy, example accuracy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mesimp.data.conllu import (
    SPLIT_SEED,
    Sentence,
    build_vocabs,
    read_conllu,
    read_splits,
    tagging_tensors,
)
from mesimp.data.images import load_image_dataset
from mesimp.data.word_features import FEATURES, build_feature_vocabs, tagger_input
from mesimp.errors import BadInputError

__all__ = [
    "SPLIT_SEED",
    "SeqData",
    "Task",
    "classification_accuracy",
    "image_task",
    "rows_data",
    "sequence_accuracy",
    "tagging_data",
]

DEFAULT_MAX_LEN = 250  # words; UD English EWT's longest sentence has 159
# Evaluation batch: the MLP loop always evaluated 2,000 images at a time, the LSTM
# tasks 256 sequences (an LSTM batch holds T steps of activations).
EVAL_BATCH = {"images": 2000, "parsing": 4096}


@dataclass
class Task:
    """The tensors of one task and its loss/accuracy rules.

    ``x_dev``/``y_dev`` is the held-out split the loop picks the best model on; when it
    is empty the lowest training loss picks it.
    """

    kind: str  # "images" | "rows" | "tagging" | anything else: plain classification
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_dev: torch.Tensor
    y_dev: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    arch: dict[str, Any]  # model config fields fixed by the data (sizes, vocabularies)
    summary: dict[str, Any] = field(default_factory=dict)
    # Metrics beyond accuracy, computed at every evaluation from the model (e.g. a
    # parser's UAS/LAS by actually parsing dev and test): {name: value}.
    metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None
    # tagging: > 0 sorts each window of ``bucket`` shuffled sentences by length before it
    # is cut into batches (``order``), so a batch pads to a length near its sentences'
    bucket: int = 0

    @property
    def tagging(self) -> bool:
        return self.kind == "tagging"

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch as the model sees it: tagging batches lose their all-padding columns."""
        if not self.tagging or not len(y):
            return x, y
        n = int((y != 0).sum(1).max())
        return x[:, :n], y[:, :n]

    def order(self, perm: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The epoch's example order from a random permutation: ``perm`` itself, or with
        ``bucket`` (tagging) each window of ``bucket`` examples sorted by length and its
        batches shuffled (deterministically from ``perm``, so a resume sees the same).

        Why: batches are trimmed to their longest sentence; on EWT train, random batches
        of 32 pad to 3.1x the real tokens, bucketed ones to ~1.1x, and the LSTM's time
        goes with the padded steps.
        """
        if not self.tagging or self.bucket <= 0:
            return perm
        lengths = (self.y_train != 0).sum(1)
        gen = torch.Generator().manual_seed(int(perm[0]) if len(perm) else 0)
        out = []
        for start in range(0, len(perm), self.bucket):
            win = perm[start : start + self.bucket]
            win = win[torch.sort(lengths[win], stable=True).indices]
            batches = list(torch.split(win, batch_size))
            out += [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return torch.cat(out) if out else perm

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy, averaged over the batch (or summed: the C# reference's)."""
        if self.tagging:
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                y.reshape(-1),
                ignore_index=0,
                reduction=reduction,
            )
        return F.cross_entropy(logits, y, reduction=reduction)

    def accuracy(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None
    ) -> float:
        """Token accuracy (tagging, padding excluded) or example accuracy; NaN if empty."""
        batch = batch or EVAL_BATCH.get(self.kind, 256)
        return sequence_accuracy(model, x, y, tagging=self.tagging, batch=batch)

    def fingerprint(self) -> str:
        """Cheap identity of the data (a resume must see the same): every label and a
        strided sample of the training inputs."""
        h = hashlib.sha256()
        for t in (self.y_train, self.y_dev, self.y_test):
            h.update(t.contiguous().numpy().tobytes())
        step = max(1, len(self.x_train) // 64)
        h.update(self.x_train[::step].contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device: torch.device | str) -> Task:
        """The same task with its tensors on ``device`` (the run's device)."""
        move = {k: getattr(self, k).to(device) for k in _TENSORS}
        return Task(
            self.kind,
            **move,
            arch=self.arch,
            summary=self.summary,
            metrics=self.metrics,
            bucket=self.bucket,
        )

    @property
    def source(self) -> str:
        """Where the data came from, for messages."""
        s = self.summary
        return str(s.get("source") or s.get("train") or s.get("name") or self.kind)


_TENSORS = ("x_train", "y_train", "x_dev", "y_dev", "x_test", "y_test")
SeqData = Task  # the name before the training loops were merged


def image_task(path: str | Path | None = None, dev_size: int = 5000) -> Task:
    """Image classification (MLP, CNN): flattened images; the dev split is the first
    ``dev_size`` training images, as in the meProp paper."""
    ds = load_image_dataset(path, dev_size)
    return Task(
        kind="images",
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_dev=ds.x_dev,
        y_dev=ds.y_dev,
        x_test=ds.x_test,
        y_test=ds.y_test,
        arch={"in_features": ds.x_train.shape[1], "num_classes": ds.num_classes},
        summary=ds.summary(),
    )


def classification_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000
) -> float:
    """Example accuracy of a classifier on ``(x, y)``; NaN for an empty split."""
    return sequence_accuracy(model, x, y, tagging=False, batch=batch)


@torch.no_grad()
def sequence_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, tagging: bool, batch: int = 256
) -> float:
    """Accuracy in eval mode, batch by batch: over real tokens (target 0 = padding
    excluded, all-padding columns trimmed) when ``tagging``, else over examples."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if tagging and len(yb):
            n = int((yb != 0).sum(1).max())
            xb, yb = xb[:, :n], yb[:, :n]
        pred = model(xb).argmax(-1)
        real = yb != 0 if tagging else torch.ones_like(yb, dtype=torch.bool)
        correct += int(((pred == yb) & real).sum())
        total += int(real.sum())
    model.train(was_training)
    return correct / total if total else float("nan")


def tagging_data(
    train: str | Path,
    test: str | Path,
    dev: str | Path | None = None,
    *,
    heldout: float = 0.1,
    max_len: int = DEFAULT_MAX_LEN,
    min_count: int = 2,
    features: bool = False,
    bucket: int = 0,
) -> Task:
    """UPOS tagging data from CoNLL-U files.

    Without ``dev``, a fixed ``heldout`` fraction of ``train`` is held out for model
    selection (the project's EWT protocol: train on the dev file, test on the test file).
    Vocabularies come from the training part only; ``min_count=2`` sends rare training
    words down the unknown-word path (``Vocab``'s shape classes), so those embeddings are
    trained. Any sentence longer than ``max_len`` words is a one-line ``DataError``.
    ``features``: add the sub-word feature channels (``mesimp.data.word_features``:
    suffix and shape, vocabularies from the training part, same ``min_count``); inputs
    are then ``[N, T, 3]``. ``bucket``: see ``Task.order``.
    """
    train_sents, held_sents, test_sents = read_splits(
        read_conllu, train, test, dev, heldout, max_len
    )
    word_vocab, tag_vocab = build_vocabs(train_sents, min_count=min_count)
    x_train, y_train, _ = tagging_tensors(train_sents, word_vocab, tag_vocab)
    x_held, y_held, _ = tagging_tensors(held_sents, word_vocab, tag_vocab)
    x_test, y_test, _ = tagging_tensors(test_sents, word_vocab, tag_vocab)
    feat_vocabs = build_feature_vocabs(train_sents, min_count) if features else []
    x_train = tagger_input(train_sents, x_train, feat_vocabs)
    x_held = tagger_input(held_sents, x_held, feat_vocabs)
    x_test = tagger_input(test_sents, x_test, feat_vocabs)
    unk = tag_vocab.unk_index
    feat_arch = (
        {
            "feature_vocab_sizes": [len(v) for v in feat_vocabs],
            "feature_vocabs": [v.to_dict() for v in feat_vocabs],
        }
        if features
        else {}
    )

    def tokens(sents: list[Sentence]) -> int:
        return sum(len(s) for s in sents)

    return Task(
        kind="tagging",
        x_train=x_train,
        y_train=y_train,
        x_dev=x_held,
        y_dev=y_held,
        x_test=x_test,
        y_test=y_test,
        arch={
            "vocab_size": len(word_vocab),
            "num_tags": len(tag_vocab),
            "word_vocab": word_vocab.to_dict(),
            "tag_vocab": tag_vocab.to_dict(),
            **feat_arch,
        },
        bucket=bucket,
        summary={
            "task": "upos-tagging",
            "train": str(train),
            "dev": str(dev) if dev is not None else f"{heldout:g} of train held out",
            "test": str(test),
            "train_sentences": len(train_sents),
            "heldout_sentences": len(held_sents),
            "test_sentences": len(test_sents),
            "train_tokens": tokens(train_sents),
            "test_tokens": tokens(test_sents),
            "vocab_size": len(word_vocab),
            "num_tags": len(tag_vocab),
            "unknown_test_tags": int((y_test == unk).sum()),
            "unknown_heldout_tags": int((y_held == unk).sum()),
            "max_len": max_len,
            **({"features": list(FEATURES)} if features else {}),
        },
    )


def rows_data(path: str | Path | None = None, dev_size: int = 5000) -> Task:
    """Row-sequential image classification: each image is ``rows`` steps of ``row_width``
    pixels (Fashion-MNIST: 28 x 28). The held-out split is the first ``dev_size`` training
    images, as for the MLP."""
    ds = load_image_dataset(path, dev_size)
    h, w = ds.image_shape
    if h < 1 or w < 1:
        raise BadInputError(f"row-sequential data needs 2-D images, got shape {ds.image_shape}")

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), h, w)

    return Task(
        kind="rows",
        x_train=rows(ds.x_train),
        y_train=ds.y_train,
        x_dev=rows(ds.x_dev),
        y_dev=ds.y_dev,
        x_test=rows(ds.x_test),
        y_test=ds.y_test,
        arch={"in_features": w, "num_classes": ds.num_classes},
        summary={**ds.summary(), "task": "row-sequential", "steps": h, "row_width": w},
    )
