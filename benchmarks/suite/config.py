"""Every knob of a suite run, and the two presets.

The full preset is sized for the 2-core test machine (about 35 minutes, see
benchmarks/README.md for the measured budget); the quick preset is CI-sized: tiny
subsets, tiny widths, one seed, and numbers that mean nothing beyond "every row ran".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

FMNIST = Path("/usr/share/datasets/fashion-mnist")
EWT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ud-english-ewt"


@dataclass
class MLPSettings:
    """Comparison A. meSimp's defaults are benchmarks/mesimp_fmnist.py's."""

    data: str | None = None  # None: the default data locations (FMNIST above)
    train_subset: int | None = None  # first N training images (dev included); None = all
    test_subset: int | None = None
    hidden: int = 500
    epochs: int = 10
    batch_size: int = 50
    k: int = 20  # meProp / random-k / MSBP
    msbp_alpha: float = 0.8  # the MSBP paper's value
    msbp_selection: str = "unified"  # per-example top-k diverges with Adam here
    mesimp_k: int = 60
    mesimp_selection: str = "unified"
    prune_rate: float = 0.01
    points: int = 4
    cycle_epochs: int = 1
    finetune_epochs: int = 2  # meSimp: epochs - F simplifying, shrink, F fine-tuning
    round_to: int = 1


@dataclass
class LSTMSettings:
    """Comparison B: the EWT tagger runs (same epochs, lr and data for every method)."""

    data: str = str(EWT)
    train_sentences: int | None = None  # first N sentences of en_ewt-ud-dev; None = all
    test_sentences: int | None = None
    hidden: int = 500
    # A sweep on EWT (seed 1, 10 epochs): lr 1e-3 left the 500-wide tagger underfit
    # (79.1 % dense); lr 3e-3 gives 81.3 %. With unified k=20, prune rate 0.01 kept 18 %
    # of the units, 0.03 kept 64 units and 0.05 kept 59 (11.8 %) at 83.6 %.
    epochs: int = 10
    lr: float = 3e-3
    k: int = 20
    selection: str = "unified"
    prune_rate: float = 0.05
    points: int = 4


@dataclass
class SpeedSettings:
    """Timing repetitions: backward ratios (meprop_speed's estimator) and onnxruntime."""

    rounds: int = 20
    iters: int = 5
    warmup: int = 5
    ort_batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    ort_threads: int = 1
    ort_repeat: int | None = None  # None: mesimp.bench's automatic repeat


@dataclass
class SuiteConfig:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    threads: int = 1
    quick: bool = False
    mlp: MLPSettings = field(default_factory=MLPSettings)
    lstm: LSTMSettings = field(default_factory=LSTMSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def full_config(seeds: list[int] | None = None) -> SuiteConfig:
    return SuiteConfig(seeds=seeds or [1, 2, 3])


def quick_config(seeds: list[int] | None = None) -> SuiteConfig:
    """CI-sized: the dev split stays the trainer's default 5000 (as in
    mesimp_fmnist.one_seed), so the subset is 5000 dev + 3000 train images."""
    return SuiteConfig(
        seeds=seeds or [1],
        quick=True,
        mlp=replace(
            MLPSettings(),
            train_subset=8000,
            test_subset=500,
            hidden=64,
            epochs=2,
            k=8,
            mesimp_k=16,
            prune_rate=0.05,
            points=2,
            finetune_epochs=1,
        ),
        lstm=replace(
            LSTMSettings(),
            train_sentences=300,
            test_sentences=200,
            hidden=32,
            epochs=2,
            k=8,
            prune_rate=0.05,
        ),
        speed=SpeedSettings(rounds=2, iters=2, warmup=1, ort_repeat=20),
    )
