"""``--model cnn``: the built-in CNN through train -> shrink -> export -> bench -> info,
on the tiny real Fashion-MNIST file. The shrunk model is checked against the masked
checkpoint here (PyTorch, float64), not against the library's own report."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import torch
from helpers import files_in, run_main

from mesimp.files.checkpoint import load_checkpoint, model_from_checkpoint
from mesimp.models import CNN


def _json(capsys, *args):
    code, out, err = run_main(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_cnn_pipeline(capsys, tiny_npz, tmp_path):
    ckpt = tmp_path / "cnn.pt"
    r = _json(
        capsys, "train", "--model", "cnn", "--data", tiny_npz, "--dev-size", "100",
        "--hidden", "8,12", "--k", "3", "--simplify", "--prune-rate", "0.2",
        "--epochs", "2", "--no-compact", "-o", ckpt,
    )  # fmt: skip
    # masked (--no-compact): the checkpoint keeps full width, shrink removes the channels
    assert r["model"] == "cnn" and r["hidden_sizes"] == [8, 12]
    assert all(a <= h for a, h in zip(r["active_widths"], r["hidden_sizes"], strict=True))
    assert r["active_widths"] != [8, 12]  # meSimp masked some channels

    rep = _json(capsys, "shrink", ckpt, "--data", tiny_npz)
    small = load_checkpoint(rep["path"])
    assert small["arch"]["channels"] == r["active_widths"] == rep["after"]["hidden_sizes"]
    # masked == shrunk, checked here on the tiny test images in float64
    x = torch.from_numpy(np.load(tiny_npz)["x_test"].reshape(-1, 784).astype(np.float32) / 255)
    masked = model_from_checkpoint(load_checkpoint(ckpt)).double().eval()
    plain = model_from_checkpoint(small).double().eval()
    assert type(plain) is CNN
    with torch.no_grad():
        torch.testing.assert_close(plain(x.double()), masked(x.double()), rtol=0, atol=1e-9)
    assert rep["after"]["macs"] < rep["before"]["macs"]

    # a masked CNN is not exported (its masks act after BatchNorm): shrink first
    code, out, err = run_main(capsys, "export", ckpt, "--onnx", "-o", tmp_path / "m.onnx")
    assert code == 2 and "shrink it first" in err and len(err.strip().splitlines()) == 1
    ex = _json(capsys, "export", rep["path"], "--onnx", "--data", tiny_npz)
    sess = ort.InferenceSession(ex["path"], providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = copy.deepcopy(plain).float()(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)
    info = _json(capsys, "info", ex["path"])
    assert info["macs"] == rep["after"]["macs"]  # conv MACs counted from the ONNX graph
    b = _json(capsys, "bench", ex["path"], "--batch-sizes", "1", "--threads", "1",
              "--repeat", "2", "--data", tiny_npz)  # fmt: skip
    assert b["results"][0]["accuracy"] == ex["fp32_accuracy"]
    assert "cnn.small.onnx" in files_in(tmp_path)
