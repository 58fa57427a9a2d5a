"""A fixed training scenario on the compiled kernels, every resulting tensor saved:
``python tests/isa_scenario.py OUT.pt [BASELINE_BUILD_DIR]``.

With a build directory it first compiles ``mesimp/csrc`` there with
``-DMESIMP_NO_CLONES`` (no AVX2 clones: the baseline x86-64 ISA only) and runs on that
build instead of the installed ``mesimp._C``. tests/test_isa_bits.py runs it both ways
and compares the bits: the kernels promise the same bits on every ISA.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_baseline(build_dir: Path) -> Path:
    """Compile the kernels without ISA clones, with the builder and flags of the first-use
    build (``mesimp.nn.build``, the flags ``setup.py``'s)."""
    from mesimp.nn.build import compile_kernels

    return compile_kernels(build_dir / "_C.so", extra=["-DMESIMP_NO_CLONES"])


def use_build(so: Path) -> None:
    """Make ``mesimp.nn.kernels`` load ``so`` as ``mesimp._C`` (it loads the spec's origin
    with ``torch.ops.load_library``); before mesimp is imported."""
    module = types.ModuleType("mesimp._C")
    module.__spec__ = importlib.util.spec_from_file_location("mesimp._C", so)
    sys.modules["mesimp._C"] = module


def scenario() -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    from mesimp.models import MLP, MLPConfig
    from mesimp.nn import kernels
    from mesimp.nn.fused import fused_train_step, is_fused_node
    from mesimp.nn.lstm import MePropLSTM, lstm_op_built
    from mesimp.nn.meprop import MePropConfig
    from mesimp.nn.swap import meprop_
    from mesimp.training.optim import RowSparseAdagrad, RowSparseAdam

    kernels.set_kernels("cpp")
    assert lstm_op_built()
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    for sel in ("unified", "topk", "random"):
        for alpha in (0.0, 0.5):
            for opt_cls in (RowSparseAdam, RowSparseAdagrad):
                tag = f"{sel}-{alpha}-{opt_cls.__name__}"
                torch.manual_seed(0)
                m = MLP(MLPConfig(in_features=100, hidden_sizes=[64, 48], out_features=10))
                cfg = MePropConfig(k=7, selection=sel, msbp_alpha=alpha, sparse_grad=True)
                meprop_(m, cfg)
                layers = [mod for mod in m.modules() if hasattr(mod, "apply_mask")]
                keep = torch.ones(64, dtype=torch.bool)
                keep[::5] = False
                layers[0].apply_mask(keep)
                for mod in layers:
                    mod.counting = True
                opt = opt_cls(m.parameters(), lr=1e-2)
                for step in range(30):  # both compiled paths, alternating
                    x, y = torch.randn(16, 100), torch.randint(0, 10, (16,))
                    if step % 2:
                        assert fused_train_step(m, x, y, opt) is not None
                    else:
                        logits = m(x)
                        assert is_fused_node(logits.grad_fn)
                        F.cross_entropy(logits, y).backward()
                        opt.step()
                        opt.zero_grad()
                out |= {f"{tag}/{n}": t for n, t in m.state_dict().items()}
                for i, mod in enumerate(layers):
                    out[f"{tag}/hits{i}"] = mod.hits
                    if mod._state.memory is not None:
                        out[f"{tag}/memory{i}"] = mod._state.memory
                for i, state in enumerate(opt.state.values()):
                    out |= {f"{tag}/opt{i}.{n}": t for n, t in state.items()}
    for k in (5, 20):
        torch.manual_seed(1)
        lstm = MePropLSTM(30, 40, k=k, selection="unified", msbp_alpha=0.3)
        opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
        for _ in range(5):
            o, _ = lstm(torch.randn(4, 9, 30))
            o.square().mean().backward()
            opt.step()
            opt.zero_grad()
        out |= {f"lstm{k}/{n}": t for n, t in lstm.state_dict().items()}
    return {n: t.detach().clone() for n, t in out.items()}


if __name__ == "__main__":
    if len(sys.argv) > 2:
        use_build(build_baseline(Path(sys.argv[2])))
    tensors = scenario()
    library = importlib.util.find_spec("mesimp._C").origin  # the build that ran
    torch.save({"library": library, "tensors": tensors}, sys.argv[1])
