"""Shrink: turn masks into a physically smaller dense network of plain ``nn.Linear``.

For every hidden layer l with kept neurons K: keep rows K of ``W_l`` and ``b_l``
and columns K of ``W_{l+1}``. Masked neurons output exactly 0 (``(xW^T+b)*mask``)
and ReLU(0) = 0, so the next layer never saw them: the shrunk model computes the
same function as the masked one. ``shrink_checkpoint`` checks that on real inputs
and refuses to write a model that disagrees.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesimp.data import load_eval_data
from mesimp.data.conllu import Vocab, read_conllu, tagging_tensors
from mesimp.data.parsing import parser_check_features
from mesimp.data.tasks import classification_accuracy, sequence_accuracy
from mesimp.data.word_features import feature_vocabs_from_arch, tagger_input
from mesimp.errors import BadInputError, VerificationError
from mesimp.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.models import (
    CNNConfig,
    MLPConfig,
    build_model,
    hidden_sizes,
    is_lstm_model,
    linear_layers,
    lstm_stack,
)
from mesimp.models.info import model_info
from mesimp.nn.linear import MePropLinear
from mesimp.nn.lstm import MePropLSTM, prune_lstm_hidden, prune_lstm_input
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_, meprop_layers
from mesimp.simplify.graph_shrink import shrink as graph_shrink
from mesimp.simplify.rule import check_prune_rate, keep_rule, keep_with_min_width, round_keeps

TOLERANCE = 1e-5


def prune_linear_out(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` with only the output neurons (rows) in ``keep`` (indices)."""
    new = nn.Linear(layer.in_features, len(keep), layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[keep])
    return new


def prune_linear_in(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` reading only the inputs (columns) in ``keep`` (indices)."""
    w = layer.weight  # same dtype: a float64 check must not pass through float32
    new = nn.Linear(
        len(keep), layer.out_features, layer.bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, keep])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def layer_masks(model: nn.Module) -> list[torch.Tensor]:
    """The keep-mask of each hidden Linear (all True for plain layers)."""
    return [
        m.mask.clone()
        if isinstance(m, MePropLinear)
        else torch.ones(m.out_features, dtype=torch.bool)
        for _, m in linear_layers(model)[:-1]
    ]


def shrink_mlp(model: nn.Module, keeps: list[torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """Physically remove the neurons not in ``keeps`` (one bool mask per hidden layer).

    Returns the plain ``nn.Sequential`` MLP and its ``arch`` dict.
    """
    config: MLPConfig = model.config
    linears = linear_layers(model)
    if len(keeps) != len(linears) - 1:
        raise BadInputError(f"expected {len(linears) - 1} hidden masks, got {len(keeps)}")
    arch = MLPConfig(  # refuses a zero-width layer with a BadInputError
        in_features=config.in_features,
        hidden_sizes=[int(k.sum()) for k in keeps],
        out_features=config.out_features,
        dropout=config.dropout,
    ).to_dict()
    new_linears: list[nn.Linear] = []
    prev_keep: torch.Tensor | None = None
    for i, (_, lin) in enumerate(linears):
        plain = lin.to_linear() if isinstance(lin, MePropLinear) else lin
        if prev_keep is not None:
            plain = prune_linear_in(plain, prev_keep)
        if i < len(keeps):
            idx = keeps[i].nonzero().squeeze(1)
            plain = prune_linear_out(plain, idx)
            prev_keep = idx
        new_linears.append(plain)
    out = _assemble(arch, new_linears)
    return out, arch


def _assemble(arch: dict[str, Any], linears: list[nn.Linear]) -> nn.Module:
    """Build the plain model for ``arch`` and put ``linears`` in its Linear slots."""
    model = build_model(arch)
    slots = [n for n, _ in linear_layers(model)]
    for name, lin in zip(slots, linears, strict=True):
        setattr(model, name, lin)
    return model


def post_hoc_keeps(model: nn.Module, prune_rate: float, min_width: int) -> list[torch.Tensor]:
    """Apply the meSimp rule to the saved counters of a plain meProp checkpoint."""
    check_prune_rate(prune_rate)
    keeps = []
    for name, m in linear_layers(model)[:-1]:
        if not isinstance(m, MePropLinear) or int(m.ref) == 0:
            raise BadInputError(
                f"layer {name} has no update counters; --prune-rate needs a checkpoint "
                "trained with meProp (--k > 0)"
            )
        keep = keep_rule(m.hits, m.ref, prune_rate)
        keeps.append(keep_with_min_width(m.hits, m.mask, keep, min_width))
    return keeps


def _max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max |a(x) - b(x)| in float64 (the structural check) and in float32 (for reference).

    In float32 the two GEMM shapes round differently (sums over 500 vs 78 terms), so
    logits of size ~20 can differ by ~1e-5 with identical math; float64 removes that
    noise, so a wrong row or column shows up as a large difference and nothing else does.
    """
    if not len(x):
        return 0.0, 0.0
    with torch.no_grad():
        diff32 = float((a(x) - b(x)).abs().max())
        a64, b64 = copy.deepcopy(a).double(), copy.deepcopy(b).double()
        x64 = x.double() if x.is_floating_point() else x  # word ids stay integers
        diff = float((a64(x64) - b64(x64)).abs().max())
    return diff, diff32


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shrink_checkpoint(
    path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    prune_rate: float | None = None,
    min_width: int = 1,
    data: str | None = None,
    round_to: int = 1,
) -> dict[str, Any]:
    """Shrink a checkpoint, verify it against the masked model, write it; return a report.

    Masks come from the checkpoint (meSimp training) or, with ``prune_rate``, from
    the rule applied post hoc to its counters (plain meProp training). ``round_to``
    then rounds each width *down* to a multiple (see ``round_keeps``).
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BadInputError(f"--round-to must be an int >= 1, got {round_to!r}")
    src = load_checkpoint(path)
    out_path = Path(output) if output else Path(path).with_name(Path(path).stem + ".small.pt")
    if is_lstm_model(src["arch"]):
        if prune_rate is not None or round_to > 1:
            raise BadInputError(
                "--prune-rate and --round-to apply to MLP checkpoints only; an LSTM "
                "checkpoint is shrunk to the masks meSimp set during training"
            )
        return _shrink_lstm_checkpoint(src, path, out_path, data)
    if src["arch"].get("model") == "parser":
        if prune_rate is not None or round_to > 1:
            raise BadInputError(
                "--prune-rate and --round-to apply to MLP checkpoints only; a parser "
                "checkpoint is shrunk to the masks meSimp set during training"
            )
        return _shrink_parser_checkpoint(src, path, out_path)
    if src["arch"].get("model") == "cnn":
        if prune_rate is not None:
            raise BadInputError(
                "--prune-rate applies to MLP checkpoints only; a CNN checkpoint is shrunk "
                "to the masks meSimp set during training"
            )
        return _shrink_cnn_checkpoint(src, path, out_path, data, round_to)
    model = model_from_checkpoint(src)
    if prune_rate is not None:
        for (_, m), keep in zip(
            linear_layers(model)[:-1], post_hoc_keeps(model, prune_rate, min_width), strict=True
        ):
            m.apply_mask(keep)
    if round_to > 1:
        meprop_(model, MePropConfig())  # k=0: plain Linear math, but maskable
        for _, m in linear_layers(model)[:-1]:
            m.apply_mask(round_keeps(m, round_to))
    keeps = layer_masks(model)
    for (name, _), keep in zip(linear_layers(model)[:-1], keeps, strict=True):
        if int(keep.sum()) == 0:
            raise BadInputError(
                f"layer {name} would have zero width (a constant output); use a lower "
                "--prune-rate or --min-width >= 1"
            )
    small, arch = shrink_mlp(model, keeps)
    x, source, ds = _check_inputs(src, data, model.config.in_features)
    extra = {"prune_rate": prune_rate, "min_width": min_width}
    return _verify_and_save(
        src, path, out_path, model, small, arch, (x, source, ds), round_to, extra
    )


def _check_inputs(src: dict[str, Any], data: str | None, in_features: int) -> tuple:
    """Real test images to verify on (random inputs if there is no data), and the data."""
    dev_size = ((src.get("train") or {}).get("config") or {}).get("dev_size", 5000)
    ds = load_eval_data(data, in_features, dev_size=dev_size)
    if ds is not None:
        return ds.x_test[:2000], f"{ds.name} test[:2000]", ds
    return torch.rand(2000, in_features), "random inputs", None


def _verify_and_save(
    src: dict[str, Any],
    path: str | os.PathLike,
    out_path: Path,
    model: nn.Module,
    small: nn.Module,
    arch: dict[str, Any],
    check: tuple,
    round_to: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """masked == shrunk in float64 on ``check``'s inputs, accuracy measured again (the
    masks may have changed: post hoc rule, rounding), then the atomic write."""
    x, source, ds = check
    model.eval()
    small.eval()
    diff, _ = _max_abs_diff(model, small, x)
    if not diff <= TOLERANCE:
        raise VerificationError(
            f"shrunk model disagrees with the masked model: max_abs_diff "
            f"{diff:.3g} > {TOLERANCE}; nothing written"
        )
    train_meta = dict(src.get("train") or {})
    if ds is not None:
        train_meta["metrics"] = {
            **(train_meta.get("metrics") or {}),
            "dev_accuracy": classification_accuracy(small, ds.x_dev, ds.y_dev)
            if len(ds.y_dev)
            else None,
            "test_accuracy": classification_accuracy(small, ds.x_test, ds.y_test),
        }
    train_meta["shrunk_from"] = {
        "round_to": round_to,
        "path": str(path),
        "sha256": sha256_file(path),
        **extra,
    }
    ckpt = make_checkpoint(small, arch, None, train_meta)
    ckpt["meprop"]["config"] = src["meprop"].get("config")
    save_checkpoint(out_path, ckpt)
    return _report(path, out_path, (model, src), (small, ckpt), diff, source)


# -- CNN models --------------------------------------------------------------------------
def _shrink_cnn_checkpoint(
    src: dict[str, Any], path: str | os.PathLike, out_path: Path, data: str | None, round_to: int
) -> dict[str, Any]:
    """A CNN through the dependency-graph shrink (``mesimp.shrink``): each masked channel
    goes with its BatchNorm channel and the next conv's (or the head's) input column."""
    model = model_from_checkpoint(src).eval()
    if round_to > 1:
        for _, layer in meprop_layers(model):
            layer.apply_mask(round_keeps(layer, round_to))
    in_features = model.config.in_features
    check = _check_inputs(src, data, in_features)
    shrunk = graph_shrink(model, check[0][:64])  # traced and verified on real inputs
    arch = CNNConfig(in_features, hidden_sizes(shrunk), model.config.out_features).to_dict()
    small = build_model(arch)
    small.load_state_dict(shrunk.state_dict())
    return _verify_and_save(src, path, out_path, model, small, arch, check, round_to, {})


# -- parser models ------------------------------------------------------------------------
def _shrink_parser_checkpoint(
    src: dict[str, Any], path: str | os.PathLike, out_path: Path
) -> dict[str, Any]:
    """A parser through the dependency-graph shrink (``mesimp.shrink``): each masked hidden
    unit goes with its bias and its column of the output layer; verified in float64 on
    the oracle features of the test file recorded at training (else random ids)."""
    model = model_from_checkpoint(src).eval()
    x, _, _, source = parser_check_features(src)
    shrunk = graph_shrink(model, x[:64])  # traced and verified on real inputs
    arch = {**src["arch"], "hidden": hidden_sizes(shrunk)[0]}
    small = build_model(arch)
    small.load_state_dict(shrunk.state_dict())
    # accuracy is not re-measured (ds None): a parser's metric is UAS, found by parsing
    return _verify_and_save(src, path, out_path, model, small, arch, (x, source, None), 1, {})


# -- LSTM models -------------------------------------------------------------------------
def shrink_lstm_model(model: nn.Module) -> nn.Module:
    """A plain copy of an LSTM model without the masked hidden units of its LSTMs.

    For each layer, every kept unit keeps its four gate rows and its W_hh column
    (``prune_lstm_hidden``) and its input column of what reads it: the next layer's
    LSTM(s) ``weight_ih`` (``prune_lstm_input``) or the output Linear
    (``prune_linear_in``). A bidirectional tagger's layer outputs ``[h_fwd; h_bwd]``, so
    what reads it keeps the forward direction's kept columns and the backward
    direction's, offset by the forward width; each direction keeps its own width.
    Plain or unmasked LSTMs keep every unit. Other modules (the embeddings) are copied.
    """
    lstms = lstm_stack(model)
    keeps = []
    for lstm in lstms:
        if isinstance(lstm, MePropLSTM):
            keeps.append(lstm.mask.nonzero().squeeze(1).cpu())
        else:
            keeps.append(torch.arange(lstm.hidden_size))
    config = model.config
    dirs = getattr(config, "directions", 1)
    fields = config.to_dict()
    widths = [int(k.numel()) for k in keeps]
    fields["hidden"] = widths[0] if len(widths) == 1 else widths
    w = model.out.weight
    new = build_model(type(config)(**fields)).to(device=w.device, dtype=w.dtype)
    new_lstms = lstm_stack(new)

    def layer_out(layer: int) -> torch.Tensor:
        """Kept columns of layer ``layer``'s output (its directions concatenated)."""
        parts, offset = [], 0
        for i in range(layer * dirs, (layer + 1) * dirs):
            parts.append(keeps[i] + offset)
            offset += lstms[i].hidden_size
        return torch.cat(parts)

    for i, (lstm, keep) in enumerate(zip(lstms, keeps, strict=True)):
        small = prune_lstm_hidden(lstm, keep)
        if i >= dirs:
            small = prune_lstm_input(small, layer_out(i // dirs - 1))
        new_lstms[i].load_state_dict(small.state_dict())
    new.out.load_state_dict(
        prune_linear_in(model.out, layer_out(len(lstms) // dirs - 1)).state_dict()
    )
    if hasattr(model, "embed"):
        new.embed.load_state_dict(model.embed.state_dict())
    if hasattr(model, "features"):
        new.features.load_state_dict(model.features.state_dict())
    return new


def _lstm_check_inputs(
    src: dict[str, Any], model: nn.Module, data: str | None
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Inputs (and targets, when real data is at hand) to verify an LSTM shrink on.

    Tagger: the test file recorded at training, encoded with the checkpoint's
    vocabularies, else 500 random sentences. Rows: the image test split reshaped to
    rows, else random images. Random inputs are seeded, so a check is repeatable.
    """
    arch = src["arch"]
    gen = torch.Generator().manual_seed(0)
    if arch["model"] == "lstm-tagger":
        test = ((src.get("train") or {}).get("data") or {}).get("test")
        if test and Path(test).is_file():
            words, tags = Vocab.from_dict(arch["word_vocab"]), Vocab.from_dict(arch["tag_vocab"])
            sents = read_conllu(test)
            x, y, _ = tagging_tensors(sents, words, tags)
            x = tagger_input(sents, x, feature_vocabs_from_arch(arch))
            return x, y, f"{test} ({len(x)} sentences)"
        sizes = [model.config.vocab_size, *model.config.feature_vocab_sizes]
        x = torch.stack([torch.randint(1, max(n, 2), (500, 30), generator=gen) for n in sizes], -1)
        x = x % torch.tensor(sizes)  # a 1-row table (only padding) gets id 0
        return (x if len(sizes) > 1 else x[..., 0]), None, "500 random sentences"
    width = model.config.in_features
    ds = load_eval_data(data, width * width) if data is not None or width == 28 else None
    if ds is not None:
        return ds.x_test.reshape(len(ds.x_test), -1, width), ds.y_test, f"{ds.name} test"
    return torch.rand(500, width, width, generator=gen), None, "random images"


def _shrink_lstm_checkpoint(
    src: dict[str, Any], path: str | os.PathLike, out_path: Path, data: str | None
) -> dict[str, Any]:
    """``shrink_checkpoint`` for ``lstm-tagger`` / ``lstm-rows``: remove the masked units,
    check the plain model against the masked one (float64, all outputs), save it."""
    model = model_from_checkpoint(src).eval()
    small = shrink_lstm_model(model).eval()
    x, y, source = _lstm_check_inputs(src, model, data)
    diff, _ = _max_abs_diff(model, small, x)
    if not diff <= TOLERANCE:
        raise VerificationError(
            f"shrunk model disagrees with the masked model: max_abs_diff "
            f"{diff:.3g} > {TOLERANCE}; nothing written"
        )
    arch = {**src["arch"], **small.config.to_dict()}
    train_meta = dict(src.get("train") or {})
    if y is not None:
        tagging = arch["model"] == "lstm-tagger"
        train_meta["metrics"] = {
            **(train_meta.get("metrics") or {}),
            "test_accuracy": sequence_accuracy(small, x, y, tagging=tagging),
        }
    train_meta["shrunk_from"] = {"path": str(path), "sha256": sha256_file(path)}
    ckpt = make_checkpoint(small, arch, None, train_meta)
    ckpt["meprop"]["config"] = src["meprop"].get("config")
    save_checkpoint(out_path, ckpt)
    return _report(path, out_path, (model, src), (small, ckpt), diff, source)


def _report(
    path: str | os.PathLike,
    out_path: Path,
    before: tuple[nn.Module, dict[str, Any]],
    after: tuple[nn.Module, dict[str, Any]],
    diff: float,
    source: str,
) -> dict[str, Any]:
    """The ``shrink --json`` object: sizes before and after, and the check's result."""
    b, a = model_info(*before), model_info(*after)
    return {
        "path": str(out_path),
        "source": str(path),
        "before": b,
        "after": a,
        "max_abs_diff": diff,
        "verified_on": source,
        "params_ratio": b["params"] / max(a["params"], 1),
        "macs_ratio": b["macs"] / max(a["macs"], 1),
    }
