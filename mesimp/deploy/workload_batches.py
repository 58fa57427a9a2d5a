"""bench's workload for models with a fixed per-example shape: one batch, timed many times.

MLPs, CNNs and LSTM row classifiers (``[batch, rows, width]`` images) take examples of
one shape, so a configuration is one prepared batch: test images from ``data`` (tiled
when the batch is larger than the test set), else uniform random inputs in [0, 1). Each
model runs it ``repeat`` times (``timing.time_repeats``). A row reports latency
percentiles and ``throughput = batch_size / (p50_ms / 1000)``; ``speedup`` is the first
model's p50 over this one's. With ``data`` every model's test accuracy is measured once
and repeated in its rows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.onnx_graph import KIND_NAMES
from mesimp.deploy.ort_errors import one_line, ort_errors, ort_message
from mesimp.deploy.timing import percentile, time_repeats, timing_session
from mesimp.deploy.workload import Feeds, Workload
from mesimp.errors import BadInputError

__all__ = ["DEFAULT_BATCH_SIZES", "BatchWorkload"]

DEFAULT_BATCH_SIZES = (1, 32, 256, 4096)


class BatchWorkload(Workload):
    """Fixed-shape inputs (``kind`` ``"dense"`` or ``"rows"``): a batch per configuration."""

    model_keys = ("path", "macs", "params", "size_bytes")
    optional_model_keys = ("hidden_sizes", "quantization", "int8_mode", "accuracy")

    def __init__(
        self,
        paths: list[Path],
        infos: list[dict[str, Any]],
        *,
        data: str | os.PathLike | None,
        conllu: str | os.PathLike | None,
        sentences: int | None,
        batch_sizes: list[int] | None,
    ) -> None:
        if conllu is not None or sentences is not None:
            kind = KIND_NAMES[infos[0]["input"]["kind"]]
            raise BadInputError(
                f"--conllu and --sentences are for LSTM taggers; {paths[0]} is {kind}"
            )
        self.paths, self.infos, self.data = paths, infos, data
        self.batch_sizes = batch_sizes or list(DEFAULT_BATCH_SIZES)
        sig0 = infos[0]["input"]
        for p, info in zip(paths[1:], infos[1:], strict=True):
            sig = info["input"]
            if (sig["name"], sig["shape"]) != (sig0["name"], sig0["shape"]):
                raise BadInputError(
                    f"input signatures differ: {paths[0]} takes {sig0['name']!r} "
                    f"{sig0['shape']} per example, {p} takes {sig['name']!r} {sig['shape']}; "
                    f"bench compares models of the same task"
                )
        for p, info in zip(paths, infos, strict=True):
            fixed = info["input"].get("batch")
            if fixed is not None and any(b != fixed for b in self.batch_sizes):
                raise BadInputError(
                    f"{p} has a fixed batch size {fixed}; use --batch-sizes {fixed}"
                )
        self.name: str = sig0["name"]
        self.shape = tuple(sig0["shape"])
        self.source: str | None = None
        self.pool: np.ndarray | None = None

    def prepare(self, threads: list[int]) -> dict[int, list[Any]]:
        """The pool of inputs (test images, else random) and, with data, accuracy."""
        paths, infos, shape = self.paths, self.infos, self.shape
        features = math.prod(shape)
        opened: dict[int, list[Any]] = {}  # thread count -> sessions opened ahead of the loop
        if self.data is None:
            # Open the models before allocating their inputs: onnxruntime refuses a graph
            # whose declared input does not fit its weights, and such a (forged) input shape
            # must not make bench allocate gigabytes first. The sessions are reused.
            opened[threads[0]] = [timing_session(p, threads[0]) for p in paths]
            n = max(self.batch_sizes)
            try:
                self.pool = np.random.default_rng(0).random((n, *shape), dtype=np.float32)
            except (MemoryError, ValueError) as e:  # a huge or negative declared input shape
                raise BadInputError(
                    f"{paths[0]}: cannot allocate inputs of shape {[n, *shape]} ({one_line(e)})"
                ) from e
            return opened

        from mesimp.data import load_image_dataset

        ds = load_image_dataset(self.data, dev_size=0)  # only the test split is used
        if ds.x_test.shape[1] != features:
            raise BadInputError(
                f"the models take {features} input features ({self.name!r} {list(shape)}) "
                f"but the data at {ds.source} has {ds.x_test.shape[1]} per example"
            )
        if len(ds.y_test) == 0:
            raise BadInputError(f"the data at {ds.source} has an empty test split")
        self.source = ds.source
        self.pool = ds.x_test.numpy().reshape(-1, *shape)
        x_all = np.ascontiguousarray(ds.x_test.numpy().reshape(-1, *shape), dtype=np.float32)
        y_all = ds.y_test.numpy()
        for p, info in zip(paths, infos, strict=True):
            try:
                info["accuracy"] = _accuracy(timing_session(p, max(threads)), x_all, y_all)
            except ort_errors() as e:  # loads, but fails to run (e.g. a forged Gemm attribute)
                raise BadInputError(f"{p}: onnxruntime cannot run it ({ort_message(e)})") from e
        return opened

    def feeds(self, batch: int) -> Feeds:
        assert self.pool is not None, "prepare() first"
        return Feeds([{self.name: _batch(self.pool, batch)}])

    def time(
        self, sessions: list[Any], feeds: Feeds, repeat: int | None, warmup: int
    ) -> tuple[list[list[float]], int]:
        times = time_repeats(sessions, feeds.feeds[0], repeat, warmup)
        return times, len(times[0])

    def row(
        self, model: str, batch: int, threads: int, times_ms: list[float], repeats: int
    ) -> dict[str, Any]:
        srt = sorted(times_ms)
        p50 = percentile(srt, 50)
        return {
            "model": model,
            "batch_size": batch,
            "threads": threads,
            "p50_ms": p50,
            "p90_ms": percentile(srt, 90),
            "p99_ms": percentile(srt, 99),
            "mean_ms": sum(srt) / len(srt),
            "runs": len(srt),
            "throughput": batch / (p50 / 1e3),
        }

    def speedup(self, row: dict[str, Any], first: dict[str, Any]) -> float:
        return first["p50_ms"] / row["p50_ms"]

    def config(self) -> dict[str, Any]:
        return {"throughput": "batch_size / p50 latency (examples/s)"}


def _batch(pool: np.ndarray, b: int) -> np.ndarray:
    """``b`` rows from ``pool``, tiled when ``b`` exceeds it (C-contiguous float32)."""
    reps = -(-b // len(pool))
    x = np.concatenate([pool] * reps)[:b] if reps > 1 else pool[:b]
    return np.ascontiguousarray(x, dtype=np.float32)


def _accuracy(session: Any, x: np.ndarray, y: np.ndarray, batch: int = 2048) -> float:
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(y), batch):
        out = session.run(None, {name: x[i : i + batch]})[0]
        correct += int((out.reshape(len(out), -1).argmax(-1) == y[i : i + batch]).sum())
    return correct / len(y)
