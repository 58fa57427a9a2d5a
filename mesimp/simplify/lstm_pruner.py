"""mesimp's ``nn.LSTM`` pruner, plugged into Torch-Pruning's dependency graph.

Torch-Pruning 1.6.1's own ``LSTMPruner`` takes the wrong rows (it keeps ``h`` of the
``4h`` gate rows of ``W_hh``) and raises ``IndexError``; this one reuses
``prune_lstm_hidden`` / ``prune_lstm_input``, which keep each unit's four gate rows
together, and writes the result into the layer in place, as Torch-Pruning expects.
Single-layer, unidirectional LSTMs only (the layers ``MePropLSTM`` makes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from mesimp.nn.lstm import prune_lstm_hidden, prune_lstm_input

__all__ = ["LSTMPruner"]

_PARAMS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def _keep(n: int, drop: Sequence[int]) -> torch.Tensor:
    dropped = set(int(i) for i in drop)
    return torch.tensor([i for i in range(n) if i not in dropped], dtype=torch.long)


def _take(layer: nn.LSTM, new: nn.LSTM) -> nn.LSTM:
    for name in _PARAMS:
        setattr(layer, name, nn.Parameter(getattr(new, name).detach()))
    layer.input_size, layer.hidden_size = new.input_size, new.hidden_size
    return layer


class LSTMPruner(tp.pruner.function.BasePruningFunc):
    """Hidden units out (four gate rows + a ``W_hh`` column each), input columns in."""

    TARGET_MODULES = tp.ops.TORCH_LSTM

    def prune_out_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.Module:
        return _take(layer, prune_lstm_hidden(layer, _keep(layer.hidden_size, idxs)))

    def prune_in_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.Module:
        return _take(layer, prune_lstm_input(layer, _keep(layer.input_size, idxs)))

    def get_out_channels(self, layer: nn.LSTM) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.LSTM) -> int:
        return layer.input_size
