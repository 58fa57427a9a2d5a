"""What bench asks of one kind of model: the interface its two workloads implement.

bench's loop (``mesimp.deploy.bench``) is the same for every model: for each thread
count and batch size, open sessions, build the inputs, time all models interleaved,
write one row per model. What differs is what an input is and what a row says:

* ``BatchWorkload`` (``workload_batches``): models with a fixed per-example shape (MLPs,
  CNNs, LSTM row classifiers), timed on one prepared batch, rows with latency
  percentiles and examples/s;
* ``SentenceWorkload`` (``workload_sentences``): LSTM taggers, timed tagging a whole set
  of sentences of varying length, rows with tokens/s.

bench picks one by the input kind of the models (``mesimp.deploy.onnx_graph``), in one
place, and never asks which it has.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Feeds", "Workload"]


@dataclass
class Feeds:
    """The inputs of one batch size: ``session.run`` feeds, and the real tokens in each
    (``None`` where inputs are not sentences)."""

    feeds: list[dict[str, np.ndarray]]
    tokens: list[int] | None = None


class Workload(ABC):
    """One kind of model's inputs, timing plan, rows and report fields.

    The constructor takes bench's options and refuses the ones this kind does not use,
    and checks that the models can be compared (same input, batch sizes they accept);
    ``prepare`` then loads what the inputs are made of.
    """

    batch_sizes: list[int]
    source: str | None  # the data the inputs come from: config["data"]
    # fields of a "models" entry: always, and when the model info has them
    model_keys: tuple[str, ...]
    optional_model_keys: tuple[str, ...]

    @abstractmethod
    def __init__(
        self,
        paths: list[Path],
        infos: list[dict[str, Any]],
        *,
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        sentences: int | None,
        batch_sizes: list[int] | None,
    ) -> None: ...

    @abstractmethod
    def prepare(self, threads: list[int]) -> dict[int, list[Any]]:
        """Load the input data (and per-model accuracy); returns the sessions opened on
        the way, by thread count, for the timing loop to reuse."""

    @abstractmethod
    def feeds(self, batch: int) -> Feeds:
        """The inputs to time at ``batch``."""

    @abstractmethod
    def time(
        self, sessions: list[Any], feeds: Feeds, repeat: int | None, warmup: int
    ) -> tuple[list[list[float]], int]:
        """Per session the timed runs (ms), and how many ``repeat`` units they were
        (runs, or passes over the sentences)."""

    @abstractmethod
    def row(
        self, model: str, batch: int, threads: int, times_ms: list[float], repeats: int
    ) -> dict[str, Any]:
        """One result row, without the fields relative to the first model."""

    @abstractmethod
    def speedup(self, row: dict[str, Any], first: dict[str, Any]) -> float:
        """``row``'s speed-up over the first model's row of the same configuration."""

    def config(self) -> dict[str, Any]:
        """Fields this kind adds to the result's ``config``."""
        return {}
