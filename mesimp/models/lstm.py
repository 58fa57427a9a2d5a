"""The LSTM families: a UPOS tagger and a row-sequential image classifier, both a stack
of single-layer ``nn.LSTM`` (one kept width per layer after meSimp) and a Linear head."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mesimp.models.checks import check_positive, hidden_list


class _LSTMWidths:
    """``hidden`` of the LSTM configs: one width, or a width per stacked layer."""

    hidden: int | list[int]

    def _normalize_hidden(self) -> None:
        widths = hidden_list(self.hidden)
        self.hidden = widths[0] if len(widths) == 1 else widths

    def hidden_sizes(self) -> list[int]:
        return hidden_list(self.hidden)

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
        check_positive(self, ("vocab_size", "num_tags", "emb_dim"))
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
        check_positive(self, ("in_features", "num_classes"))
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
    (``mesimp.training.sequence.meprop_lstms_``), so state_dicts move freely between them.
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
