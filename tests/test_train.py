"""Training tests on a tiny real-data ``.npz``: outputs, determinism, fine-tuning from a
shrunk checkpoint, and bad input refused before any training (and before any file)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEV, N_TEST, hand_mlp, read_jsonl, train_tiny
from helpers import files_in

from mesimp.errors import BadInputError, DataError
from mesimp.simplify.checkpoint_shrink import shrink_checkpoint
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.loop import TrainConfig, train

train_module = importlib.import_module("mesimp.training.loop")


def hand_accuracy(ckpt: dict, npz: Path) -> float:
    """Test accuracy of a checkpoint's weights in a hand-written nn.Sequential."""
    net = hand_mlp(ckpt["arch"]["hidden_sizes"])
    net.load_state_dict(ckpt["state_dict"])
    z = np.load(npz)
    x = torch.from_numpy(z["x_test"].reshape(N_TEST, -1).astype(np.float32) / 255.0)
    with torch.no_grad():
        pred = net(x).argmax(1)
    return float((pred == torch.from_numpy(z["y_test"].astype(np.int64))).double().mean())


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------
def test_training_writes_checkpoint_and_metrics(tmp_path, tiny_npz):
    out = tmp_path / "runs" / "m.pt"
    r = train_tiny(tiny_npz, out, k=0, epochs=2, evals_per_epoch=2)
    assert r["checkpoint"] == str(out) and out.is_file()
    log = tmp_path / "runs" / "m.metrics.jsonl"
    assert r["metrics_log"] == str(log) and log.is_file()
    assert files_in(tmp_path) == {"runs", "runs/m.pt", "runs/m.metrics.jsonl"}  # no temp files

    records = read_jsonl(log)
    evals = [rec for rec in records if rec["event"] == "eval"]
    assert len(evals) == 4  # 2 per epoch x 2 epochs
    assert [e["step"] for e in evals] == [5, 10, 15, 20]  # 500 examples / 50 = 10 steps
    for e in evals:
        for key in ("dev_accuracy", "test_accuracy", "train_loss", "widths", "epoch"):
            assert key in e
        assert 0.0 <= e["dev_accuracy"] <= 1.0 and 0.0 <= e["test_accuracy"] <= 1.0
        assert e["widths"] == [32, 32]
        # accuracies are multiples of 1/DEV and 1/N_TEST: they were measured on those splits
        assert round(e["dev_accuracy"] * DEV, 6).is_integer()
        assert round(e["test_accuracy"] * N_TEST, 6).is_integer()

    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "mesimp.checkpoint"
    assert ckpt["arch"]["hidden_sizes"] == [32, 32]
    assert ckpt["train"]["seed"] == 1
    assert ckpt["train"]["data"]["train"] == 500 and ckpt["train"]["data"]["dev"] == DEV
    best = max(evals, key=lambda e: e["dev_accuracy"])  # first maximum wins
    assert r["best"]["dev_accuracy"] == best["dev_accuracy"]
    assert ckpt["train"]["metrics"]["test_accuracy"] == best["test_accuracy"]
    assert r["final"]["test_accuracy"] == evals[-1]["test_accuracy"]
    # the checkpoint's weights, in a hand-written model, reproduce the logged accuracy
    assert hand_accuracy(ckpt, tiny_npz) == pytest.approx(best["test_accuracy"])
    assert r["params"] == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert r["macs"] == 784 * 32 + 32 * 32 + 32 * 10


def test_training_learns_something(tmp_path, tiny_npz):
    r = train_tiny(tiny_npz, tmp_path / "m.pt", k=8, epochs=3, lr=3e-3)
    evals = [e for e in read_jsonl(r["metrics_log"]) if e["event"] == "eval"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert r["best"]["test_accuracy"] > 0.3  # 10 classes: chance is 0.1


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------
def run_and_read(tiny_npz: Path, out: Path, **kw):
    r = train_tiny(tiny_npz, out, epochs=2, **kw)
    ckpt = torch.load(out, weights_only=True)
    records = read_jsonl(r["metrics_log"])
    for rec in records:
        rec.pop("elapsed_s", None)
    return ckpt, records


@pytest.mark.parametrize(
    "kw",
    [
        {"k": 0},
        {"k": 8, "selection": "topk"},
        {"k": 8, "selection": "random"},
        {"k": 8, "selection": "unified", "simplify": SimplifyConfig(prune_rate=0.1)},
    ],
    ids=["dense", "topk", "random", "unified-mesimp"],
)
def test_same_seed_is_bit_identical_and_other_seeds_differ(tmp_path, tiny_npz, kw):
    a, rec_a = run_and_read(tiny_npz, tmp_path / "a.pt", **kw)
    b, rec_b = run_and_read(tiny_npz, tmp_path / "b.pt", **kw)
    c, rec_c = run_and_read(tiny_npz, tmp_path / "c.pt", seed=2, **kw)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert rec_a == rec_b
    for name, st in a["meprop"]["layers"].items():
        for field in ("hits", "ref", "mask"):
            assert torch.equal(st[field], b["meprop"]["layers"][name][field])
    assert any(not torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])
    assert rec_a != rec_c


def test_random_selection_depends_on_the_seed_not_only_the_init(tmp_path, tiny_npz):
    """Same seed -> same init and order; random-k differs from top-k on that same run."""
    a, _ = run_and_read(tiny_npz, tmp_path / "a.pt", k=8, selection="topk")
    b, _ = run_and_read(tiny_npz, tmp_path / "b.pt", k=8, selection="random")
    assert not torch.equal(a["state_dict"]["0.weight"], b["state_dict"]["0.weight"])


# --------------------------------------------------------------------------------------
# fine-tuning from a shrunk checkpoint
# --------------------------------------------------------------------------------------
def test_init_from_shrunk_checkpoint_trains_at_the_new_widths(
    ckpts, tmp_path, tiny_npz, verify_npz
):
    small = tmp_path / "small.pt"
    rep = shrink_checkpoint(ckpts["mesimp"], small, data=str(verify_npz))
    widths = rep["after"]["hidden_sizes"]
    assert all(w < 32 for w in widths)
    init = torch.load(small, weights_only=True)

    out = tmp_path / "ft.pt"
    r = train_tiny(tiny_npz, out, k=4, init=str(small), hidden=500, layers=5)
    assert r["hidden_sizes"] == widths  # --hidden/--layers are ignored with --init
    assert r["active_widths"] == widths
    ft = torch.load(out, weights_only=True)
    assert ft["arch"]["hidden_sizes"] == widths
    for key, v in init["state_dict"].items():
        assert ft["state_dict"][key].shape == v.shape
    assert not torch.equal(ft["state_dict"]["0.weight"], init["state_dict"]["0.weight"])
    assert r["params"] == sum(v.numel() for v in init["state_dict"].values())
    evals = [e for e in read_jsonl(r["metrics_log"]) if e["event"] == "eval"]
    assert all(e["widths"] == widths for e in evals)
    # meProp counters now count the new, narrower layers
    for name, width in zip(("0", "2"), widths, strict=True):
        assert ft["meprop"]["layers"][name]["hits"].shape == (width,)


def test_init_from_masked_checkpoint_keeps_the_masks(ckpts, tmp_path, tiny_npz):
    src = torch.load(ckpts["mesimp"], weights_only=True)
    masks = {n: st["mask"] for n, st in src["meprop"]["layers"].items()}
    out = tmp_path / "ft.pt"
    r = train_tiny(tiny_npz, out, k=8, init=str(ckpts["mesimp"]))
    assert r["active_widths"] == [int(masks["0"].sum()), int(masks["2"].sum())]
    ft = torch.load(out, weights_only=True)
    for name, mask in masks.items():
        assert torch.equal(ft["meprop"]["layers"][name]["mask"], mask)
        # dead rows were never selected, so the lazy optimizer never moved them
        w_old, w_new = src["state_dict"][f"{name}.weight"], ft["state_dict"][f"{name}.weight"]
        assert torch.equal(w_new[~mask], w_old[~mask])


def test_init_with_mismatched_data_is_refused(ckpts, tmp_path, fmnist_small):
    p = tmp_path / "small_images.npz"
    np.savez(
        p,
        x_train=fmnist_small["x_train"][:, :14, :14],
        y_train=fmnist_small["y_train"],
        x_test=fmnist_small["x_test"][:, :14, :14],
        y_test=fmnist_small["y_test"],
    )
    with pytest.raises(BadInputError, match="init"):
        train_tiny(p, tmp_path / "out" / "m.pt", init=str(ckpts["dense"]))
    assert not (tmp_path / "out" / "m.pt").exists()


# --------------------------------------------------------------------------------------
# bad input: refused before training, nothing left behind
# --------------------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if training would start (the data would be loaded)."""

    def boom(*_a, **_k):
        raise AssertionError("bad input must be refused before loading data / training")

    monkeypatch.setattr(train_module, "load_task", boom)


@pytest.mark.parametrize(
    "kw",
    [
        {"hidden": 0},
        {"hidden": -5},
        {"k": -1},
        {"k": 1.5},
        {"k": -0.5},
        {"selection": "best"},
        {"epochs": 0},
        {"batch_size": 0},
        {"layers": -1},
        {"msbp": 1.5},
    ],
)
def test_bad_config_refused_before_training(tmp_path, tiny_npz, kw, no_training):
    with pytest.raises(BadInputError):
        train_tiny(tiny_npz, tmp_path / "m.pt", **kw)
    assert files_in(tmp_path) == set()


def test_output_is_a_directory(tmp_path, tiny_npz, no_training):
    (tmp_path / "d").mkdir()
    with pytest.raises(BadInputError, match="directory"):
        train_tiny(tiny_npz, tmp_path / "d")
    assert files_in(tmp_path) == {"d"}


def test_output_nested_under_a_file(tmp_path, tiny_npz, no_training):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(BadInputError):
        train_tiny(tiny_npz, tmp_path / "f.txt" / "sub" / "m.pt")
    assert files_in(tmp_path) == {"f.txt"}


def test_output_directly_under_a_file(tmp_path, tiny_npz, no_training):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(BadInputError):
        train_tiny(tiny_npz, tmp_path / "f.txt" / "m.pt")
    assert files_in(tmp_path) == {"f.txt"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_output_in_a_read_only_directory(tmp_path, tiny_npz, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(BadInputError, match="not writable"):
            train_tiny(tiny_npz, ro / "m.pt")
        assert files_in(ro) == set()
    finally:
        ro.chmod(0o700)


def test_missing_data_is_refused_without_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_tiny(tmp_path / "nope.npz", tmp_path / "m.pt")
    assert files_in(tmp_path) == set()


def test_dev_size_too_large_is_refused(tmp_path, tiny_npz):
    with pytest.raises(DataError, match="dev_size"):
        train_tiny(tiny_npz, tmp_path / "m.pt", dev_size=600)
    assert files_in(tmp_path) == set()


def test_train_config_round_trips_into_the_checkpoint(tmp_path, tiny_npz):
    cfg = TrainConfig(
        data=str(tiny_npz),
        hidden=16,
        layers=1,
        k=0.25,
        epochs=1,
        dev_size=DEV,
        output=str(tmp_path / "m.pt"),
        simplify=SimplifyConfig(prune_rate=0.05),
    )
    r = train(cfg, progress=False, log=lambda _m: None)
    saved = torch.load(r["checkpoint"], weights_only=True)["train"]["config"]
    assert saved["k"] == 0.25 and saved["hidden"] == 16 and saved["layers"] == 1
    assert saved["simplify"]["prune_rate"] == 0.05
    json.dumps(r)  # the summary is plain JSON
