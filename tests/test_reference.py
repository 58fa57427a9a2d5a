"""The reference-faithful mode against a hand-computed step of the C# code's semantics.

The hand computation below writes the reference's backward out explicitly in float64
(no autograd): summed softmax cross-entropy, ReLU, per-example top-k on each hidden
layer's pre-activation gradient, dense bias gradients, every element clipped to 5,
then the reference's Adam. mesimp's pieces (MePropLinear with ``dense_bias``, the
summed loss, ``ReferenceAdam``) must land on the same weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl
from test_resume import DEV, quiet_train

from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.models import MLP, MLPConfig
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.config import TrainConfig
from mesimp.training.reference import (
    ReferenceAdam,
    chunk_ends,
    chunked_batches,
    reference_init_,
)

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


def topk_mask(g: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k largest |g| of every row (no ties in these random data)."""
    idx = g.abs().argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(g).scatter_(1, idx, 1.0)


def hand_step(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, k: int, steps: int):
    """``steps`` updates of the 2-hidden-layer MLP by the reference's rules, by hand."""
    w1, b1, w2, b2, w3, b3 = (p.clone() for p in params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        z1 = x @ w1.T + b1
        h1 = z1.clamp(min=0)
        z2 = h1 @ w2.T + b2
        h2 = z2.clamp(min=0)
        z3 = h2 @ w3.T + b3
        p = torch.softmax(z3, dim=1)
        d3 = p - F.one_hot(y, p.shape[1]).double()  # summed loss: no division by B
        dw3, db3 = d3.T @ h2, d3.sum(0)
        dz2 = (d3 @ w3) * (z2 > 0)
        s2 = dz2 * topk_mask(dz2, k)
        dw2, db2 = s2.T @ h1, dz2.sum(0)  # the bias takes every unit's gradient
        dz1 = (s2 @ w2) * (z1 > 0)
        s1 = dz1 * topk_mask(dz1, k)
        dw1, db1 = s1.T @ x, dz1.sum(0)
        grads = [dw1, db1, dw2, db2, dw3, db3]
        lr_t = LR * math.sqrt(1 - B2**t) / (1 - B1**t)
        new = []
        for i, (w, g) in enumerate(zip([w1, b1, w2, b2, w3, b3], grads, strict=True)):
            g = g.clamp(-5, 5)
            v[i] = B2 * v[i] + (1 - B2) * g * g
            m[i] = B1 * m[i] + (1 - B1) * g
            new.append(w - lr_t * m[i] / (v[i].sqrt() + EPS))
        w1, b1, w2, b2, w3, b3 = new
    return [w1, b1, w2, b2, w3, b3], grads


@pytest.mark.parametrize("k", [1, 3])
def test_one_reference_step_matches_the_hand_computation(k):
    torch.manual_seed(0)
    model = reference_init_(MLP(MLPConfig(in_features=6, hidden_sizes=[5, 4], out_features=3)))
    model = model.double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-0.5, 0.5)  # nonzero biases: a dead unit stays dead otherwise
    params0 = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(7, 6, dtype=torch.float64) * 4  # large: some summed gradients clip
    y = torch.randint(0, 3, (7,))
    meprop_(model, MePropConfig(k=k, selection="topk", dense_bias=True))
    opt = ReferenceAdam(model.parameters(), lr=LR)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    want, grads = hand_step(params0, x, y, k, steps=2)
    assert any(bool((g.abs() > 5).any()) for g in grads)  # the clip did something
    for got, exp in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), exp, atol=1e-12, rtol=0)


def test_dense_bias_differs_from_the_selected_bias_and_leaves_masked_units_alone():
    torch.manual_seed(1)
    layer = torch.nn.Linear(4, 6).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = {}
    for dense in (False, True):
        lin = torch.nn.Sequential(torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 2).double())
        lin[0].load_state_dict(layer.state_dict())
        meprop_(lin, MePropConfig(k=1, selection="topk", dense_bias=dense))
        lin[0].apply_mask(torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool))
        lin(x).pow(2).sum().backward()
        grads[dense] = lin[0].bias.grad.clone()
    assert not torch.equal(grads[False], grads[True])
    assert grads[True][4] == 0.0  # a masked unit has no gradient, bias included
    assert int((grads[True] != 0).sum()) == 5


def test_reference_adam_resets_moments_but_keeps_its_step_count():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ReferenceAdam([p])
    for _ in range(3):
        p.grad = torch.tensor([10.0, -0.5, 0.0])  # 10 clips to 5
        opt.step()
    state = opt.state[p]
    assert float(state["step"]) == 3
    opt.reset_moments()
    assert float(state["step"]) == 3 and not state["exp_avg"].any()
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()  # t = 4 after a reset: m = 0.1 g, v = 0.001 g^2, with t's bias correction
    lr_t = LR * math.sqrt(1 - B2**4) / (1 - B1**4)
    step = lr_t * 0.1 / (math.sqrt(0.001) + EPS)
    torch.testing.assert_close(before - p.detach(), torch.full((3,), step))


def test_reference_init_and_the_chunked_epoch():
    torch.manual_seed(0)
    model = reference_init_(MLP(MLPConfig()))
    w = model[0].weight
    assert abs(float(w.detach().std()) / math.sqrt(6 / (784 + 500)) - 1) < 0.01
    assert not any(m.bias.any() for m in model if isinstance(m, torch.nn.Linear))
    bounds = chunked_batches(55000, 100, 8)  # MNIST's 55,000: 8 chunks of 6,875
    assert len(bounds) == 552
    sizes = [e - s for s, e in bounds]
    assert sizes.count(75) == 8 and sizes.count(100) == 544
    assert chunk_ends(55000, 100, 8) == {69 * i for i in range(1, 9)}
    assert bounds[0] == (0, 100) and bounds[68] == (6800, 6875) and bounds[-1] == (54925, 55000)
    assert chunked_batches(10, 3, 3) == [(0, 3), (3, 4), (4, 7), (7, 10)]


def test_train_reference_mode_wires_every_piece(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    cfg = TrainConfig(
        data=str(tiny_npz),
        dev_size=DEV,
        hidden=16,
        k=4,
        selection="topk",
        epochs=1,
        batch_size=100,
        evals_per_epoch=4,
        reference=True,
        output=str(out),
        keep_last=True,
    )
    assert cfg.sparse_update is False and cfg.meprop_config().dense_bias
    quiet_train(cfg)
    evals = [r for r in read_jsonl(out.with_name("m.metrics.jsonl")) if r["event"] == "eval"]
    # 500 examples: 4 chunks of 125 = 100 + 25, a dev check after each
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert evals[0]["train_loss"] > 10  # a summed loss: ~ 100 x ln(10) per batch at first
    last = load_checkpoint(out.with_name("m.last.pt"))["resume"]["optimizer"]
    assert float(last["state"][0]["step"]) == 8.0
    assert json.dumps(load_checkpoint(out)["train"]["config"]["reference"]) == "true"


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"model": "cnn", "hidden": [4]}, "--model is cnn"),
        ({"optimizer": "sgd"}, "drop --optimizer"),
        ({"k": 4, "simplify": {}}, "the C# meSimp"),
    ],
)
def test_reference_mode_refuses_what_it_cannot_reproduce(kw, needle):
    from mesimp.simplify.rule import SimplifyConfig

    if "simplify" in kw:
        kw = {**kw, "simplify": SimplifyConfig()}
    with pytest.raises(BadInputError, match=needle):
        TrainConfig(reference=True, **kw)


def test_cli_reference_takes_the_protocol_defaults_unless_given(tmp_path, tiny_npz, capsys):
    import mesimp.cli.commands  # noqa: F401  (registers the commands)
    from mesimp.cli.main import main

    out = tmp_path / "m.pt"
    args = ["train", "--reference", "--data", tiny_npz, "--dev-size", DEV, "--hidden", "8"]
    args += ["--k", "2", "--selection", "topk", "--epochs", "1", "-o", out, "--json"]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code in (0, None)
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert (cfg["reference"], cfg["batch_size"], cfg["evals_per_epoch"]) == (True, 100, 8)
    assert cfg["epochs"] == 1 and cfg["sparse_update"] is False
    with pytest.raises(SystemExit) as e:
        main(["train", "--reference", "--model", "cnn", "--data", str(tiny_npz)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference reproduces the C# MLP" in err[0]
