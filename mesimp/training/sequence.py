"""The LSTM families' Python entry points, on top of the one training loop.

    data = tagging_data("train.conllu", "test.conllu")
    result = train_lstm(data, hidden=500, k=20,
                        simplify=SimplifyConfig(prune_rate=0.01, points_per_epoch=2))
    small = result["shrunk"]        # plain model at the kept widths
    result = train_tagger("train.conllu", "test.conllu", hidden=500, k=10)

Both build a ``TrainConfig`` and hand it, with the task, to ``mesimp.training.loop.train``:
optimizers, MSBP, meSimp, evaluations, resume and run safety are the MLP's. What they add
for Python callers is the best model itself: ``result["module"]`` (masked, meProp
layers, as trained) and ``result["shrunk"]`` (the plain model at the kept widths), plus
the metrics ``records`` and the shrunk model's ``arch``. Without ``output`` the
checkpoint goes to a temporary directory and ``result["checkpoint"]`` is None.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.data.tasks import DEFAULT_MAX_LEN, Task, sequence_accuracy, tagging_data
from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint
from mesimp.models import lstm_stack
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.checkpoint_shrink import shrink_lstm_model
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.loop import metrics_path, train

__all__ = [
    "meprop_lstms_",
    "shrink_lstm_model",
    "shrink_tagger",
    "tagger_accuracy",
    "train_lstm",
    "train_tagger",
]

shrink_tagger = shrink_lstm_model  # the tagger is one of the LSTM models
_FAMILY = {"tagging": "lstm-tagger", "rows": "lstm-rows"}


def meprop_lstms_(model: nn.Module, config: MePropConfig) -> nn.Module:
    """In place: swap every ``nn.LSTM`` of ``model.stack`` for a ``MePropLSTM`` with a copy
    of its parameters (same names and layout, so the state_dict keys do not change).
    ``meprop_`` restricted to the stack: the Linear layers stay plain."""
    stack = {id(m) for m in lstm_stack(model)}
    return meprop_(model, config, filter_fn=lambda _n, m: id(m) in stack, skip_output=False)


def tagger_accuracy(
    model: nn.Module, words: torch.Tensor, tags: torch.Tensor, batch: int = 256
) -> float:
    """Token-level accuracy over real tokens (tag 0 = padding excluded); NaN if none."""
    return sequence_accuracy(model, words, tags, tagging=True, batch=batch)


def train_lstm(
    data: Task,
    *,
    hidden: int | list[int] = 500,
    emb_dim: int = 100,
    dropout: float = 0.0,
    k: int | float = 0,
    selection: str = "unified",
    simplify: SimplifyConfig | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 1,
    output: str | Path | None = None,
    progress: bool | None = False,
    **options: Any,
) -> dict[str, Any]:
    """Train an LSTM model on ``data`` (a tagging or rows task); keep the best held-out
    model; report test accuracy.

    ``options`` are any other ``TrainConfig`` fields: ``msbp``, ``optimizer``,
    ``evals_per_epoch``, ``init``, ``threads``, ``save_every``, ``keep_last``.
    ``progress=False`` (the default here) trains silently.
    """
    if data.kind not in _FAMILY:
        raise BadInputError(f"train_lstm: data of kind {data.kind!r} is not an LSTM task")
    widths = hidden if isinstance(hidden, list) else [hidden]
    with tempfile.TemporaryDirectory(prefix="mesimp-") as tmp:
        out = Path(output) if output is not None else Path(tmp) / "lstm.pt"
        config = TrainConfig(
            model=_FAMILY[data.kind],
            hidden=widths,
            layers=len(widths),
            emb_dim=emb_dim,
            dropout=dropout,
            k=k,
            selection=selection,
            simplify=simplify,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            output=str(out),
            max_len=data.summary.get("max_len", DEFAULT_MAX_LEN),
            **options,
        )
        log = (lambda m: None) if progress is False else None
        result = train(config, progress=progress, log=log, task=data)
        ckpt = load_checkpoint(out)
        records = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    model = model_from_checkpoint(ckpt)
    plain = shrink_lstm_model(model)
    if output is None:
        result["checkpoint"] = result["metrics_log"] = None
    # Python callers also get the modules, the records and the shrunk model's arch
    shrunk_arch = {**ckpt["arch"], **plain.config.to_dict()}
    result.update(records=records, arch=shrunk_arch, module=model, shrunk=plain)
    return result


def train_tagger(
    train_path: str | Path,
    test_path: str | Path,
    *,
    dev_path: str | Path | None = None,
    heldout: float = 0.1,
    max_len: int = DEFAULT_MAX_LEN,
    hidden: int | list[int] = 500,
    emb_dim: int = 100,
    word_features: bool = False,
    bucket: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train an LSTM POS tagger on CoNLL-U files (see ``train_lstm`` for ``kwargs``:
    ``k``, ``selection``, ``simplify``, ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``output``, ``progress``, ``msbp``, ``optimizer``, ...). Without ``dev_path``,
    ``heldout`` of the training file picks the best epoch. A sentence longer than
    ``max_len`` words is an error. ``bidirectional=True`` (a ``kwargs`` entry),
    ``word_features`` and ``bucket``: the BiLSTM tagger with suffix/shape features and
    length-bucketed batches (README, "The bidirectional tagger")."""
    data = tagging_data(
        train_path,
        test_path,
        dev_path,
        heldout=heldout,
        max_len=max_len,
        features=word_features,
        bucket=bucket,
    )
    return train_lstm(
        data, hidden=hidden, emb_dim=emb_dim, word_features=word_features, bucket=bucket, **kwargs
    )
