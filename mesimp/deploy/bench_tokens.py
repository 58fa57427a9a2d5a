"""onnxruntime timing of token models (``input_ids, attention_mask -> logits``) on real
sentences: what ``mesimp.integrations.transformers.export_hf_onnx`` writes.

A transformer's cost per call depends on the sentence lengths, so each configuration
runs the same set of sentences: at batch 1 one ``session.run`` per sentence; at batch
b the sentences sorted by length and cut into groups of b, right-padded to the
group's longest (how a server buckets requests). Models are timed interleaved
(``timing.time_passes``: the same runs, the order alternating), so ``speedup`` (this
model's tokens/s over the first model's) is robust to a noisy machine. Sessions are
set up like ``mesimp bench``'s (``timing.timing_session``).

Rows: ``{"model", "batch_size", "threads", "sentences", "tokens", "runs", "p50_ms",
"p90_ms", "tokens_per_s", "sentences_per_s", "speedup"}``; ``p*_ms`` are per
``session.run`` (one sentence at batch 1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.timing import machine_info, percentile, time_passes, timing_session
from mesimp.errors import BadInputError

__all__ = ["bench_token_models", "token_feeds"]


def token_feeds(
    sentences: Sequence[Sequence[int]], batch: int, names: Sequence[str], pad_id: int = 0
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Feeds (``names`` = the ids and mask inputs) and their real-token counts."""
    if batch < 1:
        raise BadInputError(f"batch size must be >= 1, got {batch}")
    lengths = [len(s) for s in sentences]
    if not sentences or min(lengths) < 1:
        raise BadInputError("token timing needs non-empty sentences")
    order = list(range(len(sentences))) if batch == 1 else sorted(
        range(len(sentences)), key=lambda i: lengths[i]
    )  # fmt: skip
    feeds, tokens = [], []
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        ids = np.full((len(idx), max(lengths[i] for i in idx)), pad_id, np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : lengths[i]] = sentences[i]
            mask[r, : lengths[i]] = 1
        feed = {names[0]: ids}
        if len(names) > 1:
            feed[names[1]] = mask
        feeds.append(feed)
        tokens.append(sum(lengths[i] for i in idx))
    return feeds, tokens


def bench_token_models(
    paths: Sequence[str | os.PathLike],
    sentences: Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = (1, 32),
    threads: int = 1,
    passes: int | None = None,
    warmup: int = 3,
) -> dict[str, Any]:
    """Time every ONNX model of ``paths`` on ``sentences`` (token ids) at each batch
    size; ``{"results": [rows], "machine": {...}, "config": {...}}``."""
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise BadInputError(f"ONNX file not found: {missing[0]}")
    sessions = [timing_session(p, threads) for p in files]
    names = [[i.name for i in s.get_inputs()] for s in sessions]
    if any(len(n) not in (1, 2) or n != names[0] for n in names):
        raise BadInputError("every model must take the same input_ids[, attention_mask] inputs")
    rows = []
    for b in batch_sizes:
        feeds, tokens = token_feeds(sentences, b, names[0])
        times = time_passes(sessions, feeds, tokens, passes, warmup)
        runs_per_pass = len(feeds)
        first_tps = None
        for path, ms in zip(files, times, strict=True):
            n_pass = len(ms) // runs_per_pass
            total_s = sum(ms) / 1e3
            tps = n_pass * sum(tokens) / total_s
            first_tps = first_tps or tps
            srt = sorted(ms)
            rows.append(
                {
                    "model": str(path),
                    "batch_size": b,
                    "threads": threads,
                    "sentences": len(sentences),
                    "tokens": sum(tokens),
                    "runs": len(ms),
                    "p50_ms": percentile(srt, 50),
                    "p90_ms": percentile(srt, 90),
                    "tokens_per_s": tps,
                    "sentences_per_s": n_pass * len(sentences) / total_s,
                    "speedup": tps / first_tps,
                }
            )
    return {
        "results": rows,
        "machine": machine_info(),
        "config": {"batch_sizes": list(batch_sizes), "threads": threads, "passes": passes},
    }
