"""Parsing sentences with a transition scorer, all sentences of a batch at once; UAS/LAS.

:func:`parse` advances every sentence of a batch by one transition per step: the 48
features of each unfinished configuration are stacked into one ``[B, 48]`` int64 array,
the scorer is called once, illegal transitions are masked out and each sentence takes
its best legal one. The transition loop is plain Python; the scorer is anything that
maps feature ids to scores: a PyTorch model (:func:`torch_scorer`) or an onnxruntime
session (``mesimp.deploy.workload_parse``).

:func:`attachment_scores` counts every token, punctuation included (UD's convention in
the CoNLL 2018 shared task; C&M's English results excluded punctuation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mesimp.data.arcstandard import Configuration
from mesimp.data.conllu import Sentence
from mesimp.data.parse_features import ParserVocabs, features

__all__ = ["Parse", "Scorer", "attachment_scores", "parse", "torch_scorer"]

Scorer = Callable[[np.ndarray], np.ndarray]  # int64 [B, 48] -> scores [B, transitions]


@dataclass
class Parse:
    """A decoded tree: ``heads[i-1]`` and ``labels[i-1]`` (a relation name) of word ``i``."""

    heads: list[int]
    labels: list[str]


def parse(
    scorer: Scorer, sentences: Sequence[Sentence], vocabs: ParserVocabs, batch: int = 0
) -> list[Parse]:
    """Parse ``sentences``, ``batch`` at a time (0: all together); one scorer call per
    step of a batch."""
    step = batch if batch > 0 else max(len(sentences), 1)
    out: list[Parse] = []
    for i in range(0, len(sentences), step):
        out.extend(_parse_batch(scorer, sentences[i : i + step], vocabs))
    return out


def _parse_batch(
    scorer: Scorer, sentences: Sequence[Sentence], vocabs: ParserVocabs
) -> list[Parse]:
    n_labels = len(vocabs.label_names)
    base = vocabs.label_feature(0)
    enc = [vocabs.encode(s) for s in sentences]
    confs = [Configuration(len(s)) for s in sentences]
    active = [j for j, c in enumerate(confs) if not c.terminal]
    while active:
        feats = np.array(
            [features(confs[j], enc[j][0], enc[j][1], base) for j in active], dtype=np.int64
        )
        scores = np.asarray(scorer(feats), dtype=np.float64)
        legal = np.array([confs[j].legal(n_labels) for j in active], dtype=bool)  # [B, 3]
        mask = np.concatenate(
            [
                legal[:, :1],
                np.repeat(legal[:, 1:2], n_labels, 1),
                np.repeat(legal[:, 2:], n_labels, 1),
            ],
            axis=1,
        )
        best = np.where(mask, scores, -np.inf).argmax(1)
        for j, t in zip(active, best.tolist(), strict=True):
            confs[j].apply(t, n_labels)
        active = [j for j in active if not confs[j].terminal]
    names = vocabs.label_names
    return [Parse(c.heads[1:], [names[x] for x in c.labels[1:]]) for c in confs]


def attachment_scores(parses: Sequence[Parse], gold: Sequence[Sentence]) -> dict[str, float]:
    """``uas``, ``las`` over every token (punctuation included) and ``tokens``."""
    total = uas = las = 0
    for p, s in zip(parses, gold, strict=True):
        for h, lab, gh, gl in zip(p.heads, p.labels, s.heads, s.deprels, strict=True):
            total += 1
            if h == gh:
                uas += 1
                las += lab == gl
    nan = float("nan")
    return {
        "uas": uas / total if total else nan,
        "las": las / total if total else nan,
        "tokens": total,
    }


def torch_scorer(model: nn.Module) -> Scorer:
    """A scorer running ``model`` (left in eval mode by the caller) without gradients."""
    device = next(model.parameters()).device

    def score(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return score
