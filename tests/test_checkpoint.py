"""Checkpoint tests: the file format (read back with plain ``torch.load``), validation of
foreign or newer files, and atomic writes that survive a crashing writer."""

from __future__ import annotations

import os
import pickle
import random
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from mesimp._version import __version__
from mesimp.errors import CheckpointError
from mesimp.files.atomic import atomic_write, atomic_write_text
from mesimp.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.models import MLPConfig, build_model
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_


def trained_meprop_model():
    torch.manual_seed(0)
    model = build_model(MLPConfig(in_features=12, hidden_sizes=[9, 7], out_features=4))
    cfg = MePropConfig(k=3, selection="unified")
    meprop_(model, cfg)
    model[0].apply_mask(torch.tensor([True, False] * 4 + [True]))
    x = torch.randn(10, 12)
    model(x).sum().backward()
    return model, cfg


def valid_ckpt() -> dict:
    model, cfg = trained_meprop_model()
    return make_checkpoint(model, model.config.to_dict(), cfg, train={"seed": 3, "epoch": 1.5})


def test_round_trip_with_plain_torch_load(tmp_path):
    model, cfg = trained_meprop_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_checkpoint(model, model.config.to_dict(), cfg, {"seed": 3}))
    assert os.listdir(tmp_path) == ["m.pt"]

    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert raw["format"] == "mesimp.checkpoint"
    assert raw["version"] == 1
    assert raw["mesimp_version"] == __version__
    assert raw["arch"] == {
        "in_features": 12,
        "hidden_sizes": [9, 7],
        "out_features": 4,
        "dropout": 0.0,
        "model": "mlp",
    }
    # state_dict has exactly nn.Linear's keys: counters and masks live under "meprop"
    assert sorted(raw["state_dict"]) == sorted(
        f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    )
    for key, v in model.state_dict().items():
        assert torch.equal(raw["state_dict"][key], v)
    assert raw["meprop"]["config"] == {
        "k": 3,
        "selection": "unified",
        "msbp_alpha": 0.0,
        "sparse_grad": False,  # the default: dense gradients
        "dense_bias": False,  # the reference mode sets it
        "heap_select": False,  # and this (the C# TopNHeap's per-example top-k)
        "count_zero_fills": True,
    }
    layers = raw["meprop"]["layers"]
    assert set(layers) == {"0", "2"}
    assert layers["0"]["mask"].tolist() == [True, False] * 4 + [True]
    assert int(layers["0"]["ref"]) == 10 and int(layers["2"]["ref"]) == 10
    assert int(layers["0"]["hits"].sum()) == 10 * 3
    assert raw["train"] == {"seed": 3}

    # and back into a model that computes the same function, masks and counters restored
    loaded = model_from_checkpoint(load_checkpoint(path))
    assert isinstance(loaded[0], MePropLinear) and not isinstance(loaded[4], MePropLinear)
    assert loaded[0].active_width == 5
    assert torch.equal(loaded[0].hits, model[0].hits)
    model.eval()
    loaded.eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_plain_model_ignores_masks(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, valid_ckpt())
    plain = model_from_checkpoint(load_checkpoint(path), meprop=False)
    assert not any(isinstance(m, MePropLinear) for m in plain.modules())


def test_dense_model_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model(MLPConfig(in_features=5, hidden_sizes=[4], out_features=2))
    path = tmp_path / "d.pt"
    save_checkpoint(path, make_checkpoint(model, model.config.to_dict()))
    raw = torch.load(path, weights_only=True)
    assert raw["meprop"] == {"config": None, "layers": {}}
    back = model_from_checkpoint(load_checkpoint(path))
    assert not any(isinstance(m, MePropLinear) for m in back.modules())
    for key, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], v)


def test_newer_version_is_refused_naming_both_versions(tmp_path):
    ckpt = valid_ckpt()
    ckpt["version"] = 7
    path = tmp_path / "new.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "7" in msg and "1" in msg and "newer" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("version", [0, "1", None, 1.0])
def test_invalid_version_is_refused(tmp_path, version):
    ckpt = valid_ckpt()
    ckpt["version"] = version
    path = tmp_path / "v.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "obj",
    [
        {"state_dict": {}, "arch": {}},  # a dict, no format field
        {"format": "other.checkpoint", "version": 1},
        {"model": torch.randn(2, 2)},
        [1, 2, 3],
        torch.randn(3),
    ],
    ids=["no-format", "other-format", "tensor-dict", "list", "tensor"],
)
def test_non_mesimp_objects_are_refused(tmp_path, obj):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a mesimp checkpoint"):
        load_checkpoint(path)


def test_plain_state_dict_is_refused(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("field", ["arch", "state_dict"])
def test_missing_fields_are_refused(tmp_path, field):
    ckpt = valid_ckpt()
    del ckpt[field]
    path = tmp_path / "x.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(path)


def test_weights_not_matching_arch_are_refused(tmp_path):
    ckpt = valid_ckpt()
    ckpt["arch"]["hidden_sizes"] = [9, 8]
    path = tmp_path / "x.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="arch"):
        model_from_checkpoint(load_checkpoint(path))


def test_unknown_model_type_is_refused(tmp_path):
    ckpt = valid_ckpt()
    ckpt["arch"]["model"] = "transformer"
    path = tmp_path / "x.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="transformer"):
        model_from_checkpoint(load_checkpoint(path))


class _Evil:
    """Unpickling this creates ``marker``: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["garbage", "empty", "text", "pickle", "truncated", "module"])
def test_garbage_files_are_refused(tmp_path, kind):
    path = tmp_path / "g.pt"
    if kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same bytes each run
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("format: mesimp.checkpoint\n")
    elif kind == "pickle":  # code would run on a non-weights_only load
        path.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2))
    elif kind == "truncated":
        save_checkpoint(path, valid_ckpt())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # a whole pickled module: needs arbitrary classes
        torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_directory_paths_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def test_crashing_writer_leaves_old_file_intact_and_no_temp_files(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, valid_ckpt())
    old = path.read_bytes()

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(old[:100])  # partial data ...
        raise Crash("power cut")  # ... and then the crash

    with pytest.raises(Crash):
        atomic_write(path, writer)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.pt"]
    load_checkpoint(path)  # still a valid checkpoint


def test_crash_inside_torch_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, valid_ckpt())
    old = path.read_bytes()
    real_save = torch.save

    def bad_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # leave a truncated file behind, then die
            fh.truncate(50)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", bad_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, valid_ckpt())
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.pt"]


def test_crash_before_first_write_leaves_nothing(tmp_path):
    def writer(tmp: Path) -> None:
        tmp.write_text("half")
        raise Crash

    with pytest.raises(Crash):
        atomic_write(tmp_path / "new.txt", writer)
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_atomic_write_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """On Linux the umask comes from /proc/self/status: writing a file never sets it, so
    another thread creating a file meanwhile keeps the process's own mask."""
    old = os.umask(0o027)
    try:

        def no_set(mask: int) -> int:
            raise AssertionError("the umask was set")

        monkeypatch.setattr(os, "umask", no_set)
        new = atomic_write_text(tmp_path / "new.json", "{}")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640


def test_atomic_write_uses_the_mode_open_would(tmp_path):
    """A new file gets 0o666 less the umask, as ``open(path, "w")`` would (mkstemp's
    0o600 must not leak out); a replaced file keeps its own mode."""
    old = os.umask(0o027)
    try:
        new = atomic_write_text(tmp_path / "new.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    kept = tmp_path / "kept.json"
    kept.write_text("one")
    kept.chmod(0o604)
    atomic_write_text(kept, "two")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() == "two"
