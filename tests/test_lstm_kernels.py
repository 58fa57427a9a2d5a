"""The compiled unified BPTT (``torch.ops.mesimp.lstm_backward``) against the Python loop.

``_MePropLSTMFunction.backward`` dispatches unified selection on float32 CPU tensors to
the op when the kernels are on; the Python loop (``kernels.set_kernels("python")``) is
the reference. Every comparison runs the same layer (a copy per path) on the same inputs
and upstream gradients, over several backwards in a row so the MSBP memory and the
counters carry over.

Tolerances: the selections must be identical (hit counters compared exactly, every
backward); gradients and MSBP memories agree to float32 rounding, ``rtol=RTOL`` and an
absolute tolerance of ``ATOL_REL`` times the tensor's largest magnitude (the op computes
``[dh | dx]`` in one GEMM and its GEMMs block differently from the Python path's, so the
last bits differ and the difference grows a little over the time steps; never exact
floats, which would depend on the CPU's instruction set). Against float64 (the Python
path in float64 replaying the float32 run's selections) the same tolerances hold.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import mesimp.nn.lstm as mlstm
from mesimp.nn import kernels
from mesimp.nn.lstm import MePropLSTM
from mesimp.nn.meprop import MePropConfig

pytestmark = pytest.mark.skipif(
    not mlstm.lstm_op_built(), reason="mesimp._C with lstm_backward is not built"
)

RTOL = 1e-5
ATOL_REL = 1e-6
NAMES = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
# (T, B, h, k): T = 1, a batch of one, k < h/4 (the selection's block bound), tagger size
CASES = [(1, 4, 16, 3), (5, 4, 16, 3), (7, 1, 24, 5), (6, 8, 100, 20), (25, 32, 500, 20)]
# batch shapes of consecutive backwards: T and B grow and shrink (MSBP overlap rules)
SHAPES = [(5, 4), (7, 3), (3, 6), (7, 6), (1, 2)]


@pytest.fixture(autouse=True)
def _restore_mode():
    before = kernels.mode()
    yield
    kernels.set_kernels(before)


def _layer(n_in: int, h: int, k: int, alpha: float = 0.0, mask: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    layer = MePropLSTM(n_in, h, config=MePropConfig(k=k, selection="unified", msbp_alpha=alpha))
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3.0)  # larger weights: saturated gates, a wider range of gradients
    if mask:
        layer.apply_mask(torch.arange(h) % 5 != 1)
    return layer


def _batches(shapes, n_in: int, h: int, batch_first: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for steps, b in shapes:
        xs = (b, steps, n_in) if batch_first else (steps, b, n_in)
        os_ = (b, steps, h) if batch_first else (steps, b, h)
        out.append(
            {
                "x": torch.randn(xs, generator=g),
                "h0": torch.randn(1, b, h, generator=g),
                "c0": torch.randn(1, b, h, generator=g),
                "g_out": torch.randn(os_, generator=g),
                "g_h": torch.randn(1, b, h, generator=g),
                "g_c": torch.randn(1, b, h, generator=g),
            }
        )
    return out


def _run(mode: str, layer: MePropLSTM, batches, dtype=torch.float32, need=None):
    """Forward and backward of every batch under ``mode``; per batch the gradients (x, h0,
    c0, the four parameters), the counters and the MSBP memory."""
    kernels.set_kernels(mode)
    layer = layer.to(dtype)
    need = need or {}
    results = []
    for bt in batches:
        layer.zero_grad(set_to_none=True)
        leaves = {
            n: bt[n].to(dtype, copy=True).requires_grad_(need.get(n, True))
            for n in ("x", "h0", "c0")
        }
        out, (h_n, c_n) = layer(leaves["x"], (leaves["h0"], leaves["c0"]))
        loss = (out * bt["g_out"].to(dtype)).sum()
        loss = loss + (h_n * bt["g_h"].to(dtype)).sum() + (c_n * bt["g_c"].to(dtype)).sum()
        loss.backward()
        mem = layer._state.memory
        results.append(
            {
                **{n: leaves[n].grad for n in ("x", "h0", "c0")},
                **{n: getattr(layer, n).grad for n in NAMES},
                "hits": layer.hits.clone(),
                "ref": layer.ref.clone(),
                "memory": None if mem is None else mem.clone(),
            }
        )
    return results


def _close(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None:
        return
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(
        a.double(), b.double(), rtol=RTOL, atol=ATOL_REL * max(scale, 1e-30), msg=what
    )


def _compare(got, want, exact_counters: bool = True) -> None:
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        if exact_counters:
            assert torch.equal(g["hits"], w["hits"]), f"batch {n}: selections differ"
            assert torch.equal(g["ref"], w["ref"]), f"batch {n}"
        for key in ("x", "h0", "c0", *NAMES, "memory"):
            _close(g[key], w[key], f"batch {n}: {key}")


class _Spy:
    """Counts the calls of ``mlstm._compiled_backward`` (the compiled path was taken)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = mlstm._compiled_backward

        def spy(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(mlstm, "_compiled_backward", spy)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-B{}-h{}-k{}".format(*c))
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_matches_python(case, masked, monkeypatch):
    steps, b, h, k = case
    n_in = 7
    layer = _layer(n_in, h, k, mask=masked)
    batches = _batches([(steps, b), (steps, b)], n_in, h, batch_first=True)
    spy = _Spy(monkeypatch)
    got = _run("cpp", copy.deepcopy(layer), batches)
    assert spy.calls == 2
    want = _run("python", copy.deepcopy(layer), batches)
    assert spy.calls == 2
    _compare(got, want)
    if masked:  # masked units: never selected, no gradient into their rows
        off = ~layer.mask
        assert int(got[-1]["hits"][off].sum()) == 0
        rows = off.repeat(4)
        assert float(got[-1]["weight_hh_l0"][rows].abs().sum()) == 0.0
        assert float(got[-1]["h0"][..., off].abs().sum()) == 0.0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_compiled_msbp_memory_over_changing_shapes(masked, batch_first, monkeypatch):
    """MSBP over five backwards whose T and B grow and shrink: the memory is added on the
    (step, row) overlap, and the new memory, gradients and counters match every time."""
    n_in, h, k = 6, 40, 6
    layer = _layer(n_in, h, k, alpha=0.7, mask=masked, seed=3)
    layer.batch_first = batch_first
    batches = _batches(SHAPES, n_in, h, batch_first, seed=4)
    spy = _Spy(monkeypatch)
    got = _run("cpp", copy.deepcopy(layer), batches)
    assert spy.calls == len(SHAPES)
    want = _run("python", copy.deepcopy(layer), batches)
    _compare(got, want)
    for r, (steps, b) in zip(got, SHAPES, strict=True):
        assert r["memory"].shape == (steps, b, 4 * h)
        per_unit = r["memory"].view(steps, b, 4, h).abs().sum(2)
        assert torch.all((per_unit == 0).sum(-1) >= k)  # the selected units hold nothing
        if masked:
            assert float(per_unit[..., ~layer.mask].sum()) == 0.0


@pytest.mark.parametrize("frozen", ["x", "h0c0", "weight_ih_l0", "biases", "weight_hh_l0"])
def test_compiled_partial_requires_grad(frozen):
    """Only the needed gradients are computed, and those match."""
    n_in, h, k = 5, 32, 4
    layer = _layer(n_in, h, k, alpha=0.5)
    need = {}
    if frozen == "x":
        need["x"] = False
    elif frozen == "h0c0":
        need["h0"] = need["c0"] = False
    else:
        for n in ("bias_ih_l0", "bias_hh_l0") if frozen == "biases" else (frozen,):
            getattr(layer, n).requires_grad_(False)
    batches = _batches([(4, 3), (6, 5)], n_in, h, batch_first=True, seed=5)
    got = _run("cpp", copy.deepcopy(layer), batches, need=need)
    want = _run("python", copy.deepcopy(layer), batches, need=need)
    _compare(got, want)


def test_compiled_matches_float64_on_the_same_selection(monkeypatch):
    """Against the Python path in float64, replaying the float32 run's selections (so the
    comparison measures float32 rounding, not a near-tie chosen differently)."""
    n_in, h, k = 9, 120, 12
    layer = _layer(n_in, h, k, alpha=0.5, mask=True, seed=6)
    batches = _batches([(9, 7), (12, 5), (6, 7)], n_in, h, batch_first=True, seed=7)
    got = _run("cpp", copy.deepcopy(layer), batches)

    recorded: list[torch.Tensor] = []
    real_select = mlstm.select

    def record(u, kk, selection, mask):
        idx = real_select(u, kk, selection, mask)
        recorded.append(idx.clone())
        return idx

    monkeypatch.setattr(mlstm, "select", record)
    want32 = _run("python", copy.deepcopy(layer), batches)
    replay = iter(recorded)
    monkeypatch.setattr(mlstm, "select", lambda *a: next(replay))
    want64 = _run("python", copy.deepcopy(layer), batches, dtype=torch.float64)
    assert next(replay, None) is None  # every recorded selection was used
    _compare(got, want32)
    _compare(got, want64)


def test_k_at_least_active_width_stays_on_the_dense_python_path(monkeypatch):
    """With a mask and k >= the active width every active unit is selected: the manual
    dense BPTT (Python, batched GEMMs), on both modes alike."""
    n_in, h = 5, 20
    layer = _layer(n_in, h, k=h, alpha=0.5, mask=True)
    batches = _batches([(4, 3), (5, 2)], n_in, h, batch_first=True)
    spy = _Spy(monkeypatch)
    got = _run("cpp", copy.deepcopy(layer), batches)
    assert spy.calls == 0
    want = _run("python", copy.deepcopy(layer), batches)
    _compare(got, want)


@pytest.mark.parametrize("selection", ["topk", "random"])
def test_other_selections_and_dtypes_keep_the_python_path(selection, monkeypatch):
    spy = _Spy(monkeypatch)
    kernels.set_kernels("cpp")
    layer = MePropLSTM(4, 12, config=MePropConfig(k=3, selection=selection))
    layer(torch.randn(2, 3, 4, requires_grad=True))[0].sum().backward()
    uni = MePropLSTM(4, 12, config=MePropConfig(k=3, selection="unified"), dtype=torch.float64)
    uni(torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True))[0].sum().backward()
    assert spy.calls == 0


def test_a_build_without_the_op_falls_back_to_python(monkeypatch):
    """An older mesimp._C (only the MLP kernels) leaves the LSTM on the Python path."""
    kernels.set_kernels("cpp")
    monkeypatch.setattr(torch.ops, "mesimp", types.SimpleNamespace())
    layer = _layer(5, 16, 3)
    batches = _batches([(4, 3)], 5, 16, batch_first=True)
    got = _run("cpp", copy.deepcopy(layer), batches)
    want = _run("python", copy.deepcopy(layer), batches)
    monkeypatch.undo()
    _compare(got, want)


@pytest.mark.parametrize(("selection", "want"), [("unified", "compiled"), ("topk", "python")])
def test_train_json_reports_the_compiled_lstm_path(tiny_npz, tmp_path, selection, want):
    """``train --json``'s step_path: "compiled" for a unified LSTM (its backward runs the
    op behind loss.backward()), "python" for a per-example one."""
    from conftest import train_tiny

    kernels.set_kernels("cpp")
    s = train_tiny(
        tiny_npz, tmp_path / "m.pt", model="lstm-rows", hidden=8, layers=1, k=3,
        selection=selection,
    )  # fmt: skip
    assert (s["kernel"], s["step_path"]) == ("cpp", want)
