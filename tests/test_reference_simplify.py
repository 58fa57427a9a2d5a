"""The reference-faithful meSimp (``--reference --simplify``) against the C# code.

* the vectorised ``heap_topk`` against a line-by-line Python port of the C#
  ``TopNHeap.GetAbsTop`` (written here from ``TopNHeap.cs``, independent of the
  preorder argument ``heap_topk`` rests on), on rows with many zeros and masked units;
* a meProp layer's counts and gradient with that selection, against the port;
* the schedule on a tiny run against a hand-written expectation: which dev checks
  prune, how many examples each prune judged (counting goes on through plain cycles),
  when Adam's moments are zeroed, and that its step counter is kept;
* the command line's defaults (k 160, rate 0.1, cycles of 5, a prune per check).
"""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from conftest import read_jsonl
from test_resume import DEV, Fault, assert_runs_identical, quiet_train

from mesimp.errors import BadInputError
from mesimp.files.checkpoint import load_checkpoint
from mesimp.models import MLP, MLPConfig
from mesimp.nn.heap_select import heap_topk
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.reference_schedule import ReferenceSimplifier, reference_keep
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.reference import ReferenceAdam
from mesimp.training.resume import resume_path
from mesimp.training.runsafety import TrainingInterrupted


def _shift_down(v: list[float], ix: list[int], cur: int, top: int) -> None:
    """``TopNHeap.ShiftDown``, line by line."""
    while True:
        lc = (cur << 1) + 1
        rc = lc + 1
        if lc >= top:
            return
        if rc >= top:
            nxt = lc
        else:
            nxt = rc if v[lc] > v[rc] else lc
        if v[cur] > v[nxt]:
            v[cur], v[nxt] = v[nxt], v[cur]
            ix[cur], ix[nxt] = ix[nxt], ix[cur]
            cur = nxt
        else:
            return


def csharp_get_abs_top(row: list[float], top: int) -> list[int]:
    """``TopNHeap.GetAbsTop`` (``MakeHeap``, then the scan of columns top..n-1)."""
    v = [abs(x) for x in row[:top]]
    ix = list(range(top))
    for i in range(top >> 1, -1, -1):
        _shift_down(v, ix, i, top)
    for i in range(top, len(row)):
        a = abs(row[i])
        if a > v[0]:
            v[0], ix[0] = a, i
            _shift_down(v, ix, 0, top)
    return ix


def test_heap_topk_is_the_csharp_heap_including_zero_fills():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    filled = 0
    for _ in range(300):
        n = rng.randint(1, 48)
        k = rng.randint(1, n)
        g = torch.randn(4, n, generator=gen, dtype=torch.float64)
        g[torch.rand(4, n, generator=gen) < rng.random()] = 0.0  # ReLU zeros
        g[:, torch.rand(n, generator=gen) < 0.3] = 0.0  # masked units: zero in every row
        got = heap_topk(g.abs(), k)
        for r in range(4):
            want = csharp_get_abs_top(g[r].tolist(), k)
            assert sorted(got[r].tolist()) == sorted(want), (n, k, g[r].tolist())
            filled += int((g[r] != 0).sum()) < k
    assert filled > 100  # the zero-fill case was exercised, not just plain top-k
    with pytest.raises(ValueError, match="k <= 3"):
        heap_topk(torch.ones(2, 3), 4)


@pytest.mark.parametrize("fills", [True, False])
def test_a_heap_layer_counts_the_zero_fills_and_keeps_the_meprop_gradient(fills):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
    ).double()
    ref = [p.detach().clone() for p in model.parameters()]
    cfg = MePropConfig(
        k=8, selection="topk", dense_bias=True, heap_select=True, count_zero_fills=fills
    )
    meprop_(model, cfg)
    layer = model[0]
    layer.apply_mask(torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool))
    assert layer.k == 8  # fixed: not capped at the 9 active units
    x = torch.randn(6, 5, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    # by hand: the gradient at the masked ReLU layer, the port's selection, its counts
    w1, b1, w2, b2 = ref
    mask = layer.mask.double()
    z = (x @ w1.T + b1) * mask
    dz = ((2 * (z.clamp(min=0) @ w2.T + b2)) @ w2) * (z > 0)
    sel = [csharp_get_abs_top(row, 8) for row in dz.tolist()]
    keep = torch.zeros_like(dz).scatter_(1, torch.tensor(sel), 1.0)
    # the C# code counts all k slots; the ablation only those with a gradient
    hits = (keep if fills else keep * (dz != 0)).sum(0).long()
    assert torch.equal(layer.hits, hits) and int(layer.ref) == 6
    assert int((dz != 0).sum(1).min()) < 8  # some rows are filled up with zeros
    torch.testing.assert_close(layer.weight.grad, (dz * keep).T @ x, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.bias.grad, dz.sum(0), atol=1e-12, rtol=0)


def test_reference_rule_masks_below_the_truncated_threshold_and_never_revives():
    model = meprop_(
        MLP(MLPConfig(in_features=3, hidden_sizes=[4, 4], out_features=2)),
        MePropConfig(k=2, selection="topk", heap_select=True),
    )
    opt = ReferenceAdam(model.parameters())
    for p in model.parameters():  # three steps: moments and a step count to keep
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step()
    simp = ReferenceSimplifier(model, SimplifyConfig(prune_rate=0.1, cycle_epochs=2), opt)
    first, second = simp.layers.values()
    first.hits.copy_(torch.tensor([0, 1, 2, 5]))
    first.ref.fill_(29)  # th = (int)(29 * 0.1f) = 2
    second.hits.copy_(torch.tensor([9, 9, 9, 9]))
    second.ref.fill_(30)
    events = simp.after_check(0)  # epoch 0: prunes, no reset ((0 + 1) % 2 != 0)
    assert [e["event"] for e in events] == ["simplify"]
    assert events[0]["ref"] == [29, 30] and events[0]["widths"] == [2, 4]
    assert first.mask.tolist() == [False, False, True, True]
    assert int(first.ref) == 0 and not first.hits.any()
    first.hits.fill_(100)
    first.ref.fill_(100)
    second.ref.fill_(50)  # and no hits
    events = simp.after_check(1)  # epoch 1: a reset, then a prune
    assert [e["event"] for e in events] == ["optimizer_reset", "simplify"]
    assert first.mask.tolist() == [False, False, True, True]  # masked units stay masked
    assert second.mask.tolist() == [False] * 4  # no hits: the C# code has no minimum width
    for state in opt.state.values():
        assert float(state["step"]) == 3 and not state["exp_avg"].any()
    assert simp.after_check(2) == []  # epoch 2: a plain cycle's first epoch
    fresh = ReferenceSimplifier(model, simp.config, opt, reset="fresh")
    fresh.after_check(3)  # the ablation: a fresh Adam, step counter included
    assert all(float(state["step"]) == 0 for state in opt.state.values())
    with pytest.raises(BadInputError, match="reference_reset"):
        ReferenceSimplifier(model, simp.config, opt, reset="t")
    assert reference_keep(torch.tensor([68, 69]), 690, 0.1).tolist() == [False, True]


def test_train_reference_simplify_follows_the_csharp_schedule(tmp_path, tiny_npz, monkeypatch):
    def config(out):
        return TrainConfig(
            data=str(tiny_npz),
            dev_size=DEV,
            hidden=16,
            k=6,
            selection="topk",
            epochs=6,
            batch_size=100,
            evals_per_epoch=4,
            simplify=SimplifyConfig(prune_rate=0.1, points_per_epoch=4, cycle_epochs=2),
            reference=True,
            output=str(out),
            keep_last=True,
            save_every=0,
        )

    out = tmp_path / "m.pt"
    cfg = config(out)
    assert cfg.meprop_config().heap_select
    quiet_train(cfg)
    log = read_jsonl(out.with_name("m.metrics.jsonl"))
    recs = [r for r in log if r["event"] not in ("start", "epoch")]
    # 500 examples a epoch, 4 chunks of 125 (steps of 100 + 25): a check every 2 steps;
    # cycles of 2 epochs: epochs 0-1 and 4-5 prune after every check, 2-3 do not;
    # Adam's moments are zeroed after every check of epochs 1, 3 and 5
    want, step = [], 0
    for epoch in range(6):
        for _ in range(4):
            step += 2
            want.append(("eval", step))
            if epoch % 2 == 1:
                want.append(("optimizer_reset", step))
            if epoch in (0, 1, 4, 5):
                want.append(("simplify", step))
    assert [(r["event"], r["step"]) for r in recs] == want
    simp = [r for r in recs if r["event"] == "simplify"]
    # each prune judged the examples since the one before: the first one of epoch 4
    # saw the whole plain cycle (epochs 2-3) and its own chunk
    assert [r["ref"][0] for r in simp] == [125] * 8 + [1125] + [125] * 7
    widths = [r["widths"] for r in simp]
    assert all(
        a >= b
        for w0, w1 in zip(widths, widths[1:], strict=False)
        for a, b in zip(w0, w1, strict=True)
    )
    # the dev check comes before the chunk's prune: it sees the widths from before it
    at = {r["step"]: r["widths"] for r in recs if r["event"] == "eval"}
    before = [[16, 16]] + widths[:-1]
    assert [at[r["step"]] for r in simp] == before
    assert widths[-1] != [16, 16] and before != widths  # some prunes changed a width
    last = load_checkpoint(out.with_name("m.last.pt"))
    state = last["resume"]["optimizer"]["state"]
    assert all(float(s["step"]) == 48 for s in state.values())  # t is never reset...
    assert all(not s["exp_avg"].any() for s in state.values())  # ...the moments were
    assert json.dumps(last["meprop"]["config"]["heap_select"]) == "true"
    # interrupted in a reset epoch (step 13 of 48) and resumed: the same run, bit for bit
    again = tmp_path / "again" / "m.pt"
    fault = Fault(monkeypatch, 13, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        quiet_train(config(again))
    fault.undo()
    quiet_train(resume=resume_path(again))
    assert_runs_identical(out, again)


def test_cli_reference_simplify_takes_the_csharp_settings(tmp_path, tiny_npz, capsys):
    import mesimp.cli.commands  # noqa: F401  (registers the commands)
    from mesimp.cli.main import main

    out = tmp_path / "m.pt"
    args = ["train", "--reference", "--simplify", "--data", tiny_npz, "--dev-size", DEV]
    args += ["--hidden", "200", "--epochs", "1", "-o", out, "--json"]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code in (0, None)
    doc = json.loads(capsys.readouterr().out)
    cfg = doc["config"]
    assert doc["step_path"] == "python"  # the heap has no compiled path: the JSON says so
    assert (cfg["k"], cfg["selection"], cfg["reference"]) == (160, "topk", True)
    assert cfg["simplify"]["prune_rate"] == 0.1 and cfg["simplify"]["cycle_epochs"] == 5
    assert cfg["simplify"]["points_per_epoch"] == cfg["evals_per_epoch"] == 8
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args[:-3]] + ["--selection", "unified", "-o", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the C# meSimp" in err[0]


def test_reference_simplify_refuses_what_the_csharp_code_did_not_do():
    simp = SimplifyConfig(points_per_epoch=8, cycle_epochs=5)
    with pytest.raises(BadInputError, match="C# meSimp"):
        TrainConfig(reference=True, k=60, selection="unified", simplify=simp, evals_per_epoch=8)
    with pytest.raises(BadInputError, match="must equal --evals-per-epoch"):
        TrainConfig(reference=True, k=60, selection="topk", simplify=simp, evals_per_epoch=4)
    with pytest.raises(BadInputError, match="cycle-epochs >= 1"):
        TrainConfig(
            reference=True,
            k=60,
            selection="topk",
            simplify=SimplifyConfig(points_per_epoch=8, cycle_epochs=0),
            evals_per_epoch=8,
        )
