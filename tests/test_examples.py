"""The examples run as a user runs them (a subprocess, ``--quick``) and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FMNIST

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not found")
@pytest.mark.parametrize(
    "script, files",
    [
        ("cnn_fashion_mnist.py", {"cnn.onnx", "cnn.small.onnx", "cnn.small.pt"}),
        ("transformer_classifier.py", {"transformer.small.onnx"}),
    ],
)
def test_example_runs_quick(script, files, tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 2: test accuracy" in r.stdout
    shrunk = next(ln for ln in r.stdout.splitlines() if ln.startswith("shrunk:"))
    before, after = (int(v.replace(",", "")) for v in shrunk.split("params ")[1].split(" -> "))
    assert after < before  # meSimp removed units and shrink made the model smaller
    assert {p.name for p in tmp_path.iterdir()} == files
