"""Shrink tests: masked model == shrunk model, against hand-sliced weights and a masked
forward written from the definition (``conftest.masked_forward``), plus the checkpoint
path (``shrink_checkpoint``), its report, its refusals, and that failures write nothing.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_TEST, hand_mlp, masked_forward
from helpers import files_in
from torch import nn

from mesimp.errors import BadInputError, CheckpointError, DataError, VerificationError
from mesimp.files.checkpoint import make_checkpoint, save_checkpoint
from mesimp.models import MLPConfig, build_model
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.simplify.checkpoint_shrink import (
    prune_linear_in,
    prune_linear_out,
    shrink_checkpoint,
    shrink_mlp,
)

shrink_module = importlib.import_module("mesimp.simplify.checkpoint_shrink")
TOL = 1e-5


# --------------------------------------------------------------------------------------
# module level
# --------------------------------------------------------------------------------------
def random_masked_mlp(hidden: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(MLPConfig(in_features=784, hidden_sizes=hidden, out_features=10))
    meprop_(model, MePropConfig(k=5))
    keeps = []
    for i, h in enumerate(hidden):
        keep = torch.rand(h, generator=gen) < 0.5
        keep[int(torch.randint(h, (1,), generator=gen))] = True  # never empty
        model[2 * i].apply_mask(keep)
        keeps.append(keep)
    model.eval()
    return model, keeps


@pytest.mark.parametrize(
    "hidden", [[24], [24, 17], [31, 8, 20], [12, 40, 9, 16]], ids=["d1", "d2", "d3", "d4"]
)
def test_masked_equals_shrunk(hidden, test_inputs):
    model, keeps = random_masked_mlp(hidden, seed=len(hidden))
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    small, arch = shrink_mlp(model, [m.clone() for m in keeps])

    widths = [int(k.sum()) for k in keeps]
    assert arch["hidden_sizes"] == widths
    assert arch["in_features"] == 784 and arch["out_features"] == 10
    assert not any(isinstance(m, MePropLinear) for m in small.modules())

    # hand slicing: rows of W_l, b_l by keep_l; columns of W_{l+1} by keep_l
    n = len(hidden)
    for j in range(n + 1):
        w = raw[f"{2 * j}.weight"]
        b = raw[f"{2 * j}.bias"]
        if j < n:
            w, b = w[keeps[j]], b[keeps[j]]
        if j > 0:
            w = w[:, keeps[j - 1]]
        lin = small[2 * j]
        assert type(lin) is nn.Linear
        assert lin.weight.shape == w.shape and lin.bias.shape == b.shape
        assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)
    # the source model is left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.items())

    x_real, _ = test_inputs
    x_rand = torch.randn(300, 784, generator=torch.Generator().manual_seed(7))
    for x in (x_rand, x_real):
        with torch.no_grad():
            ref = masked_forward(raw, keeps, x)
            out_masked, out_small = model(x), small(x)
        assert (out_masked - ref).abs().max() <= TOL  # the masked model does what it claims
        assert (out_small - ref).abs().max() <= TOL
        assert (out_small - out_masked).abs().max() <= TOL


def test_shrink_mlp_refuses_wrong_number_of_masks():
    model, keeps = random_masked_mlp([8, 8], seed=0)
    with pytest.raises(BadInputError):
        shrink_mlp(model, keeps[:1])


@pytest.mark.parametrize("bias", [True, False])
def test_prune_linear_out_vs_hand_slicing(bias):
    torch.manual_seed(0)
    layer = nn.Linear(7, 6, bias=bias)
    keep = torch.tensor([0, 2, 5])
    new = prune_linear_out(layer, keep)
    assert (new.in_features, new.out_features) == (7, 3)
    w = layer.weight.detach()
    assert torch.equal(new.weight, torch.stack([w[0], w[2], w[5]]))
    if bias:
        b = layer.bias.detach()
        assert torch.equal(new.bias, torch.stack([b[0], b[2], b[5]]))
    else:
        assert new.bias is None
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.allclose(new(x), layer(x)[:, [0, 2, 5]], atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_prune_linear_in_vs_hand_slicing(bias):
    torch.manual_seed(0)
    layer = nn.Linear(7, 6, bias=bias)
    keep = torch.tensor([1, 3, 4, 6])
    new = prune_linear_in(layer, keep)
    assert (new.in_features, new.out_features) == (4, 6)
    w = layer.weight.detach()
    assert torch.equal(new.weight, torch.stack([w[:, 1], w[:, 3], w[:, 4], w[:, 6]], dim=1))
    if bias:
        assert torch.equal(new.bias, layer.bias)
    else:
        assert new.bias is None
    # inputs that are zero on the dropped columns give the same outputs
    x = torch.randn(4, 7)
    x[:, [0, 2, 5]] = 0
    with torch.no_grad():
        assert torch.allclose(new(x[:, keep]), layer(x), atol=1e-6)


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def raw_masks(ckpt: dict) -> list[torch.Tensor]:
    layers = ckpt["meprop"]["layers"]
    return [layers[name]["mask"] for name in sorted(layers, key=int)]


def linear_cost(sizes: list[int]) -> tuple[int, int]:
    """(params, MACs per example) of an MLP with these layer sizes, counted by hand."""
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    macs = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
    return params, macs


def check_plain_load(out_path: Path, src_raw: dict, masks: list[torch.Tensor], x: torch.Tensor):
    """The shrunk file loads with weights_only into a hand-written nn.Sequential and
    computes the masked source model's function."""
    small = torch.load(out_path, weights_only=True)
    assert small["format"] == "mesimp.checkpoint" and small["version"] == 1
    widths = small["arch"]["hidden_sizes"]
    assert widths == [int(m.sum()) for m in masks]
    net = hand_mlp(widths)
    net.load_state_dict(small["state_dict"])  # strict: exactly nn.Sequential's keys
    net.eval()
    with torch.no_grad():
        diff = (net(x) - masked_forward(src_raw["state_dict"], masks, x)).abs().max()
    assert diff <= TOL
    return small


def test_shrink_checkpoint_with_masks(ckpts, tmp_path, verify_npz, test_inputs):
    src = torch.load(ckpts["mesimp"], weights_only=True)
    masks = raw_masks(src)
    widths = [int(m.sum()) for m in masks]
    assert all(0 < w < 32 for w in widths), "the fixture should have pruned something"
    out = tmp_path / "small.pt"
    r = shrink_checkpoint(ckpts["mesimp"], out, data=str(verify_npz))

    assert r["path"] == str(out) and out.is_file()
    assert r["max_abs_diff"] <= TOL
    b, a = r["before"], r["after"]
    assert b["hidden_sizes"] == [32, 32] and b["active_widths"] == widths
    assert a["hidden_sizes"] == widths and a["active_widths"] == widths
    assert (b["params"], b["macs"]) == linear_cost([784, 32, 32, 10])
    assert (a["params"], a["macs"]) == linear_cost([784, *widths, 10])
    assert [row["out_features"] for row in a["layers"]] == [*widths, 10]
    assert [row["in_features"] for row in a["layers"]] == [784, *widths]
    assert [row["params"] for row in a["layers"]] == [
        784 * widths[0] + widths[0],
        widths[0] * widths[1] + widths[1],
        widths[1] * 10 + 10,
    ]
    assert [row["macs"] for row in b["layers"]] == [784 * 32, 32 * 32, 32 * 10]
    assert math.isclose(r["params_ratio"], b["params"] / a["params"])
    assert math.isclose(r["macs_ratio"], b["macs"] / a["macs"])

    small = check_plain_load(out, src, masks, test_inputs[0])
    assert small["meprop"]["layers"] == {}  # plain layers: no counters or masks left
    assert small["train"]["shrunk_from"]["path"] == str(ckpts["mesimp"])


def test_a_compacted_checkpoint_shrinks_to_a_verified_copy(ckpts, tmp_path, verify_npz):
    """Compaction already removed the masked units: ``shrink`` is a copy that verifies.
    (The widths are the masked run's only up to float32 rounding, which differs between
    GEMM shapes and CPUs: equality is tested in float64, in tests/test_compact.py.)"""
    compacted = torch.load(ckpts["mesimp_compact"], weights_only=True)
    assert all(bool(s["mask"].all()) for s in compacted["meprop"]["layers"].values())
    widths = compacted["arch"]["hidden_sizes"]
    assert all(0 < w < 32 for w in widths)
    r = shrink_checkpoint(ckpts["mesimp_compact"], tmp_path / "c.pt", data=str(verify_npz))
    assert r["max_abs_diff"] == 0.0 and r["params_ratio"] == 1.0
    assert r["before"]["hidden_sizes"] == r["after"]["hidden_sizes"] == widths
    a = torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], v) for k, v in compacted["state_dict"].items())


def test_shrunk_test_accuracy_is_measured_on_the_shrunk_model(ckpts, tmp_path, verify_npz):
    out = tmp_path / "small.pt"
    r = shrink_checkpoint(ckpts["mesimp"], out, data=str(verify_npz))
    small = torch.load(out, weights_only=True)
    net = hand_mlp(small["arch"]["hidden_sizes"])
    net.load_state_dict(small["state_dict"])
    z = np.load(verify_npz)
    x = torch.from_numpy(z["x_test"].reshape(N_TEST, -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(z["y_test"].astype(np.int64))
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).double().mean())
    assert r["after"]["test_accuracy"] == pytest.approx(acc)
    assert small["train"]["metrics"]["test_accuracy"] == pytest.approx(acc)


def test_shrink_default_output_path(ckpts, tmp_path, verify_npz):
    src = tmp_path / "run.pt"
    src.write_bytes(ckpts["mesimp"].read_bytes())
    r = shrink_checkpoint(src, data=str(verify_npz))
    assert r["path"] == str(tmp_path / "run.small.pt")
    assert (tmp_path / "run.small.pt").is_file()


@pytest.mark.parametrize("prune_rate", [0.0, 0.2, 0.45])
def test_shrink_post_hoc_from_counters(ckpts, tmp_path, verify_npz, test_inputs, prune_rate):
    src = torch.load(ckpts["meprop"], weights_only=True)
    layers = src["meprop"]["layers"]
    assert all(bool(st["mask"].all()) for st in layers.values())
    # the rule, by hand: hits >= floor(rate * ref), topped up to min_width 1
    masks = []
    for name in sorted(layers, key=int):
        hits, ref = layers[name]["hits"], int(layers[name]["ref"])
        assert ref > 0
        keep = torch.tensor([int(h) >= math.floor(prune_rate * ref) for h in hits])
        if not keep.any():
            keep[int(hits.argmax())] = True
        masks.append(keep)
    out = tmp_path / "small.pt"
    r = shrink_checkpoint(ckpts["meprop"], out, prune_rate=prune_rate, data=str(verify_npz))
    widths = [int(m.sum()) for m in masks]
    if prune_rate == 0.0:
        assert widths == [32, 32]
    elif prune_rate == 0.2:
        assert all(0 < w < 32 for w in widths)  # a case that prunes some, not all
    assert r["after"]["hidden_sizes"] == widths
    assert r["before"]["hidden_sizes"] == [32, 32]
    assert r["max_abs_diff"] <= TOL
    assert (r["after"]["params"], r["after"]["macs"]) == linear_cost([784, *widths, 10])
    check_plain_load(out, src, masks, test_inputs[0])
    assert torch.load(out, weights_only=True)["train"]["shrunk_from"]["prune_rate"] == prune_rate


def test_shrink_verifies_on_a_small_dataset(ckpts, tmp_path, tiny_npz):
    r = shrink_checkpoint(ckpts["mesimp"], tmp_path / "small.pt", data=str(tiny_npz))
    assert r["max_abs_diff"] <= TOL


def test_shrink_without_data_verifies_on_random_inputs(ckpts, tmp_path, monkeypatch):
    import mesimp.data.images as images_module  # where shrink's data loading happens

    monkeypatch.setattr(images_module, "load_image_dataset", _no_data)
    r = shrink_checkpoint(ckpts["mesimp"], tmp_path / "small.pt")
    assert r["verified_on"] == "random inputs"
    assert r["max_abs_diff"] <= TOL


def _no_data(*_a, **_k):
    raise DataError("no data here")


# --------------------------------------------------------------------------------------
# bad input: refused, and nothing written
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["text", "random_dict", "missing", "directory", "state_dict"])
def test_shrink_refuses_non_checkpoints(tmp_path, kind):
    path = tmp_path / "in.pt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "random_dict":
        torch.save({"weights": torch.randn(3, 3), "epoch": 4}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "state_dict":
        torch.save(nn.Linear(3, 2).state_dict(), path)
    before = files_in(tmp_path)
    out = tmp_path / "out.pt"
    with pytest.raises(CheckpointError):
        shrink_checkpoint(path, out)
    assert files_in(tmp_path) == before


def test_post_hoc_on_a_dense_checkpoint_is_refused(ckpts, tmp_path):
    assert torch.load(ckpts["dense"], weights_only=True)["meprop"]["layers"] == {}
    with pytest.raises(BadInputError, match="counters"):
        shrink_checkpoint(ckpts["dense"], tmp_path / "out.pt", prune_rate=0.1)
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.01])
def test_prune_rate_outside_unit_interval_is_refused(ckpts, tmp_path, rate):
    with pytest.raises(BadInputError, match="prune rate"):
        shrink_checkpoint(ckpts["meprop"], tmp_path / "out.pt", prune_rate=rate)
    assert files_in(tmp_path) == set()


def fully_masked_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=784, hidden_sizes=[8, 6], out_features=10))
    meprop_(model, MePropConfig(k=3))
    model[2].apply_mask(torch.zeros(6, dtype=torch.bool))
    save_checkpoint(path, make_checkpoint(model, model.config.to_dict(), MePropConfig(k=3)))


def test_zero_width_layer_is_refused(tmp_path):
    src = tmp_path / "in.pt"
    fully_masked_checkpoint(src)
    before = files_in(tmp_path)
    with pytest.raises(BadInputError, match="zero width"):
        shrink_checkpoint(src, tmp_path / "out.pt", min_width=1)
    assert files_in(tmp_path) == before


def test_zero_width_with_min_width_zero_writes_nothing(tmp_path):
    """``--min-width 0`` ("allows a layer to vanish") cannot produce a loadable file:
    MLPConfig refuses zero widths, so the shrink must refuse rather than write one."""
    src = tmp_path / "in.pt"
    fully_masked_checkpoint(src)
    before = files_in(tmp_path)
    with pytest.raises(BadInputError):
        shrink_checkpoint(src, tmp_path / "out.pt", min_width=0)
    assert files_in(tmp_path) == before


def test_failed_verification_writes_nothing(ckpts, tmp_path, verify_npz, monkeypatch):
    monkeypatch.setattr(shrink_module, "TOLERANCE", -1.0)
    out = tmp_path / "out.pt"
    with pytest.raises(VerificationError, match="nothing written"):
        shrink_checkpoint(ckpts["mesimp"], out, data=str(verify_npz))
    assert not out.exists()
    assert files_in(tmp_path) == set()


def test_unwritable_output_is_refused(ckpts, tmp_path, verify_npz):
    (tmp_path / "adir").mkdir()
    with pytest.raises(BadInputError):
        shrink_checkpoint(ckpts["mesimp"], tmp_path / "adir", data=str(verify_npz))
    assert files_in(tmp_path) == {"adir"}


def test_round_keeps_cuts_to_a_multiple_keeping_the_most_selected():
    """Rounding down to a multiple of 16 keeps the most-hit active units, hand-checked."""
    from mesimp.simplify.checkpoint_shrink import round_keeps

    layer = MePropLinear(4, 40, k=3)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 1, 2]] = False  # 37 active units
    layer.apply_mask(keep)
    hits = torch.arange(40)  # unit j was selected j times
    hits[5] = 1000  # an active unit with many hits must survive
    layer.hits.copy_(hits)
    layer.ref.fill_(1)
    kept = round_keeps(layer, 16)
    assert int(kept.sum()) == 32
    expected = set(range(8, 40)) | {5}  # the 32 largest hit counts among active units
    expected.discard(8)
    assert set(kept.nonzero().squeeze(1).tolist()) == expected
    assert not kept[[0, 1, 2]].any()  # masked units never come back


@pytest.mark.parametrize(
    ("width", "multiple", "expected"), [(10, 16, 10), (16, 16, 16), (17, 16, 16), (35, 8, 32)]
)
def test_round_keeps_widths(width, multiple, expected):
    from mesimp.simplify.checkpoint_shrink import round_keeps

    layer = MePropLinear(4, width, k=2)
    assert int(round_keeps(layer, multiple).sum()) == expected


def test_shrink_round_to_verifies_and_rejects_bad_values(tmp_path, masked_ckpt_for_round):
    from mesimp.errors import BadInputError
    from mesimp.simplify.checkpoint_shrink import shrink_checkpoint

    src = masked_ckpt_for_round
    r = shrink_checkpoint(src, tmp_path / "r.pt", round_to=8, data=None)
    assert all(w % 8 == 0 for w in r["after"]["hidden_sizes"])
    assert r["max_abs_diff"] <= 1e-5
    with pytest.raises(BadInputError):
        shrink_checkpoint(src, tmp_path / "bad.pt", round_to=0)
    assert not (tmp_path / "bad.pt").exists()


@pytest.fixture
def masked_ckpt_for_round(tmp_path):
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=784, hidden_sizes=[30, 21], out_features=10))
    meprop_(model, MePropConfig(k=5))
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_checkpoint(model, model.config.to_dict(), MePropConfig(k=5)))
    return path
