"""Chains of Linear layers in users' models run as one fused node, and compute what the
Python path computes.

``meprop_`` turns every ``nn.Sequential`` holding a chain ``Linear ([ReLU|GELU] [Dropout]
Linear)*`` with meProp in it into a ``MePropSequential``, whose chains run as one C++
autograd node (mesimp.nn.fused). The reference is the pure-Python path
(``MESIMP_KERNELS=python``, itself tested against plain autograd on the masked gradient
in test_meprop.py): the same models, seeds and data on both paths must give the same
outputs, selections and counters, and gradients, weights and AdamW state within float32
rounding after several steps. Dropout draws from the default generator in the same order
on both paths, so its masks agree. Per-example selection breaks ties between exact zeros
(dead ReLU units, dropped entries) in its own order on each path, which changes no
gradient, only which zero-valued unit is counted: there the total count is compared.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.nn import fused, kernels
from mesimp.nn.fused import MePropSequential, is_fused_node
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_, unmeprop

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mesimp._C is not built")
RTOL, ATOL = 1e-5, 1e-6


class Head(nn.Sequential):
    """A subclass that keeps Sequential's forward (torchvision's MLPBlock is one)."""


class Block(nn.Module):
    """A pre-norm transformer block's FFN half (attention left out: it is not a chain):
    ``x + ffn(norm(x))`` on ``[B, T, d]``, the FFN an ``nn.Sequential``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * d, d), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(tokens)).mean(1))


def _mlp_gelu() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.GELU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.GELU(approximate="tanh"),
        nn.Linear(16, 4),
    )  # fmt: skip


def _mixed() -> nn.Module:
    """A chain after a LayerNorm, ReLU with dropout, and a plain (non-meProp) Linear inside
    the chain (``filter_fn`` keeps it plain)."""
    return nn.Sequential(
        nn.LayerNorm(12),
        nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip


MODELS = {
    "mlp-gelu-dropout": (_mlp_gelu, lambda g: torch.randn(6, 12, generator=g), 4),
    "mixed-chain": (_mixed, lambda g: torch.randn(6, 12, generator=g), 4),
    "transformer-ffn": (TinyTransformer, lambda g: torch.randint(0, 20, (5, 7), generator=g), 3),
}


def _build(name: str, selection: str, alpha: float = 0.0) -> nn.Module:
    make, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    cfg = MePropConfig(k=3, selection=selection, msbp_alpha=alpha)
    keep_plain = "6" if name == "mixed-chain" else None  # a plain Linear inside the chain
    meprop_(model, cfg, filter_fn=lambda n, m: n != keep_plain)
    if name == "mixed-chain":
        model[4].apply_mask(torch.arange(16) % 5 != 0)
    return model


def _fused_nodes(t: torch.Tensor) -> int:
    seen, stack, count = set(), [t.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += is_fused_node(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return count


def _train(name: str, selection: str, mode: str, alpha: float, steps: int = 4):
    model = _build(name, selection, alpha)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, data, classes = MODELS[name]
    g = torch.Generator().manual_seed(5)
    before = kernels.mode()
    kernels.set_kernels(mode)
    torch.manual_seed(11)  # dropout and random selection: the default generator
    outs, grads, nodes = [], [], []
    try:
        for _ in range(steps):
            x, y = data(g), torch.randint(0, classes, (data(g).shape[0],), generator=g)
            opt.zero_grad()
            out = model(x)
            nodes.append(_fused_nodes(out))
            F.cross_entropy(out, y).backward()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
    finally:
        kernels.set_kernels(before)
    return model, opt, outs, grads, nodes


CHAINS = {"mlp-gelu-dropout": 1, "mixed-chain": 1, "transformer-ffn": 2}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "selection,alpha", [("unified", 0.0), ("topk", 0.0), ("random", 0.0), ("unified", 0.5)]
)
def test_chains_compute_the_python_path(name, selection, alpha):
    ref = _train(name, selection, "python", alpha)
    got = _train(name, selection, "cpp", alpha)
    assert ref[4] == [0] * len(ref[4])
    assert got[4] == [CHAINS[name]] * len(got[4])  # one node per chain, every step
    for a, b in zip(ref[2], got[2], strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for step_a, step_b in zip(ref[3], got[3], strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(ref[0].parameters(), got[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for sa, sb in zip(ref[1].state.values(), got[1].state.values(), strict=True):
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=ATOL)
    for ma, mb in zip(ref[0].modules(), got[0].modules(), strict=True):
        if isinstance(ma, MePropLinear):  # per example, ReLU and dropout zeros tie: totals
            assert torch.equal(ma.ref, mb.ref) and int(ma.hits.sum()) == int(mb.hits.sum())
            if selection == "unified":
                assert torch.equal(ma.hits, mb.hits)


def test_eval_mode_dropout_and_no_grad():
    """Dropout in eval mode is off on both paths; without gradients nothing fuses."""
    model = _build("mlp-gelu-dropout", "unified")
    model.eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        plain = model(x)
    out = model(x)
    assert is_fused_node(out.grad_fn)
    torch.testing.assert_close(out, plain, rtol=RTOL, atol=ATOL)


def test_any_leading_shape_and_the_input_gradient():
    """``[T, B, d]`` and 1-D inputs: each row one example; the input gets its gradient."""
    model = _build("mlp-gelu-dropout", "unified").eval()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 5, 4) and is_fused_node(out.grad_fn.next_functions[0][0])
    out.square().sum().backward()
    x2 = x.detach().reshape(15, 12).requires_grad_()
    twin(x2).square().sum().backward()
    torch.testing.assert_close(x.grad.reshape(15, 12), x2.grad, rtol=RTOL, atol=ATOL)
    assert model(torch.randn(12)).shape == (4,)


def test_the_class_swap_is_undone_and_survives_copies(tmp_path):
    """``meprop_`` swaps the class in place (same object, children, state_dict keys);
    deepcopy and pickling keep it, for nn.Sequential and for a subclass made on the fly;
    ``unmeprop`` gives plain PyTorch classes back."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)),
        Head(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)),
        nn.Linear(8, 2),
    )
    keys = list(model.state_dict())
    inner = model[0]
    meprop_(model, MePropConfig(k=2, selection="unified"))
    assert model[0] is inner and type(inner) is MePropSequential
    assert type(model[1]).__name__ == "MePropHead" and isinstance(model[1], Head)
    assert type(model) is nn.Sequential  # its children are not a chain
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 4)
    ref = model(x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(twin[1]) is type(model[1]) and torch.equal(twin(x), ref)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), ref)
    unmeprop(model)
    assert type(model[0]) is nn.Sequential and type(model[1]) is Head
    assert fused._CACHE not in model[0].__dict__


def test_a_sequential_with_its_own_forward_is_left_alone():
    class Own(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Own(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))
    meprop_(model, MePropConfig(k=2, selection="unified"))
    assert type(model[0]) is Own
