"""POS tagging with an LSTM tagger: dense, meProp (``MePropLSTM``) and meSimp.

    result = train_tagger("train.conllu", "test.conllu", hidden=500, k=20,
                          simplify=SimplifyConfig(prune_rate=0.01, points_per_epoch=2))
    small = shrink_tagger(result["model"])   # plain LSTMTagger at the kept width

Data flow: CoNLL-U -> ``split_dev`` (a fixed 90/10 split of the training file, the
held-out part picks the best epoch) -> vocabularies built on the training part only
(``min_count=2``, so rare training words take the unknown-word path and its embeddings
get trained) -> padded tensors -> LSTMTagger. The loss is cross-entropy over real
tokens (tag index 0 = padding is ignored); accuracy is token-level UPOS accuracy with
padding excluded. Adam is torch's dense Adam: ``MePropLSTM``'s gradients are dense
tensors with zero rows, so the row-sparse optimizer path does not apply.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.atomic import atomic_write_text, check_writable
from mesimp.checkpoint import make_checkpoint, save_checkpoint
from mesimp.data.conllu import build_vocabs, read_conllu, split_dev, tagging_tensors
from mesimp.errors import BadInputError
from mesimp.lstm import MePropLSTM, prune_lstm_hidden
from mesimp.meprop import MePropConfig
from mesimp.models import LSTMTagger, TaggerConfig
from mesimp.optim import build_optimizer, reset_optimizer_state
from mesimp.shrink import prune_linear_in
from mesimp.simplify import (
    SimplifyConfig,
    SimplifySchedule,
    active_widths,
    prunable_layers,
    simplify_step,
)
from mesimp.train import metrics_path, seed_everything

__all__ = ["meprop_lstm_", "shrink_tagger", "tagger_accuracy", "train_tagger"]

SPLIT_SEED = 0  # the held-out split is fixed, so runs with different seeds see the same data


def meprop_lstm_(model: LSTMTagger, config: MePropConfig) -> LSTMTagger:
    """In place: swap ``model.lstm`` (an ``nn.LSTM``) for a ``MePropLSTM`` with a copy of
    its parameters (same names and layout, so the state_dict keys do not change)."""
    if not isinstance(model.lstm, nn.LSTM):
        raise BadInputError(f"meprop_lstm_: model.lstm is a {type(model.lstm).__name__}")
    model.lstm = MePropLSTM.from_lstm(model.lstm, config)
    return model


def shrink_tagger(model: LSTMTagger) -> LSTMTagger:
    """A plain ``LSTMTagger`` without the masked hidden units of ``model.lstm``.

    Each kept unit keeps its four gate rows and its W_hh column (``prune_lstm_hidden``)
    and its input column of the output Linear (``prune_linear_in``). A plain or unmasked
    LSTM keeps every unit (the result is then a plain copy). The embedding is copied.
    """
    lstm = model.lstm
    if isinstance(lstm, MePropLSTM):
        keep = lstm.mask.nonzero().squeeze(1).cpu()
    elif isinstance(lstm, nn.LSTM):
        keep = torch.arange(lstm.hidden_size)
    else:
        raise BadInputError(f"shrink_tagger: model.lstm is a {type(lstm).__name__}")
    c = model.config
    cfg = TaggerConfig(c.vocab_size, c.num_tags, c.emb_dim, int(keep.numel()), c.dropout)
    new = LSTMTagger(cfg)
    new.embed.load_state_dict(model.embed.state_dict())
    new.lstm.load_state_dict(prune_lstm_hidden(lstm, keep).state_dict())
    new.out.load_state_dict(prune_linear_in(model.out, keep).state_dict())
    return new.to(model.out.weight.device)


@torch.no_grad()
def tagger_accuracy(
    model: nn.Module, words: torch.Tensor, tags: torch.Tensor, batch: int = 256
) -> float:
    """Token-level accuracy over real tokens (tag 0 = padding excluded); NaN if none."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(words), batch):
        w, t = _trim(words[i : i + batch], tags[i : i + batch])
        real = t != 0
        correct += int(((model(w).argmax(-1) == t) & real).sum())
        total += int(real.sum())
    model.train(was_training)
    return correct / total if total else float("nan")


def _trim(words: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns past the longest sentence of a batch (fewer LSTM steps)."""
    n = int((tags != 0).sum(1).max()) if len(tags) else 0
    return words[:, :n], tags[:, :n]


def _check(hidden: int, emb_dim: int, k: int, simplify: SimplifyConfig | None, **kw) -> None:
    for name, v in {"hidden": hidden, "emb_dim": emb_dim, **kw}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"{name} must be an integer > 0, got {v!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise BadInputError(f"k must be an integer >= 0 (0 = dense backprop), got {k!r}")
    if simplify is not None and k == 0:
        raise BadInputError("meSimp (simplify) needs meProp: give k > 0")


def train_tagger(
    train_path: str | Path,
    test_path: str | Path,
    *,
    heldout: float = 0.1,
    hidden: int = 500,
    emb_dim: int = 100,
    k: int = 0,
    selection: str = "unified",
    simplify: SimplifyConfig | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 1,
    max_len: int = 200,
    output: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train an LSTM POS tagger; keep the best held-out model; report test accuracy.

    ``k > 0`` trains ``MePropLSTM`` (unit-level top-k backward, ``selection``);
    ``simplify`` adds meSimp masking at ``SimplifySchedule``'s points. Training
    sentences longer than ``max_len`` words are skipped (test sentences never are).
    The best model is the best held-out evaluation at the *current* widths (a new
    architecture starts a fresh best, as in ``mesimp.train``); its weights are in
    ``result["model"]`` on return. With ``output`` the checkpoint holds the shrunk,
    plain tagger (``arch`` = TaggerConfig fields + ``word_vocab``/``tag_vocab``), so
    ``build_model(arch)`` + ``load_state_dict`` reproduces the trained model's logits,
    and a ``.metrics.jsonl`` log sits next to it.
    """
    _check(hidden, emb_dim, k, simplify, epochs=epochs, batch_size=batch_size, max_len=max_len)
    out = check_writable(output) if output is not None else None
    MePropConfig(k=k, selection=selection)  # validate selection early
    seed_everything(seed)
    train_all = read_conllu(train_path)
    test_sents = read_conllu(test_path)
    train_sents, held_sents = split_dev(train_all, heldout, seed=SPLIT_SEED)
    train_sents = [s for s in train_sents if len(s) <= max_len]
    if not train_sents:
        raise BadInputError(f"{train_path}: no training sentence of at most {max_len} words")
    word_vocab, tag_vocab = build_vocabs(train_sents, min_count=2)
    x_train, y_train, _ = tagging_tensors(train_sents, word_vocab, tag_vocab)
    x_held, y_held, _ = tagging_tensors(held_sents, word_vocab, tag_vocab)
    x_test, y_test, _ = tagging_tensors(test_sents, word_vocab, tag_vocab)

    config = TaggerConfig(len(word_vocab), len(tag_vocab), emb_dim, hidden)
    model = LSTMTagger(config)
    if k > 0:
        meprop_lstm_(model, MePropConfig(k=k, selection=selection))
    model.train()
    optimizer = build_optimizer("adam", model.parameters(), lr, sparse_update=False)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = SimplifySchedule(simplify, steps_per_epoch) if simplify is not None else None
    order_gen = torch.Generator().manual_seed(seed)
    records: list[dict[str, Any]] = [{"event": "start", "widths": active_widths(model)}]
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    train_time = 0.0
    for epoch in range(epochs):
        if schedule is not None and schedule.cycle_starts(epoch):
            reset_optimizer_state(optimizer)
            for _, layer in prunable_layers(model):
                layer.reset_counters()
        perm = torch.randperm(n, generator=order_gen)
        loss_sum = 0.0
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            w, t = _trim(x_train[idx], y_train[idx])
            logits = model(w)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=0
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            if schedule is not None and schedule.is_point(epoch, s + 1):
                before = active_widths(model)
                widths = simplify_step(model, simplify.prune_rate, simplify.min_width)
                records.append({"event": "simplify", "epoch": epoch, "widths": widths})
                if widths != before:
                    best, best_state = None, None  # a new architecture: its best starts fresh
        train_time += time.perf_counter() - t0
        rec = {
            "event": "eval",
            "epoch": epoch + 1,
            "train_loss": loss_sum / steps_per_epoch,
            "heldout_accuracy": tagger_accuracy(model, x_held, y_held),
            "test_accuracy": tagger_accuracy(model, x_test, y_test),
            "widths": active_widths(model),
            "train_time_s": train_time,
        }
        records.append(rec)
        score = rec["heldout_accuracy"]
        if math.isnan(score):
            score = -rec["train_loss"]
        if best is None or score > best["score"]:
            best = {"score": score, **rec}
            best_state = {name: v.detach().clone() for name, v in model.state_dict().items()}
        if progress:
            print(
                f"epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f} "
                f"held-out {rec['heldout_accuracy']:.4f} test {rec['test_accuracy']:.4f} "
                f"widths {rec['widths']} ({train_time:.1f}s)",
                flush=True,
            )
    assert best is not None and best_state is not None
    # the masks only shrink and a width change resets the best, so the current masks are
    # the best model's masks: loading its weights restores it exactly
    model.load_state_dict(best_state)
    plain = shrink_tagger(model)
    arch = {
        **plain.config.to_dict(),
        "word_vocab": word_vocab.to_dict(),
        "tag_vocab": tag_vocab.to_dict(),
    }
    result: dict[str, Any] = {
        "test_accuracy": best["test_accuracy"],
        "heldout_accuracy": best["heldout_accuracy"],
        "best_epoch": best["epoch"],
        "widths": best["widths"],
        "hidden": hidden,
        "train_time_s": train_time,
        "epochs": epochs,
        "k": k,
        "selection": selection,
        "simplify": simplify.to_dict() if simplify is not None else None,
        "seed": seed,
        "data": {
            "train": str(train_path),
            "test": str(test_path),
            "train_sentences": len(train_sents),
            "heldout_sentences": len(held_sents),
            "test_sentences": len(test_sents),
            "vocab_size": len(word_vocab),
            "num_tags": len(tag_vocab),
        },
        "records": records,
        "arch": arch,
        "model": model,
    }
    if out is not None:
        meta = {k: v for k, v in result.items() if k not in ("model", "arch", "records")}
        train_info = {
            **meta,
            "metrics": {m: best[m] for m in ("heldout_accuracy", "test_accuracy")},
        }
        save_checkpoint(out, make_checkpoint(plain, arch, None, train=train_info))
        mlog = metrics_path(out)
        atomic_write_text(mlog, "".join(json.dumps(r) + "\n" for r in records))
        result["checkpoint"] = str(out)
        result["metrics_log"] = str(mlog)
    return result
