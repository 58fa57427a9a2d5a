"""The CNN family: conv blocks (Conv2d, BatchNorm2d, ReLU, MaxPool2d) and a Linear head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mesimp.errors import BadInputError
from mesimp.models.checks import hidden_list


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
        self.channels = hidden_list(self.channels)
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
