"""Compaction (``mesimp.simplify.compact``): the model loses its masked units during
training, and training goes on as if they were still there, masked.

The reference is the masked run itself: the same model, data order and steps in
float64, with ``compact=False``. After several simplification points the compacted run
must hold the masked run's weights on the kept units, its counters and its optimizer
state, to 1e-10. For the MLP the kept rows and columns are read off the masks by hand
(an independent reference); for the other models the masked run is compacted once at
the end and compared parameter by parameter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import group_models as gm
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mesimp
from mesimp import MePropConfig, Simplifier, SimplifyConfig, meprop_
from mesimp.errors import BadInputError
from mesimp.models import CNNConfig, MLPConfig, TaggerConfig, build_model
from mesimp.nn.linear import MePropCounters
from mesimp.simplify.compact import compact_

SIMP = SimplifyConfig(prune_rate=0.25, points_per_epoch=2, cycle_epochs=0, min_width=2)
STEPS, EPOCH = 12, 4  # three epochs of four steps: six simplification points


def _mlp() -> nn.Module:
    return build_model(MLPConfig(12, [24, 16], 4))


def _cnn() -> nn.Module:
    return build_model(CNNConfig(64, [6, 8], 4))


def _tagger() -> nn.Module:
    return build_model(TaggerConfig(30, 5, 8, [10, 12], 0.0))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple], str]] = {
    "mlp": (_mlp, lambda i: (torch.randn(8, 12, generator=_gen(i)),), "classes"),
    "cnn": (_cnn, lambda i: (torch.randn(8, 64, generator=_gen(i)),), "classes"),
    "tagger": (_tagger, lambda i: (torch.randint(1, 30, (4, 6), generator=_gen(i)),), "tags"),
    "user_transformer": (
        lambda: gm.Tokens(nn.MultiheadAttention(16, 4, batch_first=True), call="mha"),
        lambda i: (torch.randn(4, 5, 10, generator=_gen(i)),),
        "classes",
    ),
    "user_llama": (
        gm.tiny_llama, lambda i: (torch.randint(1, 50, (2, 6), generator=_gen(i)),), "lm"
    ),
}  # fmt: skip


def _loss(out: Any, x: torch.Tensor, kind: str, i: int) -> torch.Tensor:
    if kind == "lm":
        return out.logits.float().pow(2).mean().double() + out.logits.mean()
    target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=_gen(100 + i))
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _run(name: str, compact: bool) -> tuple[nn.Module, torch.optim.Optimizer, Simplifier, list]:
    factory, batch, kind = CASES[name]
    torch.manual_seed(0)
    model = factory().double()
    meprop_(model, MePropConfig(k=0.5, selection="unified", msbp_alpha=0.5))
    # eps well above float64 noise: a conv bias under a BatchNorm has a gradient that
    # is zero up to rounding (~1e-17), and Adam's default eps=1e-8 would amplify that
    # noise, which differs with the tensors' shapes, to 1e-10 within a few steps
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-4)
    example = _example(name)
    simp = Simplifier(
        model, SIMP, opt, steps_per_epoch=EPOCH, example_inputs=example, compact=compact
    )
    events = []
    for i in range(STEPS):
        (x,) = batch(i)
        x = x.double() if x.is_floating_point() else x
        out = model(input_ids=x) if kind == "lm" else model(x)
        loss = _loss(out, x, kind, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        events += simp.step()
    return model, opt, simp, events


def _example(name: str) -> Any:
    """What the Simplifier traces: the first batch, as the model takes it."""
    _, batch, kind = CASES[name]
    x0 = batch(0)[0]
    if kind == "lm":
        return {"input_ids": x0}
    return x0.double() if x0.is_floating_point() else x0


def _params_and_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p.{n}": p.detach() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim():
                out[f"s.{names[id(p)]}.{k}"] = v
    for n, m in model.named_modules():
        if isinstance(m, MePropCounters):
            out[f"hits.{n}"], out[f"ref.{n}"] = m.hits, m.ref
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compacted_training_is_masked_training(name):
    masked, mopt, msimp, _ = _run(name, compact=False)
    small, sopt, ssimp, events = _run(name, compact=True)
    assert sum(e["event"] == "compact" for e in events) >= 2, events  # several points
    # the same widths; the compacted groups are physically at them ...
    assert ssimp.widths == msimp.widths
    assert [g.size for g in ssimp.groups] == ssimp.widths
    assert sum(ssimp.widths) < sum(g.size for g in msimp.groups)
    # ... and hold what the masked run holds on its active units
    example = _example(name)
    compact_(masked, example, mopt)  # the masked run, compacted once at the end
    a, b = _params_and_state(masked, mopt), _params_and_state(small, sopt)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)


def test_the_mlps_compacted_weights_and_adam_moments_are_the_masked_rows_and_columns():
    """By hand, independent of the pruning code: hidden layer i keeps rows mask_i and
    columns mask_{i-1}; Adam's moments are sliced alike."""
    masked, mopt, _, _ = _run("mlp", compact=False)
    small, sopt, _, _ = _run("mlp", compact=True)
    lin_m = [m for m in masked.modules() if isinstance(m, nn.Linear)]
    lin_s = [m for m in small.modules() if isinstance(m, nn.Linear)]
    prev = torch.arange(12)
    for i, (a, b) in enumerate(zip(lin_m, lin_s, strict=True)):
        rows = a.mask.nonzero().squeeze(1) if isinstance(a, MePropCounters) else torch.arange(4)
        for p, q in ((a.weight, b.weight), (a.bias, b.bias)):
            sl = p.detach()[rows][:, prev] if p.dim() == 2 else p.detach()[rows]
            torch.testing.assert_close(q.detach(), sl, rtol=0, atol=1e-10, msg=f"layer {i}")
            for key in ("exp_avg", "exp_avg_sq"):
                ms, ss = mopt.state[p][key], sopt.state[q][key]
                ref = ms[rows][:, prev] if ms.dim() == 2 else ms[rows]
                torch.testing.assert_close(ss, ref, rtol=0, atol=1e-10, msg=f"{i} {key}")
        if isinstance(a, MePropCounters):
            assert torch.equal(b.hits, a.hits[rows]) and int(b.ref) == int(a.ref)
            assert bool(b.mask.all()) and b.mask.numel() == rows.numel()
        prev = rows


def test_a_users_loop_resumes_a_compacted_run_from_a_full_width_model(tmp_path):
    """The Simplifier's state holds what it removed: a fresh full-width model, a fresh
    optimizer and the saved state rebuild the run (then the weights load)."""
    model, opt, simp, _ = _run("user_transformer", compact=True)
    state = {"simp": simp.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    torch.save(state, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    torch.manual_seed(0)
    fresh = meprop_(
        CASES["user_transformer"][0]().double(),
        MePropConfig(k=0.5, selection="unified", msbp_alpha=0.5),
    )
    fopt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    x0 = _example("user_transformer")
    fsimp = Simplifier(fresh, SIMP, fopt, steps_per_epoch=EPOCH, example_inputs=x0, compact=True)
    fsimp.load_state_dict(saved["simp"])
    fresh.load_state_dict(saved["model"])
    fopt.load_state_dict(saved["opt"])
    assert fsimp.widths == simp.widths and fsimp.steps == simp.steps
    with torch.no_grad():
        torch.testing.assert_close(fresh(x0), model(x0), rtol=0, atol=0)
    a, b = _params_and_state(model, opt), _params_and_state(fresh, fopt)
    assert {k for k in a if not k.startswith(("hits", "ref"))} <= b.keys()


def test_compact_needs_example_inputs():
    model = meprop_(_mlp(), MePropConfig(k=4))
    with pytest.raises(BadInputError, match="compact=True needs example_inputs"):
        Simplifier(model, SIMP, steps_per_epoch=2, compact=True)


def test_nothing_masked_compacts_nothing():
    model = meprop_(_mlp(), MePropConfig(k=4))
    before = copy.deepcopy(model.state_dict())
    assert compact_(model, torch.randn(2, 12)) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert mesimp.shrink(model, torch.randn(2, 12)) is not None
