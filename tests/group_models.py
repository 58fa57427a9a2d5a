"""Small models, one per kind of dependency group, and a zoo of the models users bring
(torchvision, timm, Hugging Face transformers) at small sizes, for the group tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DepthwiseChain(nn.Module):
    """MobileNet's inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, + input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24)
        self.dw, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.project, self.bn3 = nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.head(x.mean((2, 3)))


class GroupedConv(nn.Module):
    """ResNeXt's bottleneck: 1x1 -> grouped 3x3 (4 groups) -> 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(F.relu(self.conv3(x)).mean((2, 3)))


class NormStream(nn.Module):
    """Pre-norm residual blocks over a stream a Linear writes; ``norm`` is LayerNorm or
    RMSNorm, also the final norm before the head."""

    def __init__(self, norm: type[nn.Module] = nn.LayerNorm, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.norms = nn.ModuleList(norm(d) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(d, 32) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(32, d) for _ in range(2))
        self.final = norm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for n, a, b in zip(self.norms, self.fc1, self.fc2, strict=True):
            h = h + b(F.gelu(a(n(h))))
        return self.head(self.final(h))


class GatedMLP(nn.Module):
    """Llama's MLP: ``down(silu(gate(x)) * up(x))``, in a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        return self.head(h + self.down(F.silu(self.gate(h)) * self.up(h)))


class Concat(nn.Module):
    """Two conv branches concatenated on channels, read by one conv (DenseNet, Inception)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.head(F.relu(self.c(y)).mean((2, 3)))


class Tokens(nn.Module):
    """Tokens through one pre-norm attention block (``attn(x)`` -> ``[B, N, d]``)."""

    def __init__(self, attn: nn.Module, d: int = 16, call: str = "single") -> None:
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.ln = nn.LayerNorm(d)
        self.attn, self.call = attn, call
        self.fc = nn.Linear(d, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y = self.ln(h)
        a = self.attn(y, y, y, need_weights=False)[0] if self.call == "mha" else self.attn(y)
        h = h + a
        return self.head(F.relu(self.fc(h)).mean(1))


def _shim() -> Any:
    """torchvision beside the CPU torch (timm and transformers import it)."""
    from benchmarks.torchvision_cpu import load

    return load()


def timm_attention() -> nn.Module:
    _shim()
    from timm.layers import Attention

    return Tokens(Attention(16, num_heads=4, qkv_bias=True))


def torch_mha() -> nn.Module:
    return Tokens(nn.MultiheadAttention(16, 4, batch_first=True), call="mha")


def tiny_llama(**over: Any) -> nn.Module:
    """A 2-layer Llama-style decoder: RMSNorm, SwiGLU, rotary, 4 query heads on 2 kv heads."""
    _shim()
    import transformers as T

    cfg = dict(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    cfg.update(over)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**cfg))


def tiny_gpt2() -> nn.Module:
    """GPT-2 (HF ``Conv1D`` layers, fused c_attn, tied embeddings), 2 layers, d=32."""
    _shim()
    import transformers as T

    cfg = T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    cfg.bos_token_id = cfg.eos_token_id = 0
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(cfg)


def tiny_bert() -> nn.Module:
    """BERT for token classification (heads' output projection outside the block)."""
    _shim()
    import transformers as T

    cfg = T.BertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return T.BertForTokenClassification(cfg)


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = _shim()
        torch.manual_seed(0)
        return getattr(tv.models, name)(**kw)

    return build


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        _shim()
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kw)

    return build


def ids(n: int = 2, t: int = 6) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 50, (n, t), generator=torch.Generator().manual_seed(1))}


def image(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# the suite's zoo: (factory, example inputs), small inputs so that the suite stays fast
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.5, num_classes=10), image),
    "resnet18": (_tv("resnet18", num_classes=10), image),
    "regnet_x_400mf": (_tv("regnet_x_400mf", num_classes=10), image),  # grouped convs
    "efficientnet_b0": (_timm("efficientnet_b0", num_classes=10), image),  # SE, depthwise
    "convnext_atto": (_timm("convnext_atto", num_classes=10), image),  # LayerNorm2d, scale
    "vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, num_classes=10), image),
    "vit_b_torchvision": (
        _tv(
            "VisionTransformer",
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=48,
            num_classes=10,
        ),
        image,
    ),  # fmt: skip
    "bert": (tiny_bert, ids),
    "llama": (tiny_llama, ids),
    "gpt2": (tiny_gpt2, ids),
}
