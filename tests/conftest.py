"""Shared fixtures: a tiny real-data ``.npz`` and helpers that train tiny models fast.

The tiny dataset is the first 600 training and 200 test images of the real
Fashion-MNIST (read with ``mesimp.data.load_idx``, uint8 pixels as stored), so the
training tests exercise real data while running in about a second each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mesimp.data import load_idx
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.loop import TrainConfig, train

FMNIST = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST, DEV = 600, 200, 100  # -> 500 train examples, 10 steps of 50 per epoch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than
    two (OpenMP threads spin against each other and against other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# meProp's own tests (Linear layers, the optimizer, the LSTM) run on both paths: the
# compiled kernels (where built) and the pure-Python fallback (mesimp.nn.kernels); the rest
# of the suite runs the default (auto).
BOTH_KERNEL_PATHS = {"test_meprop", "test_optim", "test_lstm"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_KERNEL_PATHS and "kernel_path" in metafunc.fixturenames:
        metafunc.parametrize("kernel_path", ["cpp", "python"], indirect=True)


@pytest.fixture(autouse=True)
def kernel_path(request):
    """The kernel mode a test runs under (``cpp`` skips where the kernels are not built).
    Every test leaves the mode as it found it: a test that switches it (a benchmark's
    runners do) must not move the rest of the suite onto the other path."""
    from mesimp.nn import kernels

    before = kernels.mode()
    mode = getattr(request, "param", None)
    if mode is None:
        yield before
    else:
        if mode == "cpp" and not kernels.available():
            pytest.skip("mesimp._C is not built")
        kernels.set_kernels(mode)
        yield mode
    kernels.set_kernels(before)


def _idx(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (FMNIST / name).is_file():
            return FMNIST / name
    pytest.skip(f"real Fashion-MNIST not found under {FMNIST}")


@pytest.fixture(scope="session")
def fmnist_raw() -> dict[str, np.ndarray]:
    """The first 5100 training and N_TEST test images of the real Fashion-MNIST (uint8
    [N, 28, 28]) and their labels, read once per session."""
    return {
        "x_train": load_idx(_idx("train-images-idx3-ubyte"))[:5100].copy(),
        "y_train": load_idx(_idx("train-labels-idx1-ubyte"))[:5100].copy(),
        "x_test": load_idx(_idx("t10k-images-idx3-ubyte"))[:N_TEST].copy(),
        "y_test": load_idx(_idx("t10k-labels-idx1-ubyte"))[:N_TEST].copy(),
    }


@pytest.fixture(scope="session")
def fmnist_small(fmnist_raw) -> dict[str, np.ndarray]:
    """The first N_TRAIN / N_TEST real Fashion-MNIST images and labels."""
    return {k: (v[:N_TRAIN] if k.endswith("train") else v) for k, v in fmnist_raw.items()}


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory, fmnist_small) -> Path:
    """A ``.npz`` of the tiny real dataset (x_train, y_train, x_test, y_test)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, **fmnist_small)
    return path


@pytest.fixture(scope="session")
def verify_npz(tmp_path_factory, fmnist_raw) -> Path:
    """Real data for ``shrink``'s verification: 5100 training examples (it loads with the
    default dev_size=5000, see test_shrink.py's xfail), the same N_TEST test images."""
    path = tmp_path_factory.mktemp("verify") / "verify.npz"
    np.savez(path, **fmnist_raw)
    return path


@pytest.fixture(scope="session")
def test_inputs(fmnist_small) -> tuple[torch.Tensor, torch.Tensor]:
    """Real test images as float32 [N, 784] in [0, 1], and their labels (computed here)."""
    x = torch.from_numpy(fmnist_small["x_test"].reshape(N_TEST, -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(fmnist_small["y_test"].astype(np.int64))


def train_tiny(data: Path, output: Path, progress: bool = False, **overrides: Any) -> dict:
    """Train a tiny MLP (784-32-32-10 by default) on the tiny dataset; return the summary."""
    cfg: dict[str, Any] = dict(
        data=str(data),
        hidden=32,
        layers=2,
        epochs=1,
        batch_size=50,
        dev_size=DEV,
        output=str(output),
        seed=1,
    )
    cfg.update(overrides)
    return train(TrainConfig(**cfg), progress=progress, log=lambda _msg: None)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def hand_mlp(hidden_sizes: list[int], in_features: int = 784, out: int = 10) -> nn.Sequential:
    """The obvious hand-written ``nn.Sequential(Linear, ReLU, ..., Linear)``."""
    mods: list[nn.Module] = []
    width = in_features
    for h in hidden_sizes:
        mods += [nn.Linear(width, h), nn.ReLU()]
        width = h
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def masked_forward(
    state_dict: dict[str, torch.Tensor], masks: list[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Reference forward of a masked MLP from raw weights: ``relu((x W^T + b) * mask)``.

    Written from the definition, independent of mesimp's modules. ``masks`` has one bool
    vector per hidden layer; the Linear layers are taken in key order ``0, 2, 4, ...``.
    """
    idx = sorted({int(k.split(".")[0]) for k in state_dict})
    h = x
    for j, i in enumerate(idx):
        h = h @ state_dict[f"{i}.weight"].T + state_dict[f"{i}.bias"]
        if j < len(idx) - 1:
            h = torch.relu(h * masks[j].to(h.dtype))
    return h


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tiny_npz) -> dict[str, Path]:
    """Trained tiny checkpoints, built once: dense (k=0), meProp (k=8), meSimp (k=8) with
    its units masked (``--no-compact``) and the same run compacted (the default)."""
    d = tmp_path_factory.mktemp("ckpts")
    names = ("dense", "meprop", "mesimp", "mesimp_compact")
    out = {n: d / f"{n}.pt" for n in names}
    train_tiny(tiny_npz, out["dense"], k=0)
    train_tiny(tiny_npz, out["meprop"], k=8)
    simp = SimplifyConfig(prune_rate=0.15, points_per_epoch=2, cycle_epochs=1)
    train_tiny(tiny_npz, out["mesimp"], k=8, epochs=2, simplify=simp, compact=False)
    train_tiny(tiny_npz, out["mesimp_compact"], k=8, epochs=2, simplify=simp)
    return out
