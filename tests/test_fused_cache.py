"""The compiled paths' cached arguments (mesimp.nn.arg_cache) are never stale.

``fused_forward`` / ``train_step`` keep a stack's kernel arguments in the module, and
the compiled optimizers keep their state lists, until what they were built from
changes. Each test here changes one such thing after the cache is warm, then takes a
step on the model and on a deep copy whose caches were dropped (so it builds its
arguments afresh): the two must agree bit for bit (the same kernels on the same
arguments). A stale entry (the old k, mask, config, optimizer state...) would not.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp.models import MLP, MLPConfig
from mesimp.nn import fused, kernels
from mesimp.nn.linear import MePropLinear
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_
from mesimp.training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mesimp._C is not built")

LR = 1e-2


@pytest.fixture(autouse=True)
def _kernels_on():
    before = kernels.mode()
    kernels.set_kernels("cpp")
    yield
    kernels.set_kernels(before)


def _setup(optimizer: str = "adam"):
    torch.manual_seed(0)
    model = meprop_(
        MLP(MLPConfig(in_features=12, hidden_sizes=[16, 16], out_features=4)),
        MePropConfig(k=4, selection="unified", sparse_grad=True),
    )
    return model, build_optimizer(optimizer, model.parameters(), LR)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)


def _same_kind(opt: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    return type(opt)(model.parameters(), lr=LR)


def _uncached_copy(model: nn.Module, opt: torch.optim.Optimizer):
    """``model`` and ``opt`` as they are now, with nothing cached."""
    twin = copy.deepcopy(model)
    twin.__dict__.pop(fused._CACHE, None)
    twin_opt = _same_kind(opt, twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors
    return twin, twin_opt


def _layers(model: nn.Module) -> list[MePropLinear]:
    return [m for m in model if isinstance(m, MePropLinear)]


def _assert_same(a: nn.Module, oa, b: nn.Module, ob) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        assert torch.equal(la.hits, lb.hits) and torch.equal(la.ref, lb.ref)
        ma, mb = la._state.memory, lb._state.memory
        assert (ma is None or ma.numel() == 0) == (mb is None or mb.numel() == 0)
        if ma is not None and ma.numel():
            assert torch.equal(ma, mb)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), key


def _rebuild_with_new_weight(model, opt):
    layer = _layers(model)[0]
    layer.weight = nn.Parameter(layer.weight.detach() * 0.5)
    return _same_kind(opt, model)


def _swap_output_layer(model, opt):
    old = model[4]
    new = nn.Linear(old.in_features, old.out_features)
    new.load_state_dict({"weight": old.weight.detach() * 2, "bias": old.bias.detach()})
    model[4] = new
    return _same_kind(opt, model)


def _load_other_optimizer_state(model, opt):
    other = _same_kind(opt, model)
    x, y = _batch(99)
    F.cross_entropy(model(x), y).backward()
    other.step()  # Adam state with other values, in new tensors
    model.zero_grad(set_to_none=True)
    opt.load_state_dict(other.state_dict())
    return opt


def _replace_state_entries(model, opt):
    """New state tensors under the same param groups (what a checkpoint loader that
    assigns ``opt.state[p]`` does)."""
    for p in model.parameters():
        opt.state[p] = {k: v.clone() * (2 if k != "step" else 1) for k, v in opt.state[p].items()}
    return opt


CHANGES = {
    "k": lambda m, o: [setattr(ly.meprop_config, "k", 2) for ly in _layers(m)],
    "selection": lambda m, o: [setattr(ly.meprop_config, "selection", "topk") for ly in _layers(m)],
    "msbp": lambda m, o: [setattr(ly.meprop_config, "msbp_alpha", 0.5) for ly in _layers(m)],
    "dense_bias": lambda m, o: [setattr(ly.meprop_config, "dense_bias", True) for ly in _layers(m)],
    "sparse_grad": lambda m, o: [
        setattr(ly.meprop_config, "sparse_grad", False) for ly in _layers(m)
    ],
    "mask": lambda m, o: _layers(m)[1].apply_mask(torch.arange(16) % 3 != 0),
    "counting": lambda m, o: [setattr(ly, "counting", False) for ly in _layers(m)],
    "new config": lambda m, o: [
        setattr(ly, "meprop_config", MePropConfig(k=3, selection="unified")) for ly in _layers(m)
    ],
    "new weight": _rebuild_with_new_weight,
    "new layer": _swap_output_layer,
    "lr": lambda m, o: o.param_groups[0].__setitem__("lr", 0.1),
    "optimizer state": _load_other_optimizer_state,
    "optimizer state entries": _replace_state_entries,
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("step", ["train_step", "loss.backward"])
@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
def test_a_change_after_the_cache_is_warm_is_seen(change, step, optimizer):
    model, opt = _setup(optimizer)
    for seed in range(2):  # warm every cache (the stack's, the optimizer's)
        _step(model, opt, _batch(seed), step)
    out = CHANGES[change](model, opt)
    if isinstance(out, torch.optim.Optimizer):
        opt = out
    twin, twin_opt = _uncached_copy(model, opt)
    for seed in range(2, 5):
        _step(model, opt, _batch(seed), step)
        _step(twin, twin_opt, _batch(seed), step)
        _assert_same(model, opt, twin, twin_opt)


def _step(model, opt, batch, how: str) -> None:
    x, y = batch
    if how == "train_step":
        fused.train_step(model, x, y, opt)
        return
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_the_msbp_memory_reset_is_seen():
    model, opt = _setup()
    for ly in _layers(model):
        ly.meprop_config.msbp_alpha = 0.5
    for seed in range(2):
        fused.train_step(model, *_batch(seed), opt)
    assert all(ly._state.memory.numel() for ly in _layers(model))
    for ly in _layers(model):
        ly.reset_memory()
    twin, twin_opt = _uncached_copy(model, opt)
    fused.train_step(model, *_batch(5), opt)
    fused.train_step(twin, *_batch(5), twin_opt)
    _assert_same(model, opt, twin, twin_opt)


def test_a_dtype_change_in_place_leaves_the_fused_path():
    """New data in the same Parameter (``p.data = ...``, what ``model.double()`` does to
    a plain ``nn.Linear``) leaves the key as it was: the per-call dtype check sends the
    stack to the per-layer path. ``model.double()`` as a whole does too."""
    model, opt = _setup()
    x, y = _batch(0)
    assert fused.is_fused_node(model(x).grad_fn)
    key = model.__dict__[fused._CACHE][0]
    model[4].weight.data = model[4].weight.data.double()
    assert fused._key(model) == key
    assert fused.fused_forward(model, x) is None
    assert fused.fused_train_step(model, x, y, opt) is None
    model.double()
    out = model(x.double())
    assert out.dtype == torch.float64 and not fused.is_fused_node(out.grad_fn)


def test_module_hooks_keep_the_per_layer_path():
    """The fused path never calls a child's forward, so a child with hooks (or a global
    module hook) takes the per-layer path, and the hook fires; the rest of a chain after
    the hooked layer still runs as one node."""
    model, _ = _setup()
    x, _ = _batch(0)
    assert fused.is_fused_node(model(x).grad_fn)
    seen = []
    handle = model[2].register_forward_hook(lambda m, i, o: seen.append("child"))
    assert not fused.is_fused_node(model(x).grad_fn) and seen == ["child"]
    handle.remove()
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append("first"))
    out = model(x)  # layer 0 alone, then layers 2..4 as one node
    assert fused.is_fused_node(out.grad_fn) and seen == ["child", "first"]
    assert not fused.is_fused_node(out.grad_fn.next_functions[0][0])
    handle.remove()
    assert fused.is_fused_node(model(x).grad_fn)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        assert not fused.is_fused_node(model(x).grad_fn)
    finally:
        handle.remove()
    assert "MePropLinear" in seen
    assert fused.is_fused_node(model(x).grad_fn)


def test_a_subclass_keeps_its_own_forward():
    class Scaled(MePropLinear):
        def forward(self, x):
            return super().forward(x) * 2

    model, _ = _setup()
    x, _ = _batch(0)
    ref = model(x)
    old = model[0]
    new = Scaled(old.in_features, old.out_features, config=old.meprop_config)
    new.load_state_dict(old.state_dict())
    model[0] = new
    out = model(x)  # the subclass alone (its own forward), then layers 2..4 as one node
    assert not torch.equal(out, ref)
    assert not fused.is_fused_node(out.grad_fn.next_functions[0][0])
    model[2] = Scaled(16, 16, config=old.meprop_config)  # no chain left
    assert not fused.is_fused_node(model(x).grad_fn)


def test_the_onnx_flags_are_torchs():
    """``_onnx_exporting`` reads the flags ``torch.onnx.is_in_onnx_export()`` reads."""
    from torch.onnx._internal.exporter import _flags

    @_flags.set_onnx_exporting_flag
    def inside():
        return fused._onnx_exporting(), torch.onnx.is_in_onnx_export(), fused._applies(x)

    x, _ = _batch(0)
    assert inside() == (True, True, False)
    assert fused._onnx_exporting() is False and fused._applies(x)


def test_the_optimizer_forgets_replaced_groups():
    """``load_state_dict`` replaces the param groups; the cache keeps only live ones."""
    model, opt = _setup()
    for seed in range(2):
        fused.train_step(model, *_batch(seed), opt)
    for _ in range(3):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        fused.train_step(model, *_batch(7), opt)
    assert list(opt._kernel_state) == [id(opt.param_groups[0])]
