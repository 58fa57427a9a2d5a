"""The LSTM families: a UPOS tagger and a row-sequential image classifier, both a stack
of single-layer ``nn.LSTM`` (one kept width per layer after meSimp) and a Linear head.

The tagger may be bidirectional and read sub-word features (``mesimp.data.word_features``).
A bidirectional layer is *two* single-direction ``nn.LSTM`` modules, not one
``nn.LSTM(bidirectional=True)``: meSimp then keeps a width per direction (the two
directions learn different things and need not keep the same units or the same number),
every module stays a plain ``nn.LSTM`` that ``MePropLSTM`` and the pruner already handle,
and the next layer or the head reads ``[h_fwd; h_bwd]``. The backward direction runs on
each sentence reversed *within its length* (padding stays at the end), so it starts at
the sentence's last word, never at padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError
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
    """A sequence tagger: embedding(s) -> stacked single-layer LSTMs -> per-token Linear.

    ``hidden`` is one width or a width per layer (``[500, 500]`` = two stacked LSTMs).
    Layers are separate single-layer ``nn.LSTM`` modules, not one ``nn.LSTM(num_layers=2)``,
    because meSimp gives every layer its own kept width and ``nn.LSTM`` has one
    ``hidden_size`` for all its layers.

    ``bidirectional``: every layer is a forward and a backward LSTM; ``hidden`` is then
    one width (one layer, both directions) or a width per LSTM in the order
    ``[layer0 fwd, layer0 bwd, layer1 fwd, ...]``, so a shrunk model keeps each
    direction's own width. ``feature_vocab_sizes``: one embedding of ``feature_dim``
    per sub-word feature (suffix, shape), concatenated to the word embedding; the input
    is then ``[B, T, 1 + n_features]``. The defaults (unidirectional, no features) are
    the tagger as it was, so older checkpoints load and compute the same.
    """

    vocab_size: int
    num_tags: int
    emb_dim: int = 100
    hidden: int | list[int] = 500
    dropout: float = 0.0
    model: str = "lstm-tagger"
    bidirectional: bool = False
    feature_vocab_sizes: list[int] = field(default_factory=list)
    feature_dim: int = 30

    def __post_init__(self) -> None:
        check_positive(self, ("vocab_size", "num_tags", "emb_dim", "feature_dim"))
        sizes = self.feature_vocab_sizes
        if not isinstance(sizes, (list, tuple)) or any(
            isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes
        ):
            raise BadInputError(f"feature_vocab_sizes must be integers > 0, got {sizes!r}")
        self.feature_vocab_sizes = [int(n) for n in sizes]
        if not isinstance(self.bidirectional, bool):
            raise BadInputError(f"bidirectional must be true or false, not {self.bidirectional!r}")
        self._normalize_hidden()
        if self.bidirectional and isinstance(self.hidden, list) and len(self.hidden) % 2:
            raise BadInputError(
                f"a bidirectional tagger's hidden is one width or one per direction and "
                f"layer (an even count), got {self.hidden}"
            )

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def hidden_sizes(self) -> list[int]:
        """The width of every LSTM module in order (both directions of a layer)."""
        widths = hidden_list(self.hidden)
        return widths * 2 if self.bidirectional and len(widths) == 1 else widths

    @property
    def input_dim(self) -> int:
        return self.emb_dim + self.feature_dim * len(self.feature_vocab_sizes)


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
    ``bidirectional``: ``widths`` has one entry per LSTM, ``[l0 fwd, l0 bwd, l1 fwd,
    ...]``; layer l's two LSTMs read layer l-1's ``[fwd; bwd]`` outputs, and the
    dropout is applied to the stack's input too (a unidirectional stack keeps its old
    behaviour: between layers and on the output only).
    """

    def __init__(
        self,
        in_features: int,
        widths: list[int],
        dropout: float = 0.0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.directions = 2 if bidirectional else 1
        if len(widths) % self.directions:
            raise BadInputError(f"a bidirectional stack needs an even number of widths: {widths}")
        lstms, size = [], in_features
        for layer in range(len(widths) // self.directions):
            ws = widths[layer * self.directions : (layer + 1) * self.directions]
            lstms += [nn.LSTM(size, w, batch_first=True) for w in ws]
            size = sum(ws)
        self.lstms = nn.ModuleList(lstms)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, in]`` -> ``[B, T, out]``. A bidirectional stack needs ``lengths [B]``
        (real steps per row; padding after them)."""
        if self.directions == 1:
            for i, lstm in enumerate(self.lstms):
                if i:
                    x = self.drop(x)
                x, _ = lstm(x)
            return self.drop(x)
        if lengths is None:
            raise BadInputError("a bidirectional LSTM stack needs the sequence lengths")
        rev = reverse_index(lengths, x.shape[1])
        for i in range(0, len(self.lstms), 2):
            x = self.drop(x)
            fwd, _ = self.lstms[i](x)
            bwd, _ = self.lstms[i + 1](reverse_padded(x, rev))
            x = torch.cat([fwd, reverse_padded(bwd, rev)], -1)
        return self.drop(x)


def reverse_index(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, T]`` time indices that reverse each row's first ``lengths[b]`` steps and leave
    the padding after them in place (its own inverse)."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(t < n, n - 1 - t, t)


def reverse_padded(x: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """``x [B, T, F]`` with each row's real steps reversed by ``reverse_index``."""
    return torch.gather(x, 1, rev.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LSTMTagger(nn.Module):
    """``Embedding(padding_idx=0) -> LSTMStack -> Linear`` per token.

    Only plain ``torch.nn`` layers, so a shrunk tagger runs without mesimp; the meProp
    variant swaps each LSTM for a ``MePropLSTM`` with the same parameter names
    (``mesimp.training.sequence.meprop_lstms_``), so state_dicts move freely between them.
    """

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.hidden_sizes()
        self.embed = nn.Embedding(config.vocab_size, config.emb_dim, padding_idx=0)
        if config.feature_vocab_sizes:  # absent otherwise: old state_dicts keep their keys
            self.features = nn.ModuleList(
                nn.Embedding(n, config.feature_dim, padding_idx=0)
                for n in config.feature_vocab_sizes
            )
        self.stack = LSTMStack(config.input_dim, widths, config.dropout, config.bidirectional)
        self.out = nn.Linear(sum(widths[-config.directions :]), config.num_tags)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """``words [B, T]`` (0 = padding), or ``[B, T, 1 + n_features]`` with features
        -> logits ``[B, T, num_tags]``.

        Padding sits after each sentence's last word, so a forward LSTM's states on
        real tokens never see it; no packing is needed for the logits that count. The
        backward LSTM of a bidirectional tagger reads each sentence reversed within its
        length (``reverse_index``), so it never sees padding either.
        """
        n_feat = len(self.config.feature_vocab_sizes)
        if words.dim() != (3 if n_feat else 2) or (n_feat and words.shape[-1] != 1 + n_feat):
            want = f"[batch, seq, {1 + n_feat}]" if n_feat else "[batch, seq]"
            raise BadInputError(f"the tagger takes {want} ids, got {tuple(words.shape)}")
        if not n_feat:
            x, ids = self.embed(words), words
        else:
            ids = words[..., 0]
            embs = [self.embed(ids)]
            embs += [e(words[..., i + 1]) for i, e in enumerate(self.features)]
            x = torch.cat(embs, -1)
        lengths = (ids != 0).sum(1) if self.config.bidirectional else None
        return self.out(self.stack(x, lengths))


class RowLSTMClassifier(nn.Module):
    """``x [B, rows, row_width]`` -> LSTMStack -> Linear on the last row's state -> logits."""

    def __init__(self, config: RowLSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.stack = LSTMStack(config.in_features, config.hidden_sizes(), config.dropout)
        self.out = nn.Linear(config.hidden_sizes()[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stack(x)[:, -1])
