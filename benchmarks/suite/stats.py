"""Seed statistics of result rows: mean, sample standard deviation, differences.

The standard error of a difference of two means is Welch's,
``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``; with one seed it is 0 and every verdict built on
it says so ("1 seed").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.suite.results import ok_runs


@dataclass
class Stat:
    mean: float
    sd: float
    n: int

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n else math.nan


def stat(values: list[float]) -> Stat | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stat(statistics.fmean(vals), sd, len(vals))


def row_stat(row: dict[str, Any], field: str) -> Stat | None:
    """``field`` over the row's successful seeds (None if there are none)."""
    return stat([r[field] for r in ok_runs(row) if r.get(field) is not None])


def kept_fraction(row: dict[str, Any], full_width: int) -> Stat | None:
    """Kept hidden units / all hidden units, per seed."""
    return stat([sum(r["widths"]) / (full_width * len(r["widths"])) for r in ok_runs(row)])


@dataclass
class Diff:
    delta: float  # a - b
    se: float  # Welch standard error of the difference
    n_a: int
    n_b: int

    @property
    def single_seed(self) -> bool:
        return min(self.n_a, self.n_b) < 2


def diff(a: Stat, b: Stat) -> Diff:
    return Diff(a.mean - b.mean, math.sqrt(a.se**2 + b.se**2), a.n, b.n)
