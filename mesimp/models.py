"""Model families and their architecture configs.

A checkpoint stores ``arch`` (plain types only) and the module is rebuilt from it
before ``load_state_dict`` (the nanoGPT pattern). The MLP *is* an
``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``/``nn.Dropout``, so its state_dict
loads into a plain ``nn.Sequential`` that anyone can write by hand, and a shrunk
model needs no mesimp code to run.
"""

from __future__ import annotations

import math
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
class CNNConfig:
    """Conv-BN-ReLU blocks (3x3 kernels, stride 1 for the first block and 2 after) ->
    global average pooling -> Linear, on one-channel square images given flattened
    (``in_features = side * side``), so it takes the MLP's data, export and bench as is.
    ``channels``: the width of each block; meSimp removes channels.
    """

    in_features: int = 784
    channels: list[int] = field(default_factory=lambda: [32, 64])
    out_features: int = 10
    model: str = "cnn"

    def __post_init__(self) -> None:
        self.channels = _hidden_list(self.channels)
        side = math.isqrt(self.in_features) if self.in_features > 0 else 0
        if side * side != self.in_features or self.out_features <= 0:
            raise BadInputError(
                f"a CNN takes square one-channel images: in_features {self.in_features} is "
                "not a square, or out_features <= 0"
            )

    def hidden_sizes(self) -> list[int]:
        return list(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CNN(nn.Module):
    """Built from a ``CNNConfig``: ``features`` (Conv2d, BatchNorm2d, ReLU per block) and
    ``head`` (Linear). Only ``torch.nn`` layers, so a shrunk CNN is plain PyTorch."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        self.side = math.isqrt(config.in_features)
        mods: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(config.channels):
            mods += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                     nn.BatchNorm2d(c), nn.ReLU()]  # fmt: skip
            c_in = c
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(c_in, config.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.head(self.features(x).mean((2, 3)))

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def conv_macs(self) -> list[int]:
        """Multiply-accumulates per image of each conv, from the layers' current widths."""
        side, out = self.side, []
        for conv in self.convs():
            side = (side + 2 - 3) // conv.stride[0] + 1
            out.append(side * side * conv.out_channels * conv.in_channels * 9)
        return out

    def macs(self) -> int:
        return sum(self.conv_macs()) + self.head.in_features * self.head.out_features


def _hidden_list(hidden: Any) -> list[int]:
    """``hidden`` as a list of layer widths (an int means one layer)."""
    widths = hidden if isinstance(hidden, (list, tuple)) else [hidden]
    if not widths:
        raise BadInputError("hidden needs at least one layer width")
    for v in widths:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"hidden widths must be integers > 0, got {hidden!r}")
    return [int(v) for v in widths]


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"{name} must be an integer > 0, got {v!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise BadInputError(f"dropout must be in [0, 1), got {config.dropout}")


class _LSTMWidths:
    """``hidden`` of the LSTM configs: one width, or a width per stacked layer."""

    hidden: int | list[int]

    def _normalize_hidden(self) -> None:
        widths = _hidden_list(self.hidden)
        self.hidden = widths[0] if len(widths) == 1 else widths

    def hidden_sizes(self) -> list[int]:
        return _hidden_list(self.hidden)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaggerConfig(_LSTMWidths):
    """A sequence tagger: embedding -> stacked single-layer LSTMs -> per-token Linear.

    ``hidden`` is one width or a width per layer (``[500, 500]`` = two stacked LSTMs).
    Layers are separate single-layer ``nn.LSTM`` modules, not one ``nn.LSTM(num_layers=2)``,
    because meSimp gives every layer its own kept width and ``nn.LSTM`` has one
    ``hidden_size`` for all its layers.
    """

    vocab_size: int
    num_tags: int
    emb_dim: int = 100
    hidden: int | list[int] = 500
    dropout: float = 0.0
    model: str = "lstm-tagger"

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "num_tags", "emb_dim"))
        self._normalize_hidden()


@dataclass
class RowLSTMConfig(_LSTMWidths):
    """An image classifier that reads an image row by row: ``[B, rows, row_width]`` ->
    stacked single-layer LSTMs -> Linear on the last step (row-sequential Fashion-MNIST:
    28 steps of 28 pixels)."""

    in_features: int = 28
    num_classes: int = 10
    hidden: int | list[int] = 128
    dropout: float = 0.0
    model: str = "lstm-rows"

    def __post_init__(self) -> None:
        _check_positive(self, ("in_features", "num_classes"))
        self._normalize_hidden()


class LSTMStack(nn.Module):
    """Single-layer ``nn.LSTM`` modules (batch_first) applied in turn, dropout between.

    State_dict keys are ``lstms.<i>.weight_ih_l0`` etc.; each entry is a plain
    ``nn.LSTM`` (or a ``MePropLSTM`` with the same names during meProp training).
    """

    def __init__(self, in_features: int, widths: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        sizes = [in_features, *widths]
        self.lstms = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(widths))
        )
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lstm in enumerate(self.lstms):
            if i:
                x = self.drop(x)
            x, _ = lstm(x)
        return self.drop(x)


class LSTMTagger(nn.Module):
    """``Embedding(padding_idx=0) -> LSTMStack -> Linear`` per token.

    Only plain ``torch.nn`` layers, so a shrunk tagger runs without mesimp; the meProp
    variant swaps each LSTM for a ``MePropLSTM`` with the same parameter names
    (``mesimp.seqtrain.meprop_lstms_``), so state_dicts move freely between them.
    """

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=0)
        self.stack = LSTMStack(config.emb_dim, config.hidden_sizes(), config.dropout)
        self.out = nn.Linear(config.hidden_sizes()[-1], config.num_tags)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """``words [B, T]`` (0 = padding) -> logits ``[B, T, num_tags]``.

        Padding sits after each sentence's last word, so a forward LSTM's states on
        real tokens never see it; no packing is needed for the logits that count.
        """
        return self.out(self.stack(self.embed(words)))


class RowLSTMClassifier(nn.Module):
    """``x [B, rows, row_width]`` -> LSTMStack -> Linear on the last row's state -> logits."""

    def __init__(self, config: RowLSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.stack = LSTMStack(config.in_features, config.hidden_sizes(), config.dropout)
        self.out = nn.Linear(config.hidden_sizes()[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stack(x)[:, -1])


_ARCH_KEYS_IGNORED = ("word_vocab", "tag_vocab")  # tagger metadata kept beside the config


ModelConfig = MLPConfig | CNNConfig | TaggerConfig | RowLSTMConfig
_CONFIGS: dict[str, tuple[type, str]] = {
    "mlp": (MLPConfig, "an MLP"),
    "cnn": (CNNConfig, "a CNN"),
    "lstm-tagger": (TaggerConfig, "an LSTM tagger"),
    "lstm-rows": (RowLSTMConfig, "a row-sequential LSTM classifier"),
}


def arch_from_dict(arch: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from a checkpoint's ``arch`` dict, refusing unknown models."""
    if not isinstance(arch, dict) or "model" not in arch:
        raise CheckpointError("checkpoint 'arch' is missing or has no 'model' field")
    kind = arch["model"]
    if kind not in _CONFIGS:
        raise CheckpointError(
            f"unknown model type {kind!r} in checkpoint (supported: {', '.join(_CONFIGS)})"
        )
    cls, what = _CONFIGS[kind]
    fields = {k: v for k, v in arch.items() if k not in _ARCH_KEYS_IGNORED}
    try:
        return cls(**fields)
    except (TypeError, BadInputError) as e:
        raise CheckpointError(f"checkpoint 'arch' does not describe {what}: {e}") from e


def build_model(arch: dict[str, Any] | ModelConfig) -> nn.Module:
    """A plain PyTorch model (only ``torch.nn`` layers) for an ``arch``."""
    config = (
        arch
        if isinstance(arch, (MLPConfig, CNNConfig, TaggerConfig, RowLSTMConfig))
        else arch_from_dict(arch)
    )
    if isinstance(config, CNNConfig):
        return CNN(config)
    if isinstance(config, TaggerConfig):
        return LSTMTagger(config)
    if isinstance(config, RowLSTMConfig):
        return RowLSTMClassifier(config)
    return MLP(config)


def is_lstm_model(model_or_arch: nn.Module | dict[str, Any]) -> bool:
    """True for the LSTM families (their shrink, export and bench paths differ)."""
    if isinstance(model_or_arch, dict):
        return model_or_arch.get("model") in ("lstm-tagger", "lstm-rows")
    return isinstance(model_or_arch, (LSTMTagger, RowLSTMClassifier))


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's ``nn.Linear`` layers (``MePropLinear`` included) in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _stack_lstms(model: nn.Module) -> list[nn.Module] | None:
    stack = getattr(model, "stack", None)
    return list(stack.lstms) if isinstance(stack, LSTMStack) else None


def lstm_stack(model: nn.Module) -> nn.ModuleList:
    """The LSTM layers of an LSTM model (``model.stack.lstms``), in order."""
    stack = getattr(model, "stack", None)
    if not isinstance(stack, LSTMStack):
        raise BadInputError(f"{type(model).__name__} has no LSTM stack (model.stack.lstms)")
    return stack.lstms


def hidden_sizes(model: nn.Module) -> list[int]:
    """Widths of the hidden layers: the LSTM layers' hidden sizes for the LSTM models,
    else every Linear's output except the last one's."""
    lstms = _stack_lstms(model)
    if lstms is not None:
        return [m.hidden_size for m in lstms]
    if isinstance(model, CNN):
        return [c.out_channels for c in model.convs()]
    return [m.out_features for _, m in linear_layers(model)[:-1]]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per example for an MLP or CNN; per time step (token or image
    row) for the LSTM models: ``4h(in + h)`` per LSTM layer plus the output Linear."""
    if isinstance(model, CNN):
        return model.macs()
    lstms = _stack_lstms(model)
    lstm_macs = sum(4 * m.hidden_size * (m.input_size + m.hidden_size) for m in lstms or [])
    return lstm_macs + sum(m.in_features * m.out_features for _, m in linear_layers(model))
