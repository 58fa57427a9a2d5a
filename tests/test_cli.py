"""CLI tests: click's CliRunner on the command group, the real entry point ``main(argv)``
in-process for the one-line error contract, and the installed ``mesimp`` script once.

Expected numbers (params, MACs, widths) are counted by hand from the raw checkpoint
files, never taken from mesimp's own helpers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mesimp.cli.commands  # noqa: F401  (registers the commands)
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import files_in, run_main
from mesimp.cli.main import cli

from mesimp._version import __version__


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def cost(sizes: list[int]) -> tuple[int, int]:
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    macs = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
    return params, macs


# --------------------------------------------------------------------------------------
# help and version
# --------------------------------------------------------------------------------------
def test_help_lists_every_command_with_a_one_line_purpose():
    r = invoke("--help")
    assert r.exit_code == 0
    text = r.stdout
    section = text.split("Commands:", 1)[1].splitlines()
    lines = {ln.split()[0]: ln.split(None, 1)[1:] for ln in section if ln.strip()}
    assert {"train", "info", "shrink"} <= set(cli.commands)
    for name in cli.commands:
        assert name in lines, f"{name} missing from --help"
        assert lines[name] and len(lines[name][0].strip()) > 10, f"{name} has no purpose line"
    for name in cli.commands:  # and each command's own help works
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and "Usage:" in sub.stdout


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0
    assert __version__ in r.stdout and "mesimp" in r.stdout


# --------------------------------------------------------------------------------------
# JSON outputs
# --------------------------------------------------------------------------------------
def test_train_json(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    r = invoke(
        "train",
        "--data",
        tiny_npz,
        "--dev-size",
        "100",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--k",
        "4",
        "--epochs",
        "1",
        "--no-progress",
        "--json",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["checkpoint"] == str(out) and out.is_file()
    assert Path(doc["metrics_log"]).is_file()
    assert doc["hidden_sizes"] == [16]
    assert (doc["params"], doc["macs"]) == cost([784, 16, 10])
    assert 0.0 <= doc["best"]["test_accuracy"] <= 1.0
    assert 0.0 <= doc["best"]["dev_accuracy"] <= 1.0
    assert doc["config"]["k"] == 4
    assert "epoch 1/1" in r.stderr  # logs go to stderr
    raw = torch.load(out, weights_only=True)
    assert raw["arch"]["hidden_sizes"] == [16]
    assert raw["train"]["metrics"]["test_accuracy"] == doc["best"]["test_accuracy"]


def test_train_text_output(tmp_path, tiny_npz):
    r = invoke(
        "train",
        "--data",
        tiny_npz,
        "--dev-size",
        "100",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--no-progress",
        "-o",
        tmp_path / "m.pt",
    )
    assert r.exit_code == 0, r.stderr
    assert "test accuracy" in r.stdout and "checkpoint:" in r.stdout


def test_info_json(ckpts):
    raw = torch.load(ckpts["mesimp"], weights_only=True)
    r = invoke("info", ckpts["mesimp"], "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hidden_sizes"] == [32, 32]
    assert (doc["params"], doc["macs"]) == cost([784, 32, 32, 10])
    assert doc["test_accuracy"] == raw["train"]["metrics"]["test_accuracy"]
    masks = [raw["meprop"]["layers"][n]["mask"] for n in ("0", "2")]
    assert doc["active_widths"] == [int(m.sum()) for m in masks]
    counters = {c["name"]: c for c in doc["counters"]}
    assert set(counters) == {"0", "2"}
    for name, st in raw["meprop"]["layers"].items():
        assert counters[name]["ref"] == int(st["ref"])
        assert counters[name]["active"] == int(st["mask"].sum())


def test_info_json_dense(ckpts):
    doc = json.loads(invoke("info", ckpts["dense"], "--json").stdout)
    assert doc["hidden_sizes"] == [32, 32] and doc["counters"] == []
    assert isinstance(doc["test_accuracy"], float)


def test_info_text(ckpts):
    r = invoke("info", ckpts["mesimp"])
    assert r.exit_code == 0 and "hidden_sizes [32, 32]" in r.stdout


def test_shrink_json(ckpts, tmp_path, verify_npz):
    raw = torch.load(ckpts["mesimp"], weights_only=True)
    widths = [int(raw["meprop"]["layers"][n]["mask"].sum()) for n in ("0", "2")]
    out = tmp_path / "small.pt"
    r = invoke("shrink", ckpts["mesimp"], "-o", out, "--data", verify_npz, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["before"]["hidden_sizes"] == [32, 32]
    assert doc["after"]["hidden_sizes"] == widths
    assert (doc["after"]["params"], doc["after"]["macs"]) == cost([784, *widths, 10])
    assert 0.0 <= doc["max_abs_diff"] <= 1e-5
    assert torch.load(out, weights_only=True)["arch"]["hidden_sizes"] == widths
    # info on the result agrees
    info = json.loads(invoke("info", out, "--json").stdout)
    assert info["hidden_sizes"] == widths and info["params"] == doc["after"]["params"]


def test_shrink_text(ckpts, tmp_path, verify_npz):
    r = invoke("shrink", ckpts["mesimp"], "-o", tmp_path / "s.pt", "--data", verify_npz)
    assert r.exit_code == 0, r.stderr
    assert "max_abs_diff" in r.stdout and "wrote" in r.stdout


# --------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, nothing written
# --------------------------------------------------------------------------------------
TRAIN = ["train", "--dev-size", "100", "--hidden", "8", "--epochs", "1", "--no-progress"]


def bad_cases(tmp: Path, tiny_npz: Path, ckpts: dict[str, Path]) -> dict[str, list]:
    (tmp / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    (tmp / "adir").mkdir()
    (tmp / "f.txt").write_text("x")
    out = ["-o", tmp / "out" / "m.pt"]
    return {
        "missing-data": [*TRAIN, "--data", tmp / "nope.npz", *out],
        "malformed-data": [*TRAIN, "--data", tmp / "bad.npz", *out],
        "k=-1": [*TRAIN, "--data", tiny_npz, "--k=-1", *out],
        "k=1.5": [*TRAIN, "--data", tiny_npz, "--k", "1.5", *out],
        "hidden-0": [*TRAIN, "--data", tiny_npz, "--hidden", "0", *out],
        "output-is-dir": [*TRAIN, "--data", tiny_npz, "-o", tmp / "adir"],
        "output-under-file-nested": [*TRAIN, "--data", tiny_npz, "-o", tmp / "f.txt/a/m.pt"],
        "train-prune-rate-1": [*TRAIN, "--data", tiny_npz, "--simplify", "--prune-rate", "1.0"]
        + out,
        "info-non-checkpoint": ["info", tmp / "notes.txt"],
        "info-missing": ["info", tmp / "nope.pt"],
        "shrink-non-checkpoint": ["shrink", tmp / "notes.txt", *out],
        "shrink-prune-rate-1": ["shrink", ckpts["meprop"], "--prune-rate", "1.0", *out],
        "shrink-dense-prune-rate": ["shrink", ckpts["dense"], "--prune-rate", "0.1", *out],
    }


CASES = [
    "missing-data",
    "malformed-data",
    "k=-1",
    "k=1.5",
    "hidden-0",
    "output-is-dir",
    "output-under-file-nested",
    "train-prune-rate-1",
    "info-non-checkpoint",
    "info-missing",
    "shrink-non-checkpoint",
    "shrink-prune-rate-1",
    "shrink-dense-prune-rate",
]


def files_and_dirs_besides_inputs(tmp: Path) -> set[str]:
    return files_in(tmp) - {"bad.npz", "notes.txt", "adir", "f.txt"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_npz, ckpts, capsys):
    args = bad_cases(tmp_path, tiny_npz, ckpts)[case]
    before = files_in(tmp_path)

    # the real entry point: one line "error: ...", exit 2, nothing on stdout
    code, out, err = run_main(capsys, *args)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert files_in(tmp_path) - before <= {"out"}, "nothing but (maybe) the output dir"
    assert not list(tmp_path.rglob("*.pt"))
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("*.tmp"))

    # the click group through CliRunner: same exit code
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stdout == ""


def test_output_directly_under_a_file_exits_2(tmp_path, tiny_npz, capsys):
    (tmp_path / "f.txt").write_text("x")
    args = [*TRAIN, "--data", tiny_npz, "-o", tmp_path / "f.txt" / "m.pt"]
    try:
        code, _out, err = run_main(capsys, *args)
    except NotADirectoryError:  # escapes main() as a traceback today
        code, err = 1, "Traceback"
    assert code == 2
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_a_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no")
    code, _out, err = run_main(capsys, "--debug", "info", tmp_path / "notes.txt")
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_installed_script_real_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "mesimp"
    if not exe.exists():
        found = shutil.which("mesimp")
        if found is None:
            pytest.skip("the mesimp console script is not installed")
        exe = Path(found)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    p = subprocess.run(
        [str(exe), "shrink", str(tmp_path / "notes.txt"), "--prune-rate", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert files_in(tmp_path) == {"notes.txt"}


def test_malformed_npz_variants_exit_2(tmp_path, capsys):
    """A valid .npz with the wrong arrays is bad input, not a crash."""
    p = tmp_path / "wrong.npz"
    np.savez(p, images=np.zeros((3, 4), dtype=np.uint8))
    code, _out, err = run_main(capsys, *TRAIN, "--data", p, "-o", tmp_path / "m.pt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "x_train" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], [500, 500]),
        (["--hidden", "16", "--layers", "3"], [16, 16, 16]),
        (["--hidden", "12,7"], [12, 7]),
    ],
)
def test_train_hidden_and_layers_compose(tmp_path, tiny_npz, monkeypatch, args, expected):
    """The default is the paper's 784-500-500-10; --hidden N[,N] and --layers combine."""
    import importlib

    train_module = importlib.import_module("mesimp.training.loop")
    seen = {}

    def fake_train(config, progress=True):
        seen["hidden_sizes"] = config.hidden_sizes()
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "train", fake_train)
    r = invoke("train", "--data", tiny_npz, "-o", tmp_path / "m.pt", *args)
    assert r.exit_code == 0, r.stderr
    assert seen["hidden_sizes"] == expected
