"""Models a user might bring, as plain PyTorch (the factories ``save_model`` records as
``byom_models:NAME``: pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """An MLP whose hidden blocks add into a residual stream, with dropout."""

    def __init__(self, d_in: int = 20, d: int = 24, hidden: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.fc1 = nn.ModuleList(nn.Linear(d, hidden) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, d) for _ in range(blocks))
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for a, b in zip(self.fc1, self.fc2, strict=True):
            h = h + b(self.drop(F.relu(a(h))))
        return self.out(h)


class PreLNBlock(nn.Module):
    """A pre-LayerNorm transformer block (attention + GELU FFN) and a linear head."""

    def __init__(self, d: int = 32, heads: int = 4, ffn: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ffn)
        self.ffn_out = nn.Linear(ffn, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.ffn_out(F.gelu(self.ffn_in(self.ln2(x))))
        return self.head(x.mean(1))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks and a linear head, for 1x28x28 images."""

    def __init__(self, c1: int = 16, c2: int = 32) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, stride=2), nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class LSTMTagger(nn.Module):
    """Embedding -> two stacked single-layer LSTMs -> per-token Linear."""

    def __init__(self, vocab: int = 50, emb: int = 8, h1: int = 12, h2: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm1 = nn.LSTM(emb, h1, batch_first=True)
        self.lstm2 = nn.LSTM(h1, h2, batch_first=True)
        self.out = nn.Linear(h2, 5)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(self.emb(words))
        h, _ = self.lstm2(h)
        return self.out(h)


def lstm_tagger() -> nn.Module:
    return LSTMTagger()


def residual_mlp() -> nn.Module:
    return ResidualMLP()


def preln_block() -> nn.Module:
    return PreLNBlock()


def small_cnn(c1: int = 16, c2: int = 32) -> nn.Module:
    return SmallCNN(c1, c2)


def resnet18_1ch() -> nn.Module:
    from benchmarks.torchvision_cpu import load

    load()
    from torchvision.models import resnet18

    m = resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return m


def small_vit() -> nn.Module:
    from benchmarks.torchvision_cpu import load

    load()
    from torchvision.models import VisionTransformer

    m = VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    m.conv_proj = nn.Conv2d(1, 32, 7, 7)
    return m
