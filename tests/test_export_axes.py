"""``export_onnx(..., dynamic_axes=...)``: a token model exported with symbolic batch and
sequence axes runs in onnxruntime at other lengths, matching PyTorch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mesimp
from mesimp.errors import BadInputError


class TinyTagger(nn.Module):
    """Embedding -> a length-dependent mix (cumulative mean over the sequence) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * mask.unsqueeze(-1)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.out(h.cumsum(1) / steps)


def test_sequence_axis_is_symbolic_and_checked(tmp_path):
    torch.manual_seed(0)
    model = TinyTagger().eval()
    ids = torch.randint(1, 20, (2, 6))
    mask = torch.ones_like(ids)
    r = mesimp.export_onnx(
        model, (ids, mask), tmp_path / "t.onnx", dynamic_axes={0: "batch", 1: "sequence"}
    )
    assert r["inputs"][0]["shape"] == ["batch", "sequence"]
    assert r["n_check"] == 2 + 3 + 2  # the example, one more row, one token fewer
    sess = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    for b, t in [(1, 3), (4, 11)]:
        x = torch.randint(1, 20, (b, t))
        m = torch.ones_like(x)
        with torch.no_grad():
            want = model(x, m).numpy()
        got = sess.run(None, {"input_0": x.numpy(), "input_1": m.numpy()})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-5


def test_without_dynamic_axes_only_the_batch_is_symbolic(tmp_path):
    model = TinyTagger().eval()
    ids = torch.randint(1, 20, (2, 6))
    r = mesimp.export_onnx(model, (ids, torch.ones_like(ids)), tmp_path / "t.onnx")
    assert r["inputs"][0]["shape"] == ["batch", 6]


@pytest.mark.parametrize("axes", [{1: "sequence"}, {0: "batch", "1": "x"}, [0, 1]])
def test_bad_dynamic_axes_are_refused(tmp_path, axes):
    ids = torch.randint(1, 20, (2, 6))
    with pytest.raises(BadInputError, match="dynamic_axes"):
        mesimp.export_onnx(TinyTagger(), (ids, ids), tmp_path / "t.onnx", dynamic_axes=axes)
    assert not (tmp_path / "t.onnx").exists()
