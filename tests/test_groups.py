"""The dependency group as the unit of meSimp (``mesimp.simplify.groups``): every kind of
group, masked == shrunk in float64 (the reference is the masked model itself, run before
the shrink), group counts against hand-computed sums, and the property that whatever the
Simplifier's own rule masks on a zoo of torchvision / timm / Hugging Face models,
``shrink`` removes and ONNX reproduces."""

from __future__ import annotations

import copy
import math

import group_models as gm
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mesimp
from mesimp import MePropConfig, Simplifier, SimplifyConfig, meprop_, shrink
from mesimp.errors import BadInputError
from mesimp.nn.attention import MultiheadAttention
from mesimp.nn.conv1d import MePropConv1D
from mesimp.nn.linear import MePropCounters, MePropLinear
from mesimp.simplify.graph_shrink import flatten_outputs
from mesimp.simplify.masking import apply_keeps, group_keeps, sync
from mesimp.simplify.rule import unit_keep_rule
from mesimp.simplify.tracing import TracingError, deadline, run_model
from mesimp.simplify.unit_scores import unit_counts

tokens = lambda: torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(2))  # noqa: E731
rows = lambda: torch.randn(6, 10, generator=torch.Generator().manual_seed(2))  # noqa: E731
pics = lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # noqa: E731

# name -> (factory, inputs, {group name: (kind, units)} that must be among the chosen)
KINDS = {
    "depthwise_chain": (
        gm.DepthwiseChain, pics, {"stem": ("channels", 8), "expand": ("channels", 24)}
    ),
    "grouped_conv": (gm.GroupedConv, pics, {"conv1": ("channels", 4), "conv2": ("channels", 4)}),
    "layernorm_stream": (lambda: gm.NormStream(nn.LayerNorm), rows, {"inp": ("channels", 16)}),
    "rmsnorm_stream": (lambda: gm.NormStream(nn.RMSNorm), rows, {"inp": ("channels", 16)}),
    "timm_attention": (
        gm.timm_attention, tokens, {"attn:heads": ("heads", 4), "inp": ("channels", 16)}
    ),
    "torch_mha": (gm.torch_mha, tokens, {"attn:heads": ("heads", 4), "inp": ("channels", 16)}),
    "gated_mlp": (gm.GatedMLP, rows, {"gate": ("channels", 24)}),
    "concat": (gm.Concat, pics, {"a": ("channels", 6), "b": ("channels", 10)}),
    "gqa_llama": (
        gm.tiny_llama, gm.ids,
        {"model.layers.0.self_attn:kv_heads": ("kv_heads", 2),
         "model.layers.0.self_attn:q_heads": ("q_heads", 2),
         "model.embed_tokens": ("channels", 32), "model.layers.1.mlp.gate_proj": ("channels", 48)},
    ),
    "hf_conv1d_gpt2": (
        gm.tiny_gpt2, gm.ids,
        {"transformer.h.0.mlp.c_fc": ("channels", 128), "transformer.h.1.attn:heads": ("heads", 4),
         "transformer.wte": ("channels", 32)},
    ),
}  # fmt: skip


def _simplifier(model: nn.Module, x, rate: float = 0.05) -> Simplifier:
    meprop_(model, MePropConfig(k=0.5, selection="unified"))
    return Simplifier(model, SimplifyConfig(prune_rate=rate), steps_per_epoch=10, example_inputs=x)


def _out(model: nn.Module, x) -> torch.Tensor:
    out = run_model(model, x)
    return out.logits if hasattr(out, "logits") else out


def _train(model: nn.Module, x, steps: int = 2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        _out(model, x).float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _mask_half(model: nn.Module, simp: Simplifier, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in simp.groups:
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=g)[: group.size // 2]] = False
        apply_keeps(model, group, keep)
    sync(model, simp.all_groups)


def _to64(x):
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    return x.double() if x.is_floating_point() else x


def _assert_same_function(masked: nn.Module, small: nn.Module, x) -> None:
    """The reference: the masked model itself, in float64 and eval mode."""
    a, b = copy.deepcopy(masked).double().eval(), copy.deepcopy(small).double().eval()
    with torch.no_grad():
        ref, got = flatten_outputs(run_model(a, _to64(x))), flatten_outputs(run_model(b, _to64(x)))
    assert len(ref) == len(got)
    for r, o in zip(ref, got, strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_of_group_is_a_unit_and_masked_equals_shrunk_in_float64(name):
    factory, inputs, expected = KINDS[name]
    torch.manual_seed(0)
    model, x = factory(), inputs()
    simp = _simplifier(model, x)
    chosen = {g.name: (g.kind, g.size) for g in simp.groups}
    for group, kind_size in expected.items():
        assert chosen.get(group) == kind_size, (group, chosen, simp.skipped)
    _train(model, x)
    _mask_half(model, simp)
    params = sum(p.numel() for p in model.parameters())
    small = shrink(model, x)
    assert not any(isinstance(m, MePropCounters) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < params
    _assert_same_function(model, small, x)


def test_one_decision_masks_every_member_of_a_group():
    model, x = gm.NormStream(nn.LayerNorm), rows()
    simp = _simplifier(model, x)
    stream = next(g for g in simp.groups if g.name == "inp")
    roles = {m.name: m.role for m in stream.members}
    assert roles["inp"] == roles["fc2.0"] == roles["fc2.1"] == "out"  # every writer
    assert roles["fc1.0"] == roles["fc1.1"] == roles["head"] == "in"  # every reader
    assert roles["norms.0"] == roles["final"] == "norm"
    keep = torch.arange(16) % 3 != 0
    apply_keeps(model, stream, keep)
    sync(model, simp.all_groups)
    for w in ("inp", "fc2.0", "fc2.1"):
        assert torch.equal(model.get_submodule(w).mask, keep)
    for r in ("fc1.0", "head"):
        assert torch.equal(model.get_submodule(r).mesimp_in_keep, keep)
    assert torch.equal(model.final.mesimp_norm_keep, keep)
    assert torch.equal(group_keeps(model, stream), keep)
    # the norm's statistics run over the active channels only: shift a masked channel
    # of the stream by a lot, nothing downstream moves
    with torch.no_grad():
        before = model(x)
        model.inp.bias[0] += 1e3  # channel 0 is masked: the writer's output there is 0
        model.inp.mask[0] = True  # ...unless we look behind the mask: the readers ignore it
        after = model(x)
    torch.testing.assert_close(after, before)


def test_a_units_count_is_the_sum_over_the_groups_writers():
    """Hand-computed: three writers of a 4-unit stream, each with its own hits and ref."""
    model = meprop_(gm.NormStream(nn.LayerNorm, d=4), MePropConfig(k=2))
    x = rows()
    simp = Simplifier(model, SimplifyConfig(prune_rate=0.3), steps_per_epoch=1, example_inputs=x)
    stream = next(g for g in simp.groups if g.name == "inp")
    counts = {"inp": ([5, 0, 3, 9], 10), "fc2.0": ([1, 2, 0, 4], 8), "fc2.1": ([0, 0, 6, 1], 8)}
    for layer in simp.layers.values():
        layer.reset_counters()
    for name, (hits, ref) in counts.items():
        layer = model.get_submodule(name)
        layer.hits.copy_(torch.tensor(hits))
        layer.ref.fill_(ref)
    hits, ref = unit_counts(model, stream)
    assert hits.tolist() == [6, 2, 9, 14]  # 5+1+0, 0+2+0, 3+0+6, 9+4+1
    assert ref.tolist() == [26, 26, 26, 26]  # 10+8+8 opportunities per unit
    # the rule: hits >= floor(0.3 * 26) = 7
    assert unit_keep_rule(hits, ref, 0.3).tolist() == [False, False, True, True]
    assert math.floor(0.3 * 26) == 7
    simp.simplify()
    assert group_keeps(model, stream).tolist() == [False, False, True, True]
    for name in counts:  # one decision, every writer; counters restart
        layer = model.get_submodule(name)
        assert layer.mask.tolist() == [False, False, True, True] and int(layer.ref) == 0


def test_heads_under_grouped_query_attention_keep_the_kv_grouping():
    model, x = gm.tiny_llama(), gm.ids()
    simp = _simplifier(model, x)
    groups = {g.name: g for g in simp.groups}
    kv, q = groups["model.layers.0.self_attn:kv_heads"], groups["model.layers.0.self_attn:q_heads"]
    apply_keeps(model, kv, torch.tensor([True, False]))  # kv head 1 and its 2 query heads
    apply_keeps(model, q, torch.tensor([False, True]))  # slot 0 of every kv group
    sync(model, simp.all_groups)
    small = shrink(model, x)
    attn = small.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == attn.head_dim  # 1 kv head
    assert attn.q_proj.out_features == attn.head_dim  # 1 query head: kv 0's slot 1
    assert attn.num_key_value_groups == 1 and attn.o_proj.in_features == attn.head_dim
    _assert_same_function(model, small, x)


@pytest.mark.parametrize("name", list(gm.ZOO))
def test_what_the_simplifier_masks_shrink_removes_and_onnx_reproduces(name, tmp_path):
    """The guarantee, on the suite's zoo: masks set by the Simplifier's own rule (not by
    hand) always shrink, verify, and export with onnxruntime parity."""
    factory, inputs = gm.ZOO[name]
    model, x = factory(), inputs()
    simp = _simplifier(model, x, rate=0.3)
    assert simp.groups, simp.skipped
    model.train()
    _train(model, x, steps=3)
    widths = simp.simplify()
    assert any(w < g.size for w, g in zip(widths, simp.groups, strict=True))
    small = shrink(model, x).eval()
    _assert_same_function(model, small, x)
    r = mesimp.export_onnx(small, x, tmp_path / "m.onnx")
    assert r["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    feed = x if isinstance(x, dict) else {"input": x}
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {n: v.numpy() for n, v in zip(names, feed.values(), strict=True)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, _out(small, x).numpy(), atol=1e-4)


def test_the_output_and_uncounted_groups_are_left_alone_with_reasons():
    model = gm.NormStream(nn.LayerNorm)
    meprop_(model, MePropConfig(k=2), skip_output=False)  # the output layer too
    simp = Simplifier(model, SimplifyConfig(), steps_per_epoch=1, example_inputs=rows())
    assert "reach the model's output" in simp.skipped["head"]
    assert "head" not in {g.name for g in simp.groups}


# -- the pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_computes_what_torch_computes(batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    ours = MultiheadAttention.from_torch(ref)
    g = torch.Generator().manual_seed(3)
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    q, kv = torch.randn(*shape, generator=g).double(), torch.randn(*shape, generator=g).double()
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    bias = torch.randn(5, 5, generator=g).double()
    cases = [
        dict(query=q, key=q, value=q),
        dict(query=q, key=kv, value=kv),  # cross-attention
        dict(query=q, key=q, value=q, key_padding_mask=pad),
        dict(query=q, key=q, value=q, attn_mask=causal),
        dict(query=q, key=q, value=q, attn_mask=bias, average_attn_weights=False),
        dict(query=q, key=q, value=q, attn_mask=causal, key_padding_mask=pad),
    ]
    for kw in cases:
        for need in (True, False):
            a, wa = ref(**kw, need_weights=need)
            b, wb = ours(**kw, need_weights=need)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
            if need:
                torch.testing.assert_close(wb, wa, rtol=0, atol=1e-12)
    # unbatched input, and the state_dict both ways
    x0 = q[0] if batch_first else q[:, 0]
    torch.testing.assert_close(ours(x0, x0, x0)[0], ref(x0, x0, x0)[0], rtol=0, atol=1e-12)
    assert set(ours.state_dict()) == set(ref.state_dict())
    fresh = MultiheadAttention(16, 4, batch_first=batch_first).double()
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh(q, q, q)[0], ref(q, q, q)[0], rtol=0, atol=1e-12)
    assert isinstance(ours.to_torch(), nn.MultiheadAttention)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_counts_in_its_meprop_in_projection(batch_first):
    """torch's default layout (``batch_first=False``) too: self-attention takes the one
    in-projection GEMM, so the swapped meProp layer selects and counts; and torch's
    ``TransformerEncoderLayer`` runs in eval mode (its fast-path check reads the module)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(layer)
    meprop_(model, MePropConfig(k=0.5, selection="unified"))
    in_proj = layer.self_attn.in_proj
    assert isinstance(in_proj, MePropLinear)
    x = torch.randn(3, 5, 16)
    model(x).sum().backward()
    assert int(in_proj.ref) == 15 and int(in_proj.hits.sum()) > 0
    with torch.no_grad():
        assert model.eval()(x).shape == x.shape


def test_layer_macs_count_meprop_conv1d_layers():
    from mesimp.models.macs import layer_macs

    model = gm.tiny_gpt2()
    x = {"input_ids": torch.randint(0, 50, (2, 6))}
    before = layer_macs(model, x)
    meprop_(model, MePropConfig(k=0.5, selection="unified"))
    assert layer_macs(model, x) == before


def test_meprop_conv1d_is_meprop_linear_on_the_transposed_weight():
    gpt2 = gm.tiny_gpt2()
    conv = gpt2.transformer.h[0].mlp.c_fc  # HF Conv1D: weight [32, 128]
    cfg = MePropConfig(k=7, selection="unified")
    a = MePropConv1D.from_conv1d(copy.deepcopy(conv), cfg).double()
    b = MePropLinear(32, 128, config=cfg).double()
    with torch.no_grad():
        b.weight.copy_(a.weight.t())
        b.bias.copy_(a.bias)
    x = torch.randn(3, 4, 32, dtype=torch.double, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    g = torch.randn_like(ya)
    (ga,) = torch.autograd.grad(ya, x, g, retain_graph=True)
    (gb,) = torch.autograd.grad(yb, x, g, retain_graph=True)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    wa, wb = torch.autograd.grad(ya, a.weight, g)[0], torch.autograd.grad(yb, b.weight, g)[0]
    torch.testing.assert_close(wa, wb.t(), rtol=0, atol=1e-12)
    assert torch.equal(a.hits, b.hits) and int(a.ref) == int(b.ref) == 24
    plain = a.to_plain()
    assert type(plain) is type(conv) and plain.weight is a.weight


def test_a_tracer_that_loops_stops_with_one_line():
    with pytest.raises(TracingError, match="did not finish in 0.2 s") as e:
        with deadline("reading the groups", 0.2):
            while True:
                pass
    assert "\n" not in str(e.value)


def test_bad_masks_are_refused_by_name():
    model, x = gm.NormStream(nn.LayerNorm), rows()
    _simplifier(model, x)
    # one writer of the stream masked by hand: its group keeps the unit
    model.fc2[0].apply_mask(torch.arange(16) != 3)
    with pytest.raises(
        BadInputError, match="cannot remove the masked units of fc2.0: its group keeps"
    ):
        shrink(model, x)


def test_a_shrunk_hugging_face_model_saves_and_loads_bit_identically(tmp_path):
    model, x = gm.tiny_llama(), gm.ids()
    simp = _simplifier(model, x)
    _mask_half(model, simp)
    small = shrink(model, x).eval()
    path = mesimp.save_model(tmp_path / "m.pt", small, "group_models:tiny_llama", x)
    raw = torch.load(path, weights_only=True)
    assert {s["name"] for s in raw["example_inputs"]} == {"input_ids"}
    assert any(k.endswith(":kv_heads") for k in raw["kept"])  # heads are recorded by group
    loaded = mesimp.load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, small(**x).logits)
