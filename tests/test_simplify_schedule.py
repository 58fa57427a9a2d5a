"""meSimp's warm-up and cubic schedule (issue 30): the per-point widths against Zhu &
Gupta's closed formula, no point in the warm-up, the target reached exactly at the last
point before ``target_epoch`` and nothing after it, the units kept by selection rate,
and the one-line errors for impossible settings."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl
from torch import nn

import mesimp
from mesimp.errors import BadInputError
from mesimp.simplify.rule import (
    SimplifyConfig,
    SimplifySchedule,
    cubic_fraction,
    cubic_width,
    keep_best,
)
from mesimp.training.config import TrainConfig


def cubic(**kw) -> SimplifyConfig:
    base = dict(points_per_epoch=2, cycle_epochs=0, schedule="cubic", target=0.25, target_epoch=3)
    return SimplifyConfig(**{**base, **kw})


def test_cubic_widths_follow_the_closed_formula_and_end_on_the_target():
    n, size, target = 12, 500, 0.15
    widths = [cubic_width(size, target, i, n, 1) for i in range(1, n + 1)]
    for i, w in enumerate(widths, start=1):
        # s_t = s_f + (s_i - s_f)(1 - t/n)^3 with s_i = 0, s_f = 1 - target (sparsity)
        sparsity = (1 - target) + (0 - (1 - target)) * (1 - i / n) ** 3
        assert w == round(size * (1 - sparsity))
    assert widths[-1] == 75 and widths == sorted(widths, reverse=True)
    assert widths[0] == 500 - round(425 * (1 - (11 / 12) ** 3))  # fast at the start
    assert cubic_fraction(0.3, 4, 4) == pytest.approx(0.3)
    assert cubic_width(10, 0.01, 5, 5, min_width=3) == 3  # min_width holds
    assert cubic_width(2, 0.01, 5, 5, min_width=3) == 2  # never above the group


def test_warmup_has_no_point_and_cycles_count_from_its_end():
    s = SimplifySchedule(SimplifyConfig(points_per_epoch=2, cycle_epochs=1, warmup_epochs=2), 10)
    assert [e for e in range(7) if any(s.is_point(e, t) for t in range(1, 11))] == [2, 4, 6]
    assert [e for e in range(7) if s.cycle_starts(e)] == [3, 4, 5, 6]
    plain = SimplifySchedule(SimplifyConfig(points_per_epoch=2, cycle_epochs=1), 10)
    assert [e for e in range(7) if plain.cycle_starts(e)] == [1, 2, 3, 4, 5, 6]  # unchanged


def test_cubic_points_stop_at_the_target_epoch():
    s = SimplifySchedule(cubic(warmup_epochs=1, target_epoch=4), 10)
    points = [(e, t) for e in range(8) for t in range(1, 11) if s.is_point(e, t)]
    assert points == [(e, t) for e in (1, 2, 3) for t in (5, 10)]
    assert [s.point_number(e, t) for e, t in points] == [(i, 6) for i in range(1, 7)]
    assert not any(s.cycle_starts(e) for e in range(8))


def test_keep_best_keeps_the_highest_rates_ties_by_norm():
    active = torch.tensor([True, True, True, True, False, True])
    rate = torch.tensor([0.5, 0.1, 0.1, 0.9, 1.0, 0.1])
    norm = torch.tensor([0.0, 1.0, 3.0, 0.0, 9.0, 2.0])
    keep = keep_best(active, rate, norm, 3)
    assert keep.tolist() == [True, False, True, True, False, False]  # inactive never back
    assert keep_best(active, rate, norm, 7).tolist() == active.tolist()


def _train_mlp(simp_cfg: SimplifyConfig, epochs: int, compact: bool) -> tuple[list, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5)
    )
    mesimp.meprop_(model, mesimp.MePropConfig(k=8, selection="unified"))
    x, y = torch.randn(160, 20), torch.randint(0, 5, (160,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = mesimp.Simplifier(
        model, simp_cfg, opt, steps_per_epoch=10, epochs=epochs,
        example_inputs=x[:2] if compact else None, compact=compact,
    )  # fmt: skip
    events = []
    for epoch in range(epochs):
        for s in range(10):
            loss = F.cross_entropy(model(x[s * 16 : (s + 1) * 16]), y[s * 16 : (s + 1) * 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
            events += [{**e, "at": (epoch, s + 1)} for e in simp.step()]
    return events, simp


@pytest.mark.parametrize("compact", [False, True])
def test_simplifier_runs_the_cubic_schedule_to_the_exact_target(compact):
    cfg = cubic(warmup_epochs=1, target_epoch=4, target=0.2, min_width=2)
    events, simp = _train_mlp(cfg, epochs=6, compact=compact)
    points = [e for e in events if e["event"] == "simplify"]
    assert [e["at"] for e in points] == [(e, t) for e in (1, 2, 3) for t in (5, 10)]
    for i, e in enumerate(points, start=1):
        assert e["widths"] == [cubic_width(40, 0.2, i, 6, 2), cubic_width(30, 0.2, i, 6, 2)]
    assert points[-1]["widths"] == [8, 6] and simp.widths == [8, 6]
    assert all(e["event"] != "cycle_start" for e in events)
    assert simp.state_dict()["full_sizes"] == {n: s for n, s in simp.full_sizes.items()}
    assert sorted(simp.full_sizes.values()) == [30, 40]


def test_cubic_keeps_the_most_selected_units():
    """At a point, the units kept are the ones with the highest hits / ref."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    mesimp.meprop_(model, mesimp.MePropConfig(k=4, selection="unified"))
    cfg = SimplifyConfig(
        points_per_epoch=1, cycle_epochs=0, schedule="cubic", target=0.5, target_epoch=1
    )
    simp = mesimp.Simplifier(model, cfg, None, steps_per_epoch=1)
    layer = model[0]
    layer.hits.copy_(torch.tensor([5, 0, 9, 1, 7, 2, 8, 3, 6, 4]))
    layer.ref.fill_(10)
    simp.step()
    assert layer.mask.nonzero().flatten().tolist() == [0, 2, 4, 6, 8]


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(schedule="cubic", target=0.0, target_epoch=2), "target width fraction in (0, 1]"),
        (dict(schedule="cubic", target=1.5, target_epoch=2), "target width fraction in (0, 1]"),
        (dict(schedule="cubic", target_epoch=2), "target width fraction"),
        (dict(schedule="cubic", target=0.2), "target epoch after the warm-up"),
        (dict(schedule="cubic", target=0.2, target_epoch=2, warmup_epochs=2), "after the warm-up"),
        (dict(target=0.2), "needs the cubic schedule"),
        (dict(warmup_epochs=-1), "warm-up epochs must be an integer >= 0"),
        (dict(schedule="linear"), "schedule must be one of rate, cubic"),
    ],
)
def test_impossible_settings_are_one_line_errors(kw, msg):
    with pytest.raises(BadInputError, match=re.escape(msg)) as e:
        SimplifyConfig(**kw)
    assert "\n" not in str(e.value)


def test_train_config_refuses_a_warmup_or_target_past_the_run():
    with pytest.raises(BadInputError, match="leaves no epoch"):
        TrainConfig(k=20, epochs=3, simplify=SimplifyConfig(warmup_epochs=3))
    with pytest.raises(BadInputError, match="after the run's 3 epochs"):
        TrainConfig(k=20, epochs=3, simplify=cubic(target_epoch=4))


def test_old_configs_load_with_the_papers_schedule():
    old = TrainConfig(k=20, simplify=SimplifyConfig()).to_dict()
    for key in ("warmup_epochs", "schedule", "target", "target_epoch"):
        del old["simplify"][key]
    s = TrainConfig.from_dict(old).simplify
    assert (s.warmup_epochs, s.schedule, s.target, s.target_epoch) == (0, "rate", None, None)
    new = TrainConfig(k=20, epochs=5, simplify=cubic(warmup_epochs=1))
    assert TrainConfig.from_dict(new.to_dict()).simplify == new.simplify
    assert math.isclose(new.simplify.target, 0.25)


def test_cycle_epochs_default_follows_the_schedule():
    assert SimplifyConfig().cycle_epochs == 1
    assert cubic().cycle_epochs == 0 and cubic(cycle_epochs=2).cycle_epochs == 2
    assert SimplifyConfig(schedule="cubic", target=0.5, target_epoch=1).cycle_epochs == 0


def test_cli_cubic_run_ends_on_the_target_and_records_the_recipe(tmp_path, tiny_npz):
    import mesimp.cli.commands  # noqa: F401  (registers the commands)
    from click.testing import CliRunner
    from mesimp.cli.main import cli

    out = tmp_path / "m.pt"
    args = ["train", "--data", tiny_npz, "--dev-size", "100", "--hidden", "40", "--k", "8",
            "--epochs", "3", "--simplify", "--warmup-epochs", "1", "--schedule", "cubic",
            "--target", "0.25", "--no-progress", "--json", "-o", out]  # fmt: skip
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["hidden_sizes"] == [10, 10]  # compacted to round(0.25 * 40)
    s = doc["config"]["simplify"]
    assert (s["warmup_epochs"], s["schedule"], s["target"]) == (1, "cubic", 0.25)
    assert (s["target_epoch"], s["cycle_epochs"]) == (3, 0)  # 3/4 of 3 epochs, rounded up
    points = [e for e in read_jsonl(tmp_path / "m.metrics.jsonl") if e["event"] == "simplify"]
    assert points and min(e["epoch"] for e in points) == 1  # nothing in the warm-up
    bad = CliRunner().invoke(cli, [str(a) for a in [*args[:-3], "--target", "2", "-o", out]])
    assert bad.exit_code != 0 and "target width fraction in (0, 1]" in bad.output


def test_recipe_is_the_cli_default_and_prune_rate_selects_the_papers_rule(tmp_path, tiny_npz):
    import mesimp.cli.commands  # noqa: F401  (registers the commands)
    from click.testing import CliRunner
    from mesimp.cli.main import cli

    r = SimplifyConfig.recipe(10)
    assert (r.schedule, r.target, r.warmup_epochs, r.target_epoch, r.cycle_epochs) == (
        "cubic", 0.15, 3, 8, 0,
    )  # fmt: skip
    assert (
        SimplifyConfig.recipe(1).warmup_epochs == 0 and SimplifyConfig.recipe(1).target_epoch == 1
    )
    with pytest.raises(BadInputError, match="needs the run's epochs"):
        SimplifyConfig.recipe(0)
    base = ["train", "--data", tiny_npz, "--dev-size", "100", "--hidden", "40", "--k", "8",
            "--epochs", "2", "--simplify", "--no-progress", "--json"]  # fmt: skip

    def run(*extra: object) -> dict:
        args = [*base, *extra, "-o", tmp_path / "m.pt"]
        got = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert got.exit_code == 0, got.output
        return json.loads(got.stdout)["config"]["simplify"]

    assert run() == SimplifyConfig.recipe(2).to_dict()  # the CLI default is the API's recipe
    assert run("--target", "0.5")["target"] == 0.5
    papers = run("--prune-rate", "0.05")
    assert (papers["schedule"], papers["prune_rate"], papers["cycle_epochs"]) == ("rate", 0.05, 1)
    args = [*base, "--prune-rate", "0.05", "--schedule", "cubic", "-o", tmp_path / "x.pt"]
    bad = CliRunner().invoke(cli, [str(a) for a in args])
    assert bad.exit_code != 0 and "--prune-rate is the rate schedule's threshold" in bad.output


def test_simplifier_without_a_config_runs_the_recipe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    mesimp.meprop_(model, mesimp.MePropConfig(k=6, selection="unified"))
    simp = mesimp.Simplifier(model, steps_per_epoch=2, epochs=10)
    assert simp.config == SimplifyConfig.recipe(10)
    with pytest.raises(BadInputError, match="needs epochs="):
        mesimp.Simplifier(model, steps_per_epoch=2)
    with pytest.raises(BadInputError, match="not a point of the cubic schedule"):
        simp.simplify()  # step 0 is no point: the cubic schedule needs step()
