"""POS tagging with an LSTM tagger: the CoNLL-U entry point of ``mesimp.seqtrain``.

    result = train_tagger("train.conllu", "test.conllu", hidden=500, k=20,
                          simplify=SimplifyConfig(prune_rate=0.01, points_per_epoch=2))
    small = shrink_tagger(result["model"])   # plain LSTMTagger at the kept widths

Data flow: CoNLL-U -> ``mesimp.seqdata.tagging_data`` (a fixed 90/10 split of the
training file unless a dev file is given; vocabularies from the training part only) ->
``mesimp.seqtrain.train_lstm``. Accuracy is token-level UPOS accuracy, padding excluded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.data.sequences import DEFAULT_MAX_LEN, sequence_accuracy, tagging_data
from mesimp.training.sequence import meprop_lstms_, shrink_lstm_model, train_lstm

__all__ = ["meprop_lstms_", "shrink_tagger", "tagger_accuracy", "train_tagger"]

shrink_tagger = shrink_lstm_model  # the tagger is one of the LSTM models


def tagger_accuracy(
    model: nn.Module, words: torch.Tensor, tags: torch.Tensor, batch: int = 256
) -> float:
    """Token-level accuracy over real tokens (tag 0 = padding excluded); NaN if none."""
    return sequence_accuracy(model, words, tags, tagging=True, batch=batch)


def train_tagger(
    train_path: str | Path,
    test_path: str | Path,
    *,
    dev_path: str | Path | None = None,
    heldout: float = 0.1,
    max_len: int = DEFAULT_MAX_LEN,
    hidden: int | list[int] = 500,
    emb_dim: int = 100,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train an LSTM POS tagger on CoNLL-U files (see ``train_lstm`` for ``kwargs``:
    ``k``, ``selection``, ``simplify``, ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``output``, ``progress``). Without ``dev_path``, ``heldout`` of the training file
    picks the best epoch. A sentence longer than ``max_len`` words is an error."""
    data = tagging_data(train_path, test_path, dev_path, heldout=heldout, max_len=max_len)
    return train_lstm(data, hidden=hidden, emb_dim=emb_dim, **kwargs)
