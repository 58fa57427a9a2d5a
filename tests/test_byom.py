"""Bring your own model: meProp in a stock PyTorch loop, meSimp through ``Simplifier``,
``mesimp.shrink`` on arbitrary graphs, ``export_onnx`` and ``save_model``/``load_model``.

References are independent of the code under test: plain autograd (for gradients) and
the masked model itself, run in float64 before the shrink (for ``shrink``).
"""

from __future__ import annotations

import copy

import byom_models
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import files_in
from torch import nn

import mesimp
from mesimp import MePropConfig, Simplifier, SimplifyConfig, meprop_, shrink
from mesimp.errors import BadInputError, VerificationError
from mesimp.nn.conv import MePropConv2d
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.simplify.coupling import TracingError, analyze
from mesimp.simplify.masking import apply_keeps, group_keeps, sync

# --------------------------------------------------------------------------------------
# a real drop-in: dense gradients for stock PyTorch
# --------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )  # fmt: skip


def test_stock_adamw_clip_and_accumulation_run_on_a_meprop_model():
    """The issue's failing script: AdamW, clip_grad_norm_, allclose and accumulation."""
    net = meprop_(_mlp(), MePropConfig(k=4, selection="unified"))
    assert sum(isinstance(m, MePropLinear) for m in net) == 3
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):  # gradient accumulation over two halves
            (F.cross_entropy(net(x[half]), y[half]) / 2).backward()
        w = net[0].weight.grad
        assert w.layout == torch.strided and not w.is_sparse
        assert torch.allclose(w, w.clone())
        # accumulated over two backward passes: at most 4 rows each
        assert int((w.abs().sum(1) > 0).sum()) <= 8
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(F.cross_entropy(net.eval()(x), y).item())
        net.train()
    assert losses[-1] < 0.7 * losses[0]


def test_dense_grads_equal_plain_autograd_on_the_masked_dy():
    """The dense default against plain autograd, through a whole model (float64)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double()
    net = meprop_(copy.deepcopy(ref), MePropConfig(k=3, selection="unified"))
    x = torch.randn(7, 6, dtype=torch.float64)
    h = ref[0](x)
    h.retain_grad()
    out = ref[2](torch.relu(h))
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    dy = h.grad
    keep = torch.zeros(10, dtype=torch.bool)
    keep[dy.abs().sum(0).topk(3).indices] = True
    # the reference: plain autograd of the first layer on the masked dy
    for p in ref.parameters():
        p.grad = None
    ref[0](x).backward(dy * keep)
    net(x).backward(g)
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(net[0].bias.grad, ref[0].bias.grad, rtol=0, atol=1e-12)


def test_autocast_bf16_on_cpu():
    net = meprop_(_mlp(), MePropConfig(k=4, selection="topk"))
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert net[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(net[0].weight.grad).all()


def test_meprop_swaps_linear_conv_and_lstm_and_skips_the_output():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.lstm = nn.LSTM(4, 6, batch_first=True)
            self.proj = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

    m = meprop_(M(), MePropConfig(k=2))
    assert isinstance(m.conv, MePropConv2d) and isinstance(m.lstm, mesimp.MePropLSTM)
    assert isinstance(m.proj, MePropLinear) and type(m.out) is nn.Linear
    m2 = meprop_(M(), MePropConfig(k=2), filter_fn=lambda name, mod: name != "conv")
    assert type(m2.conv) is nn.Conv2d and isinstance(m2.proj, MePropLinear)

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, num_layers=2)
            self.out = nn.Linear(6, 2)

    with pytest.raises(BadInputError, match="cannot convert lstm") as e:
        meprop_(Deep(), MePropConfig(k=2))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------
# Simplifier: meSimp in the user's loop
# --------------------------------------------------------------------------------------
def test_simplifier_runs_points_cycles_and_resets_like_the_trainer():
    net = meprop_(_mlp(), MePropConfig(k=4, selection="unified"))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    cfg = SimplifyConfig(prune_rate=0.3, points_per_epoch=2, cycle_epochs=1)
    simp = Simplifier(net, cfg, opt, steps_per_epoch=4, epochs=3)
    assert list(simp.layers) == ["0", "3", "6"]  # hidden layers; the output is not pruned
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    events = []
    for step in range(12):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        had_state = len(opt.state) > 0
        got = simp.step()
        events += [(step + 1, e["event"]) for e in got]
        if any(e["event"] == "cycle_start" for e in got):
            assert had_state and len(opt.state) == 0  # Adam's moments forgotten
            assert all(int(layer.ref) == 0 for layer in simp.layers.values())
    # points at steps 2 and 4 of simplifying epochs 0 and 2; cycle starts after 4 and 8
    assert events == [
        (2, "simplify"), (4, "simplify"), (4, "cycle_start"), (8, "cycle_start"),
        (10, "simplify"), (12, "simplify"),
    ]  # fmt: skip
    assert simp.resets == 2
    assert all(w < 32 for w in simp.widths)


def test_simplifier_state_dict_round_trip_continues_identically(tmp_path):
    def run(split: int | None) -> tuple[list[int], dict]:
        torch.manual_seed(0)
        net = meprop_(_mlp(), MePropConfig(k=4, selection="topk"))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        cfg = SimplifyConfig(prune_rate=0.2, points_per_epoch=2)
        simp = Simplifier(net, cfg, opt, steps_per_epoch=3)
        x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
        for step in range(9):
            if step == split:  # checkpoint, then continue in fresh objects
                path = tmp_path / "ck.pt"
                torch.save(
                    {"model": net.state_dict(), "opt": opt.state_dict(), "simp": simp.state_dict()},
                    path,
                )
                ck = torch.load(path, weights_only=True)
                net = meprop_(_mlp(), MePropConfig(k=4, selection="topk"))
                net.load_state_dict(ck["model"])
                opt = torch.optim.Adam(net.parameters(), lr=1e-2)
                opt.load_state_dict(ck["opt"])
                simp = Simplifier(net, cfg, opt, steps_per_epoch=3)
                simp.load_state_dict(ck["simp"])
            net.eval()  # no dropout: identical runs
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            simp.step()
        return simp.widths, net.state_dict()

    widths_a, sd_a = run(None)
    widths_b, sd_b = run(4)
    assert widths_a == widths_b
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_simplifier_refuses_bad_input():
    net = meprop_(_mlp(), MePropConfig(k=4))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(BadInputError):
            Simplifier(net, SimplifyConfig(), steps_per_epoch=bad)
    with pytest.raises(BadInputError, match="no meProp layer"):
        Simplifier(_mlp(), SimplifyConfig(), steps_per_epoch=3)
    cnn = meprop_(byom_models.small_cnn(), MePropConfig(k=2))
    with pytest.raises(BadInputError, match="example_inputs"):
        Simplifier(cnn, SimplifyConfig(), steps_per_epoch=3)
    with pytest.raises(BadInputError, match="not meProp layers"):
        Simplifier(net, SimplifyConfig(), steps_per_epoch=3, layers=["nope"])


# --------------------------------------------------------------------------------------
# shrink: masked == shrunk in float64 on the models users bring
# --------------------------------------------------------------------------------------
CASES = {
    "residual_mlp": (byom_models.residual_mlp, lambda: torch.randn(6, 20)),
    "preln_block": (byom_models.preln_block, lambda: torch.randn(3, 7, 32)),
    "small_cnn": (byom_models.small_cnn, lambda: torch.randn(4, 1, 28, 28)),
    "resnet18": (byom_models.resnet18_1ch, lambda: torch.randn(2, 1, 28, 28)),
    "small_vit": (byom_models.small_vit, lambda: torch.randn(3, 1, 28, 28)),
    "lstm_tagger": (byom_models.lstm_tagger, lambda: torch.randint(0, 50, (3, 7))),
}
# the groups meSimp simplifies: FFN units and conv channels, residual streams (written by
# several layers, read through their norms), attention heads; never the output
GROUPS = {
    "residual_mlp": ["fc1.0", "fc1.1", "inp"],  # inp: the residual stream (inp, fc2.*)
    # the stream of preln_block comes from the model's input: the trial shrink leaves it
    "preln_block": ["attn:heads", "ffn_in"],
    "small_cnn": ["conv1", "conv2"],
    "resnet18": [
        "conv1",  # the stem and layer1's stream
        *(f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)),
        *(f"layer{i}.0.conv2" for i in (2, 3, 4)),  # each later stage's stream
    ],
    "small_vit": [
        "conv_proj",  # the hidden size: patch embedding, class token, positions, norms
        *(f"encoder.layers.encoder_layer_{i}.mlp.0" for i in (0, 1)),
        *(f"encoder.layers.encoder_layer_{i}.self_attention:heads" for i in (0, 1)),
    ],
    "lstm_tagger": ["lstm1", "lstm2"],  # mesimp's LSTM pruner inside Torch-Pruning's graph
}


def _masked_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Simplifier]:
    factory, inputs = CASES[name]
    torch.manual_seed(seed)
    model = meprop_(factory(), MePropConfig(k=0.5, selection="unified"))
    x = inputs()
    simp = Simplifier(model, SimplifyConfig(), steps_per_epoch=1, example_inputs=x)
    # a few training steps (BatchNorm statistics move), then masks by hand, per group
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    g = torch.Generator().manual_seed(seed)
    for group in simp.groups:
        keep = torch.rand(group.size, generator=g) < 0.4
        keep[0] = True
        apply_keeps(model, group, keep)
    sync(model, simp.all_groups)
    return model, x, simp


def _out_width(module: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "hidden_size", "nf"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise AssertionError(type(module))


@pytest.mark.parametrize("name", list(CASES))
def test_masked_equals_shrunk_in_float64(name):
    model, x, simp = _masked_model(name)
    assert sorted(g.name for g in simp.groups) == sorted(GROUPS[name])
    # every writer of a group loses exactly the rows of the group's masked units
    before = {n: _out_width(m) for n, m in model.named_modules() if hasattr(m, "mask")}
    dropped: dict[str, int] = {}
    for g in simp.groups:
        keep = group_keeps(model, g)
        for m in g.writers():
            if m.name in before:
                dropped[m.name] = dropped.get(m.name, 0) + int((~keep[m.units]).sum())
    small = shrink(model, x)
    # plain PyTorch modules, physically smaller where masked
    assert not any(isinstance(m, MePropCounters) for m in small.modules())
    mods = dict(small.named_modules())
    for n, d in dropped.items():
        assert _out_width(mods[n]) == before[n] - d, n
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # the reference: the masked model itself, in float64, eval mode
    ref_model = copy.deepcopy(model).double().eval()
    got_model = copy.deepcopy(small).double().eval()
    xd = x.double() if x.is_floating_point() else x  # word ids stay integers
    with torch.no_grad():
        ref, got = ref_model(xd), got_model(xd)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    assert model.training and small.training  # the input's mode, kept
    assert any(d > 0 for d in dropped.values())


def test_layers_that_cannot_be_removed_are_named_with_the_reason():
    model = meprop_(byom_models.preln_block(), MePropConfig(k=4))
    x = torch.randn(2, 5, 32)
    coupling = analyze(model, x)
    assert coupling["ffn_in"].removable and coupling["attn.in_proj"].removable  # FFN, heads
    # the stream is the model's input: removing a channel would change the input width
    assert not coupling["ffn_out"].removable and "trial shrink" in coupling["ffn_out"].reason
    assert coupling["ffn_out"].group == coupling["attn.out_proj"].group
    # a mask on the residual writer anyway: refused by name, nothing pruned
    model.ffn_out.apply_mask(torch.arange(32) % 2 == 0)
    with pytest.raises(BadInputError, match="cannot remove the masked units of ffn_out"):
        shrink(model, x)
    rmlp = meprop_(byom_models.residual_mlp(), MePropConfig(k=4))
    c = analyze(rmlp, torch.randn(2, 20))
    assert c["inp"].removable and c["fc2.0"].group == c["inp"].group == "inp"
    assert c["fc1.0"].consumers == ["fc2.0"]


def test_shrink_refuses_bad_input_in_one_line():
    model, x, simp = _masked_model("small_cnn")
    cases = [
        (lambda: shrink(model, torch.randn(2, 3, 28, 28)), TracingError, "do not run"),
        (lambda: shrink(model, x, round_to=0), BadInputError, "round_to"),
    ]
    for call, exc, needle in cases:
        with pytest.raises(exc, match=needle) as e:
            call()
        assert "\n" not in str(e.value)
    model.conv1.apply_mask(torch.zeros(16, dtype=torch.bool))
    with pytest.raises(BadInputError, match="conv1 with no units"):
        shrink(model, x)


class _Branchy(nn.Module):
    """Data-dependent control flow: ``b`` runs only for negative inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x) if x.sum() > 0 else self.b(x)))


def test_a_layer_the_tracer_cannot_reach_is_named():
    model = meprop_(_Branchy(), MePropConfig(k=2))
    model.b.apply_mask(torch.arange(8) < 4)
    with pytest.raises(TracingError, match="did not reach b"):
        shrink(model, torch.ones(2, 4))


class _HiddenScale(nn.Module):
    """Multiplies by a plain tensor attribute the dependency graph cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        self.scale = torch.linspace(0.5, 1.5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)) * self.scale)


def test_a_shrink_that_fails_verification_returns_nothing():
    model = meprop_(_HiddenScale(), MePropConfig(k=2))
    model.fc.apply_mask(torch.arange(8) % 2 == 0)
    with pytest.raises(VerificationError) as e:
        shrink(model, torch.randn(3, 4))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------
# export and save/load of a shrunk user model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["residual_mlp", "small_cnn", "small_vit"])
def test_export_onnx_of_a_shrunk_model_matches_pytorch(name, tmp_path):
    model, x, _ = _masked_model(name)
    small = shrink(model, x).eval()
    r = mesimp.export_onnx(small, x, tmp_path / "m.onnx")
    assert r["max_abs_diff"] <= 1e-4 and files_in(tmp_path) == {"m.onnx"}
    sess = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    xb = torch.cat([x, x])  # another batch size: the axis is dynamic
    got = sess.run(None, {"input": xb.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, small(xb).numpy(), atol=1e-4)
    with pytest.raises(BadInputError, match="shrink the model first"):
        mesimp.export_onnx(model, x, tmp_path / "masked.onnx")
    assert files_in(tmp_path) == {"m.onnx"}


@pytest.mark.parametrize("name", ["residual_mlp", "small_cnn", "resnet18"])
def test_save_and_load_rebuild_the_shrunk_model_bit_identically(name, tmp_path):
    model, x, _ = _masked_model(name)
    small = shrink(model, x).eval()
    factory = {"residual_mlp": "residual_mlp", "small_cnn": "small_cnn", "resnet18": "resnet18_1ch"}
    path = mesimp.save_model(tmp_path / "m.pt", small, f"byom_models:{factory[name]}", x)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "mesimp.model" and raw["kept"]
    loaded = mesimp.load_model(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert files_in(tmp_path) == {"m.pt"}


def test_save_model_refuses_a_factory_that_does_not_import(tmp_path):
    model, x, _ = _masked_model("residual_mlp")
    small = shrink(model, x)
    for factory, needle in (
        ("no_such_module:f", "does not import"),
        ("byom_models:nope", "has no 'nope'"),
        ("not-a-factory", "package.module:function"),
        ("byom_models:small_cnn", "does not rebuild"),  # another architecture
    ):
        with pytest.raises(BadInputError, match=needle):
            mesimp.save_model(tmp_path / "m.pt", small, factory, x)
    assert files_in(tmp_path) == set()


class _SigmoidAfter(nn.Module):
    """A unit after a sigmoid is not 0 when masked (sigmoid(0) = 0.5): not removable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.sigmoid(self.a(x)))))


def test_a_failed_verification_names_the_layer():
    model = meprop_(_SigmoidAfter(), MePropConfig(k=2))
    model.a.apply_mask(torch.arange(8) % 2 == 0)  # after a sigmoid: breaks masked == shrunk
    model.b.apply_mask(torch.arange(8) < 6)  # after a ReLU: fine
    with pytest.raises(VerificationError, match=r"\(a: ") as e:
        shrink(model, torch.randn(3, 4))
    assert "\n" not in str(e.value)
