"""The MLP family: an ``nn.Sequential`` of ``nn.Linear``/``nn.ReLU``/``nn.Dropout``.

Its state_dict loads into a plain ``nn.Sequential`` anyone can write by hand, so a shrunk
model needs no mesimp code to run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from mesimp.errors import BadInputError
from mesimp.nn.fused import fused_forward


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

    def forward(self, x):
        """``nn.Sequential``'s forward; once meProp layers are in, the compiled fused path
        (one autograd node for the whole stack, ``mesimp.nn.fused``) where it applies."""
        out = fused_forward(self, x)
        return out if out is not None else super().forward(x)
