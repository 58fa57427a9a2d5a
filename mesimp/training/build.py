"""From a ``TrainConfig`` to what the loop trains: the task's data and the model.

Every built-in family is a task (data + metric, ``mesimp.data.tasks``) plus a model
built from an ``arch`` dict, with meProp layers swapped in by the one generic
``meprop_``. A model comes from one of three places: fresh from the config, an
``--init`` checkpoint (fine-tuning: weights and meSimp masks), or a resume checkpoint
(weights, masks, counters and MSBP memory).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mesimp.data.parsing import parsing_data
from mesimp.data.tasks import Task, image_task, rows_data, tagging_data
from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.models import (
    CNNConfig,
    MLPConfig,
    ParserConfig,
    RowLSTMConfig,
    TaggerConfig,
    build_model,
)
from mesimp.nn.linear import MePropCounters
from mesimp.nn.swap import meprop_
from mesimp.training.config import CUSTOM, FAMILIES, TrainConfig
from mesimp.training.reference import reference_init_

# The arch fields the data fixes, per family: an --init checkpoint must agree on them.
_DATA_FIELDS = {
    "mlp": ("in_features", "out_features"),
    "cnn": ("in_features", "out_features"),
    "lstm-tagger": ("vocab_size", "num_tags", "word_vocab", "tag_vocab", "feature_vocabs"),
    "lstm-rows": ("in_features", "num_classes"),
    "parser": (
        "n_words",
        "n_tags",
        "n_labels",
        "n_transitions",
        "word_vocab",
        "tag_vocab",
        "label_vocab",
    ),
}


def load_task(config: TrainConfig) -> Task:
    """The data of a built-in family, as the config names it."""
    kind = FAMILIES.get(config.model)
    if kind == "images":
        return image_task(config.data, dev_size=config.dev_size)
    if kind == "rows":
        return rows_data(config.data, config.dev_size)
    if kind == "tagging":
        if config.train_file is None or config.test_file is None:
            raise BadInputError("--model lstm-tagger needs --train and --test CoNLL-U files")
        return tagging_data(
            config.train_file,
            config.test_file,
            config.dev_file,
            max_len=config.max_len,
            features=config.word_features,
            bucket=config.bucket,
        )
    if kind == "parsing":
        if config.train_file is None or config.test_file is None:
            raise BadInputError("--model parser needs --train and --test CoNLL-U files")
        return parsing_data(
            config.train_file, config.test_file, config.dev_file, max_len=config.max_len
        )
    raise BadInputError(f"--model {config.model}: pass the data as train(..., task=Task(...))")


def family_arch(config: TrainConfig, task: Task) -> dict[str, Any]:
    """The ``arch`` of a fresh model of ``config.model`` sized for ``task``'s data."""
    a, hidden = task.arch, config.hidden_sizes()
    try:
        if config.model == "mlp":
            return MLPConfig(a["in_features"], hidden, a["num_classes"], config.dropout).to_dict()
        if config.model == "cnn":
            return CNNConfig(a["in_features"], hidden, a["num_classes"]).to_dict()
        if config.model == "lstm-rows":
            return RowLSTMConfig(
                a["in_features"], a["num_classes"], hidden, config.dropout
            ).to_dict()
        if config.model == "lstm-tagger":
            tagger = {}
            if config.bidirectional:
                # one width: every direction of every layer; a list: one per direction
                # (fwd, bwd per layer), e.g. a shrunk model's widths
                tagger["bidirectional"] = True
                if not isinstance(config.hidden, list):
                    hidden = [w for w in hidden for _ in range(2)]
            if a.get("feature_vocab_sizes"):
                tagger["feature_vocab_sizes"] = a["feature_vocab_sizes"]
            arch = TaggerConfig(
                a["vocab_size"], a["num_tags"], config.emb_dim, hidden, config.dropout, **tagger
            ).to_dict()
            # the vocabularies travel with the model: export and bench encode text with them
            vocabs = {k: a[k] for k in ("word_vocab", "tag_vocab", "feature_vocabs") if k in a}
            return {**arch, **vocabs}
        if config.model == "parser":
            if len(hidden) != 1:
                raise BadInputError(f"a parser has one hidden layer; --hidden {hidden}")
            sizes = {k: a[k] for k in ("n_words", "n_tags", "n_labels", "n_transitions")}
            arch = ParserConfig(
                **sizes,
                emb_dim=config.emb_dim,
                hidden=hidden[0],
                activation=config.activation,
                dropout=config.dropout,
            ).to_dict()
            vocabs = {k: a[k] for k in ("word_vocab", "tag_vocab", "label_vocab")}
            return {**arch, **vocabs}  # the transition loop encodes text with them
    except KeyError as e:
        raise BadInputError(f"--model {config.model} does not fit {task.kind} data") from e
    raise BadInputError(f"--model {config.model}: no built-in architecture")


def build(config: TrainConfig, task: Task) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model, or the ``--init`` checkpoint's; meProp layers when they are needed."""
    if config.init:
        src = load_checkpoint(config.init)
        arch = dict(src["arch"])
        _check_init(config, task, arch)
        model = build_model(arch)
        model.load_state_dict(src["state_dict"])
        layers_state = src["meprop"].get("layers") or {}
    else:
        arch = family_arch(config, task)
        model = build_model(arch)
        if config.reference:
            reference_init_(model)
        layers_state = {}
    mcfg = config.meprop_config()
    if mcfg.k != 0 or config.simplify is not None or layers_state:
        meprop_(model, mcfg)
        for name, mod in model.named_modules():
            if isinstance(mod, MePropCounters) and name in layers_state:
                mod.apply_mask(layers_state[name]["mask"])
    return model, arch


def _check_init(config: TrainConfig, task: Task, arch: dict[str, Any]) -> None:
    family = arch.get("model")
    if family not in _DATA_FIELDS:
        raise BadInputError(f"--init {config.init}: not a built-in model ({family!r})")
    if FAMILIES[family] != FAMILIES[config.model]:
        raise BadInputError(
            f"--init {config.init} holds a {family} model, which cannot train on "
            f"--model {config.model}'s data"
        )
    fresh = family_arch(TrainConfig(model=family, hidden=1, layers=1, emb_dim=1), task)
    for key in _DATA_FIELDS[family]:
        if arch.get(key) != fresh.get(key):
            what = "vocabularies" if key.endswith("vocab") else key.replace("_", " ")
            raise BadInputError(
                f"--init model's {what} ({_short(arch.get(key))}) does not match the data's "
                f"({_short(fresh.get(key))})"
            )


def _short(v: Any) -> str:
    return f"{len(v)} entries" if isinstance(v, (dict, list)) else repr(v)


def rebuild(config: TrainConfig, ckpt: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a resume checkpoint: weights, masks, counters and MSBP memory.

    Built from the checkpoint's own ``arch`` (the ``--init`` file is not needed any
    more); it has meProp layers exactly when the interrupted run had them.
    """
    arch = dict(ckpt["arch"])
    model = build_model(arch)
    model.load_state_dict(ckpt["state_dict"])
    restore_meprop(model, config, ckpt)
    return model, arch


def restore_meprop(model: nn.Module, config: TrainConfig, ckpt: dict[str, Any]) -> None:
    """Swap in meProp layers and load their counters, masks and MSBP memory."""
    layers_state = ckpt["meprop"].get("layers") or {}
    memory = ckpt["resume"].get("msbp_memory") or {}
    if layers_state:
        meprop_(model, config.meprop_config())
        for name, mod in model.named_modules():
            if isinstance(mod, MePropCounters) and name in layers_state:
                mod.load_meprop_state(layers_state[name])
                mod._state.memory = memory.get(name)


__all__ = ["CUSTOM", "build", "family_arch", "load_task", "rebuild", "restore_meprop"]
