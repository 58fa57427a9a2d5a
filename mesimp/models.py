"""Model families and their architecture configs.

A checkpoint stores ``arch`` (plain types only) and the module is rebuilt from it
before ``load_state_dict`` (the nanoGPT pattern). The MLP *is* an
``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``/``nn.Dropout``, so its state_dict
loads into a plain ``nn.Sequential`` that anyone can write by hand, and a shrunk
model needs no mesimp code to run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError, CheckpointError


@dataclass
class MLPConfig:
    """A ReLU multi-layer perceptron: in -> hidden_sizes... -> out."""

    in_features: int = 784
    hidden_sizes: list[int] = field(default_factory=lambda: [500, 500])
    out_features: int = 10
    dropout: float = 0.0
    model: str = "mlp"

    def __post_init__(self) -> None:
        self.hidden_sizes = [int(h) for h in self.hidden_sizes]
        if self.in_features <= 0 or self.out_features <= 0:
            raise BadInputError("in_features and out_features must be > 0")
        if any(h <= 0 for h in self.hidden_sizes):
            raise BadInputError(f"hidden sizes must be > 0, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLP(nn.Sequential):
    """``nn.Sequential(Linear, ReLU, [Dropout], ..., Linear)`` built from an ``MLPConfig``.

    Dropout modules exist only when ``dropout > 0`` so that the default model's
    state_dict keys are those of the obvious hand-written ``nn.Sequential``.
    """

    def __init__(self, config: MLPConfig) -> None:
        mods: list[nn.Module] = []
        width = config.in_features
        for h in config.hidden_sizes:
            mods += [nn.Linear(width, h), nn.ReLU()]
            if config.dropout > 0:
                mods.append(nn.Dropout(config.dropout))
            width = h
        mods.append(nn.Linear(width, config.out_features))
        super().__init__(*mods)
        self.config = config


@dataclass
class TaggerConfig:
    """A sequence tagger: embedding -> single-layer LSTM -> per-token Linear."""

    vocab_size: int
    num_tags: int
    emb_dim: int = 100
    hidden: int = 500
    dropout: float = 0.0
    model: str = "lstm-tagger"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_tags", "emb_dim", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise BadInputError(f"{name} must be an integer > 0, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LSTMTagger(nn.Module):
    """``Embedding(padding_idx=0) -> LSTM(batch_first) -> [Dropout] -> Linear``.

    Only plain ``torch.nn`` layers, so a shrunk tagger runs without mesimp; the
    meProp variant swaps ``self.lstm`` for a ``MePropLSTM`` with the same parameter
    names (``mesimp.tagging.meprop_lstm_``), so state_dicts move freely between them.
    """

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=0)
        self.lstm = nn.LSTM(config.emb_dim, config.hidden, batch_first=True)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.out = nn.Linear(config.hidden, config.num_tags)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """``words [B, T]`` (0 = padding) -> logits ``[B, T, num_tags]``.

        Padding sits after each sentence's last word, so a forward LSTM's states on
        real tokens never see it; no packing is needed for the logits that count.
        """
        h, _ = self.lstm(self.embed(words))
        return self.out(self.drop(h))


_ARCH_KEYS_IGNORED = ("word_vocab", "tag_vocab")  # tagger metadata kept beside the config


def arch_from_dict(arch: dict[str, Any]) -> MLPConfig | TaggerConfig:
    """Rebuild a config from a checkpoint's ``arch`` dict, refusing unknown models."""
    if not isinstance(arch, dict) or "model" not in arch:
        raise CheckpointError("checkpoint 'arch' is missing or has no 'model' field")
    kind = arch["model"]
    if kind == "mlp":
        try:
            return MLPConfig(**arch)
        except TypeError as e:
            raise CheckpointError(f"checkpoint 'arch' does not describe an MLP: {e}") from e
    if kind == "lstm-tagger":
        fields = {k: v for k, v in arch.items() if k not in _ARCH_KEYS_IGNORED}
        try:
            return TaggerConfig(**fields)
        except TypeError as e:
            raise CheckpointError(f"checkpoint 'arch' does not describe an LSTM tagger: {e}") from e
    raise CheckpointError(
        f"unknown model type {kind!r} in checkpoint (supported: mlp, lstm-tagger)"
    )


def build_model(arch: dict[str, Any] | MLPConfig | TaggerConfig) -> nn.Module:
    """A plain PyTorch model (only ``torch.nn`` layers) for an ``arch``."""
    config = arch if isinstance(arch, (MLPConfig, TaggerConfig)) else arch_from_dict(arch)
    if isinstance(config, TaggerConfig):
        return LSTMTagger(config)
    return MLP(config)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's ``nn.Linear`` layers (``MePropLinear`` included) in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def hidden_sizes(model: nn.Module) -> list[int]:
    """Widths of the hidden layers: every Linear's output except the last one's."""
    return [m.out_features for _, m in linear_layers(model)[:-1]]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per example (one input row) for the Linear layers."""
    return sum(m.in_features * m.out_features for _, m in linear_layers(model))
