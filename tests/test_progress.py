"""Progress output: live bars for a terminal, plain lines for a log (``mesimp.progress``).

pytest's captured stderr is not a terminal, which is exactly the ``make demo > log 2>&1``
case; a terminal is simulated by an ``isatty()`` that says yes.
"""

from __future__ import annotations

import io
import sys

import pytest
from helpers import run_main

from mesimp import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_mode_follows_stderr(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.live(None) and progress.plain_lines(None)
    assert progress.live(True) and not progress.plain_lines(True)  # --progress wins
    assert not progress.live(False) and not progress.plain_lines(False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.live(None) and not progress.plain_lines(None)
    assert not progress.live(False)  # --no-progress wins


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal])
def test_bar_draws_only_when_live(stream, monkeypatch):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress.bar(range(50), progress=None, desc="x", mininterval=0):
        pass
    assert ("\r" in err.getvalue()) is (stream is _Terminal)


def _train(capsys, tiny_npz, tmp_path, *flags):
    args = ["train", "--data", tiny_npz, "--hidden", "16", "--dev-size", "100"]
    code, out, err = run_main(capsys, *args, "--epochs", "2", "-o", tmp_path / "m.pt", *flags)
    assert code == 0, err
    return err


def test_train_log_has_plain_epoch_lines_and_no_carriage_returns(capsys, tiny_npz, tmp_path):
    err = _train(capsys, tiny_npz, tmp_path)
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]


def test_train_progress_flag_forces_the_bar(capsys, tiny_npz, tmp_path):
    assert "\r" in _train(capsys, tiny_npz, tmp_path, "--progress")
    err = _train(capsys, tiny_npz, tmp_path, "--no-progress")
    assert "\r" not in err and "epoch 2/2" in err  # the epoch summary is a log line


def test_bench_log_has_one_line_per_configuration(capsys, ckpts, tmp_path):
    from mesimp.deploy.export import export_onnx

    onnx_path = export_onnx(ckpts["dense"], tmp_path / "d.onnx")["path"]
    args = ["bench", onnx_path, "--batch-sizes", "1,4", "--threads", "1", "--repeat", "2"]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert "\r" not in err
    done = [ln for ln in err.splitlines() if ln.startswith("bench: ")]
    assert done == ["bench: batch 1, 1 thread done (1/2)", "bench: batch 4, 1 thread done (2/2)"]
    code, out, err = run_main(capsys, *args, "--no-progress")
    assert code == 0 and "bench:" not in err
