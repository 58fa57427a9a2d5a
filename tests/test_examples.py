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


EWT = ROOT.parent / "shared" / "data" / "ud-english-ewt"


def _hf_example(script: str, tmp_path, *extra: str) -> str:
    pytest.importorskip("accelerate")  # the Trainer's dependency: transformers is an extra
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)]
        + [*extra, "--data", str(EWT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(not EWT.is_dir(), reason=f"{EWT} not found")
def test_hf_tagger_quick(tmp_path):
    """Trains in the Trainer with meSimp, shrinks, fine-tunes, saves, reloads
    bit-identically and exports with parity (the example checks the reload itself)."""
    out = _hf_example("hf_tagger.py", tmp_path)
    assert "epoch 2: dev loss" in out and "'ffn':" in out  # widths in the Trainer's logs
    line = next(ln for ln in out.splitlines() if ln.startswith("shrunk:"))
    masked, shrunk = (v.split()[0] for v in line.split("accuracy ")[1].split(" = "))
    assert masked == shrunk  # the shrunk model tags exactly like the masked one
    before, after = (
        int(v.replace(",", "")) for v in line.split("params ")[1].split(", MACs")[0].split(" -> ")
    )
    assert after < before
    assert "bit-identical" in out and "onnxruntime matches PyTorch" in out
    assert {p.name for p in tmp_path.iterdir()} == {"tagger.small.pt", "tagger.small.onnx"}


@pytest.mark.skipif(not EWT.is_dir(), reason=f"{EWT} not found")
@pytest.mark.parametrize(
    "extra",
    [
        ("--no-simplify",),
        (),  # meSimp on its heads (GQA), gated FFN units and hidden size
    ],
)
def test_hf_causal_lm_quick(tmp_path, extra):
    out = _hf_example("hf_causal_lm.py", tmp_path, *extra)
    assert "epoch 2: dev loss" in out and "fine-tuned: test perplexity" in out
    assert "bit-identical" in out and "onnxruntime matches PyTorch" in out
    assert {p.name for p in tmp_path.iterdir()} == {"lm.small.pt", "lm.small.onnx"}
