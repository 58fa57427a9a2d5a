"""meSimp tests: the counters -> mask rule on hand-computed cases, selection under masks
during real training steps, k capping, the schedule, and the once-per-cycle optimizer reset.

Expected values are written out by hand (lists, floor arithmetic done in the comments)
or counted independently (events in the metrics log, a counting wrapper).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import read_jsonl, train_tiny
from torch import nn

from mesimp.errors import BadInputError
from mesimp.models import MLPConfig, build_model
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.rule import (
    SimplifyConfig,
    SimplifySchedule,
    active_widths,
    prunable_layers,
    simplify_step,
)
from mesimp.training.optim import RowSparseAdam

# ``mesimp.train`` is the *function* (re-exported by mesimp/__init__.py, shadowing the
# submodule attribute), so reach the module through sys.modules.
simplifier_module = importlib.import_module("mesimp.simplify.simplifier")  # resets the optimizer


def one_layer(width: int = 5, k: int = 2) -> tuple[nn.Sequential, MePropLinear]:
    """in 4 -> hidden ``width`` (meProp) -> 3 outputs."""
    layer = MePropLinear(4, width, k=k)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(width, 3)), layer


def set_counts(layer: MePropLinear, hits: list[int], ref: int) -> None:
    layer.hits.copy_(torch.tensor(hits))
    layer.ref.fill_(ref)


# --------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------
def test_rule_hand_computed_case_and_counter_reset():
    model, layer = one_layer()
    # prune_rate 0.1 * ref 50 = 5.0 -> threshold 5; keep hits >= 5 (5 itself survives)
    set_counts(layer, [0, 3, 5, 9, 10], 50)
    widths = simplify_step(model, prune_rate=0.1)
    assert widths == [3]
    assert layer.mask.tolist() == [False, False, True, True, True]
    assert layer.active_width == 3
    assert layer.hits.tolist() == [0, 0, 0, 0, 0]
    assert int(layer.ref) == 0


@pytest.mark.parametrize(
    ("prune_rate", "ref", "hits", "keep"),
    [
        # 0.49 * 10 = 4.9 -> floor 4 (round/ceil would give 5 and drop the unit with 4)
        (0.49, 10, [3, 4, 5], [False, True, True]),
        # 0.25 * 10 = 2.5 -> floor 2
        (0.25, 10, [1, 2, 3], [False, True, True]),
        # 0.05 * 10 = 0.5 -> floor 0: nothing can fall below it, even a never-selected unit
        (0.05, 10, [0, 0, 1], [True, True, True]),
        # prune_rate 0 never prunes
        (0.0, 100, [0, 50, 100], [True, True, True]),
    ],
)
def test_rule_floors_the_threshold(prune_rate, ref, hits, keep):
    model, layer = one_layer(width=3)
    set_counts(layer, hits, ref)
    simplify_step(model, prune_rate=prune_rate, min_width=0)
    assert layer.mask.tolist() == keep


def test_no_examples_since_last_point_means_no_masking():
    model, layer = one_layer()
    set_counts(layer, [0, 0, 0, 0, 0], 0)
    assert simplify_step(model, prune_rate=0.5) == [5]
    assert layer.mask.all()


def test_masked_neuron_never_comes_back():
    model, layer = one_layer()
    set_counts(layer, [0, 3, 5, 9, 10], 50)
    simplify_step(model, prune_rate=0.1)
    # later every unit, the masked ones included, looks very busy
    set_counts(layer, [100, 100, 100, 100, 100], 100)
    assert simplify_step(model, prune_rate=0.1) == [3]
    assert layer.mask.tolist() == [False, False, True, True, True]
    # apply_mask with an all-True keep cannot revive them either
    layer.apply_mask(torch.ones(5, dtype=torch.bool))
    assert layer.mask.tolist() == [False, False, True, True, True]


def test_min_width_tops_up_with_the_most_hit_units():
    model, layer = one_layer()
    # 0.9 * 50 = 45: nobody survives the rule; min_width 2 keeps the two most-hit (9, 10)
    set_counts(layer, [0, 3, 5, 9, 10], 50)
    assert simplify_step(model, prune_rate=0.9, min_width=2) == [2]
    assert layer.mask.tolist() == [False, False, False, True, True]


def test_min_width_top_up_only_picks_active_units():
    model, layer = one_layer()
    layer.apply_mask(torch.tensor([True, True, False, False, True]))
    # masked units 2, 3 have the most hits but must not be revived by the top-up
    set_counts(layer, [7, 6, 100, 100, 1], 50)
    assert simplify_step(model, prune_rate=0.9, min_width=2) == [2]
    assert layer.mask.tolist() == [True, True, False, False, False]


def test_min_width_does_not_cap_the_survivors():
    model, layer = one_layer()
    set_counts(layer, [0, 3, 5, 9, 10], 50)  # threshold 5 keeps 3 units; min_width 1 adds none
    assert simplify_step(model, prune_rate=0.1, min_width=1) == [3]


def test_min_width_zero_lets_a_layer_vanish():
    model, layer = one_layer()
    set_counts(layer, [0, 3, 5, 9, 10], 50)
    assert simplify_step(model, prune_rate=0.9, min_width=0) == [0]
    # a fully masked layer outputs exactly zero, so the net outputs its last bias
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 4))
    assert torch.equal(out, model[2].bias.expand(4, 3))


def test_output_layer_is_never_pruned_and_inputs_untouched():
    model = build_model(MLPConfig(in_features=6, hidden_sizes=[5, 4], out_features=3))
    meprop_(model, MePropConfig(k=2), skip_output=False)  # even a meProp output layer
    out_layer = model[4]
    assert isinstance(out_layer, MePropLinear)
    assert [n for n, _ in prunable_layers(model)] == ["0", "2"]
    w0 = model[0].weight.detach().clone()
    for m in (model[0], model[2], out_layer):
        m.hits.zero_()  # nobody was ever selected
        m.ref.fill_(50)
    assert simplify_step(model, prune_rate=0.5, min_width=1) == [1, 1]
    assert out_layer.mask.all() and out_layer.active_width == 3
    assert model[0].in_features == 6 and model[0].weight.shape == (5, 6)
    assert torch.equal(model[0].weight, w0)  # masking never edits weights
    assert active_widths(model) == [1, 1]


def test_plain_hidden_layers_are_not_prunable():
    model = build_model(MLPConfig(in_features=6, hidden_sizes=[5, 4], out_features=3))
    meprop_(model, MePropConfig(k=2), filter_fn=lambda name, _m: name == "2")
    assert [n for n, _ in prunable_layers(model)] == ["2"]
    assert active_widths(model) == [5, 4]


# --------------------------------------------------------------------------------------
# selection under masks, in real training steps
# --------------------------------------------------------------------------------------
def masked_mlp(selection: str, k: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(MLPConfig(in_features=20, hidden_sizes=[16, 16], out_features=5))
    meprop_(model, MePropConfig(k=k, selection=selection))
    keeps = [torch.rand(16) < 0.4, torch.rand(16) < 0.6]
    for keep in keeps:
        keep[0] = True
    for layer, keep in zip((model[0], model[2]), keeps, strict=True):
        layer.apply_mask(keep)
    return model, keeps


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
@pytest.mark.parametrize("k", [3, 12])  # 12 exceeds the active width of the first layer
def test_masked_neurons_are_never_selected_nor_updated(selection, k):
    model, keeps = masked_mlp(selection, k)
    layers = (model[0], model[2])
    before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in layers]
    opt = RowSparseAdam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    for step in range(8):
        xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for m, keep, (w0, b0) in zip(layers, keeps, before, strict=True):
        active = int(keep.sum())
        k_eff = min(k, active)
        assert int(m.ref) == 64
        assert m.hits[~keep].tolist() == [0] * int((~keep).sum())
        # every example selects exactly k_eff distinct active units
        assert int(m.hits.sum()) == 64 * k_eff
        assert int(m.hits.max()) <= 64
        assert torch.equal(m.weight[~keep], w0[~keep])
        assert torch.equal(m.bias[~keep], b0[~keep])
        assert not torch.equal(m.weight[keep], w0[keep])  # training did happen


@pytest.mark.parametrize("selection", ["topk", "unified", "random"])
def test_rows_masked_mid_training_stop_changing(selection):
    """The meSimp flow: train, then mask; the lazy optimizer never touches the dead rows."""
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=20, hidden_sizes=[16], out_features=5))
    meprop_(model, MePropConfig(k=4, selection=selection, sparse_grad=True))
    opt = RowSparseAdam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    keep = torch.arange(16) % 3 == 0
    model[0].apply_mask(keep)
    w_masked = model[0].weight.detach()[~keep].clone()
    model[0].reset_counters()
    for _ in range(5):
        step()
    assert torch.equal(model[0].weight.detach()[~keep], w_masked)
    assert int(model[0].hits[~keep].sum()) == 0


def test_saved_mesimp_checkpoint_has_no_hits_on_masked_units(ckpts):
    """Real training (train.train with meSimp): the saved counters never count dead units."""
    layers = torch.load(ckpts["mesimp"], weights_only=True)["meprop"]["layers"]
    assert set(layers) == {"0", "2"}
    for st in layers.values():
        mask = st["mask"]
        assert 0 < int(mask.sum()) < 32, "the fixture should have pruned something"
        assert int(st["hits"][~mask].sum()) == 0
        assert int(st["hits"].sum()) == int(st["ref"]) * min(8, int(mask.sum()))


# --------------------------------------------------------------------------------------
# k capping
# --------------------------------------------------------------------------------------
def test_int_k_is_capped_at_the_active_width():
    layer = MePropLinear(4, 30, k=20)
    assert layer.k == 20
    layer.apply_mask(torch.arange(30) < 10)
    assert layer.k == 10
    layer.apply_mask(torch.arange(30) < 3)
    assert layer.k == 3


@pytest.mark.parametrize(
    ("frac", "width", "active", "k_full", "k_active"),
    [
        (0.25, 40, 20, 10, 5),  # 0.25*40 = 10, 0.25*20 = 5
        (0.1, 40, 15, 4, 2),  # 0.1*15 = 1.5 -> ceil 2
        (0.01, 40, 3, 1, 1),  # never below 1
        (1.0, 40, 7, 40, 7),
    ],
)
def test_fractional_k_scales_with_the_active_width(frac, width, active, k_full, k_active):
    layer = MePropLinear(4, width, k=frac)
    assert layer.k == k_full
    layer.apply_mask(torch.arange(width) < active)
    assert layer.k == k_active


@pytest.mark.parametrize(("k", "expected"), [(20, 6), (0.5, 3)])
def test_backward_uses_the_capped_k(k, expected):
    """Counted independently: each example adds exactly k_eff to the hits."""
    layer = MePropLinear(4, 30, k=k)
    layer.apply_mask(torch.arange(30) % 5 == 0)  # 6 active units
    x = torch.randn(7, 4)
    layer(x).pow(2).sum().backward()
    assert int(layer.ref) == 7
    assert int(layer.hits.sum()) == 7 * expected
    assert int(layer.hits[torch.arange(30) % 5 != 0].sum()) == 0


# --------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "points_per_epoch", "points"),
    [
        (10, 4, [3, 5, 8, 10]),  # evenly spaced: ceil(2.5), 5, ceil(7.5), 10
        (10, 1, [10]),
        (12, 3, [4, 8, 12]),
        (3, 5, [1, 2, 3]),  # more points than steps: every step
    ],
)
def test_schedule_points_per_epoch(steps, points_per_epoch, points):
    sched = SimplifySchedule(SimplifyConfig(points_per_epoch=points_per_epoch), steps)
    assert [s for s in range(1, steps + 1) if sched.is_point(0, s)] == points


@pytest.mark.parametrize(
    ("cycle_epochs", "simplifying", "starts"),
    [
        (1, [1, 0, 1, 0, 1, 0, 1], [1, 2, 3, 4, 5, 6]),
        (2, [1, 1, 0, 0, 1, 1, 0], [2, 4, 6]),
        (3, [1, 1, 1, 0, 0, 0, 1], [3, 6]),
        (0, [1, 1, 1, 1, 1, 1, 1], []),  # 0: always simplify, no cycles, no resets
    ],
)
def test_schedule_cycles(cycle_epochs, simplifying, starts):
    sched = SimplifySchedule(SimplifyConfig(points_per_epoch=2, cycle_epochs=cycle_epochs), 10)
    assert [int(sched.is_simplifying(e)) for e in range(7)] == simplifying
    assert [e for e in range(7) if sched.cycle_starts(e)] == starts
    for e in range(7):  # plain epochs have no points at all
        n_points = sum(sched.is_point(e, s) for s in range(1, 11))
        assert n_points == (2 if simplifying[e] else 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prune_rate": 1.0},
        {"prune_rate": -0.1},
        {"points_per_epoch": 0},
        {"cycle_epochs": -1},
        {"min_width": -1},
    ],
)
def test_simplify_config_refuses_bad_values(kwargs):
    with pytest.raises(BadInputError):
        SimplifyConfig(**kwargs)


# --------------------------------------------------------------------------------------
# the optimizer reset and the metrics log, in real training
# --------------------------------------------------------------------------------------
def test_optimizer_reset_once_per_cycle(tmp_path, tiny_npz, monkeypatch):
    calls: list[int] = []
    real_reset = simplifier_module.reset_optimizer_state

    def counting_reset(optimizer):
        calls.append(len(optimizer.state))
        real_reset(optimizer)
        assert len(optimizer.state) == 0

    monkeypatch.setattr(simplifier_module, "reset_optimizer_state", counting_reset)
    result = train_tiny(
        tiny_npz,
        tmp_path / "m.pt",
        k=8,
        epochs=4,
        simplify=SimplifyConfig(prune_rate=0.05, points_per_epoch=4, cycle_epochs=1),
    )
    # 4 epochs, cycles of 1: cycles start at epochs 1, 2, 3 -> three resets, not 4 x 4
    assert result["optimizer_resets"] == 3
    assert len(calls) == 3
    assert all(n > 0 for n in calls)  # there was state to forget each time

    records = read_jsonl(result["metrics_log"])
    starts = [r for r in records if r["event"] == "cycle_start"]
    assert [r["epoch"] for r in starts] == [1, 2, 3]
    assert [r["step"] for r in starts] == [10, 20, 30]  # 10 steps per epoch
    assert [r["simplifying"] for r in starts] == [False, True, False]

    simp = [r for r in records if r["event"] == "simplify"]
    # 4 points per epoch x 2 simplifying epochs (0 and 2), at steps 3, 5, 8, 10 of each
    assert len(simp) == 4 * 2
    assert [r["epoch"] for r in simp] == [0] * 4 + [2] * 4
    assert [r["step"] for r in simp] == [3, 5, 8, 10, 23, 25, 28, 30]
    for r in simp:
        assert len(r["widths"]) == 2 and all(1 <= w <= 32 for w in r["widths"])
    for a, b in zip(simp, simp[1:], strict=False):  # widths never grow back
        assert all(wb <= wa for wa, wb in zip(a["widths"], b["widths"], strict=True))


def test_optimizer_reset_with_longer_cycles(tmp_path, tiny_npz, monkeypatch):
    calls = []
    monkeypatch.setattr(simplifier_module, "reset_optimizer_state", lambda opt: calls.append(1))
    result = train_tiny(
        tiny_npz,
        tmp_path / "m.pt",
        k=8,
        epochs=3,
        simplify=SimplifyConfig(prune_rate=0.05, points_per_epoch=2, cycle_epochs=2),
    )
    assert result["optimizer_resets"] == 1 == len(calls)
    records = read_jsonl(result["metrics_log"])
    assert [r["epoch"] for r in records if r["event"] == "cycle_start"] == [2]
    assert sum(r["event"] == "simplify" for r in records) == 2 * 2  # epochs 0 and 1


def test_no_simplify_means_no_resets_and_no_masks(tmp_path, tiny_npz, monkeypatch):
    calls = []
    monkeypatch.setattr(simplifier_module, "reset_optimizer_state", lambda opt: calls.append(1))
    result = train_tiny(tiny_npz, tmp_path / "m.pt", k=8, epochs=2)
    assert result["optimizer_resets"] == 0 and calls == []
    records = read_jsonl(result["metrics_log"])
    assert {r["event"] for r in records} == {"start", "eval", "epoch"}
    layers = torch.load(result["checkpoint"], weights_only=True)["meprop"]["layers"]
    assert all(bool(st["mask"].all()) for st in layers.values())
