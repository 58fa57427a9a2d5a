"""bench's workload for LSTM taggers: tag a whole set of sentences of varying length.

A tagger's cost per call depends on the sentence length, so timing one fixed batch
would say little. Instead every configuration tags the same sentence set: at batch 1
(``mode: "decode"``) one ``session.run`` per sentence, every sentence in turn; at other
batch sizes (``mode: "batch"``) sentences bucketed by length into zero-padded batches.
``repeat`` counts passes over the set (``None``: about ``timing.AUTO_BUDGET_S`` of runs
per model, 1 to ``timing.MAX_AUTO_PASSES`` passes), interleaved by
``timing.time_passes``. ``tokens_per_s`` = real tokens / total timed time; ``speedup``
is this model's tokens/s over the first model's (the same runs, so a ratio of total
times).

Sentence lengths come from a CoNLL-U file or a fixed EWT-like distribution; word ids
are uniform random, since an LSTM's cost does not depend on which words it reads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.timing import percentile, time_passes
from mesimp.deploy.workload import Feeds, Workload
from mesimp.errors import BadInputError

__all__ = ["DEFAULT_SENTENCES", "SentenceWorkload", "sentence_lengths"]

# Sentences without a --conllu file.
DEFAULT_SENTENCES = 500
# Synthetic sentence lengths: log-normal, fitted to UD English EWT (dev and test: mean
# 12.1-12.6 words, median 9-10, 90th percentile 26, longest 81): these give mean 12.6.
_LEN_MU, _LEN_SIGMA, _MAX_LEN = 2.1, 0.95, 160


def sentence_lengths(
    conllu: str | os.PathLike | None = None, sentences: int | None = None
) -> tuple[list[int], str | None]:
    """Sentence lengths for a tagger benchmark, and their source (the file, or None).

    From ``conllu`` (its first ``sentences``), else ``sentences`` (default
    ``DEFAULT_SENTENCES``) lengths drawn from a fixed log-normal fitted to UD English EWT
    (seed 0, 1 to 160 words), so runs on any machine time the same workload.
    """
    if conllu is not None:
        from mesimp.data.conllu import iter_conllu

        lengths = []
        for s in iter_conllu(conllu):  # malformed files: a one-line DataError
            lengths.append(len(s))
            if sentences is not None and len(lengths) >= sentences:
                break
        return lengths, str(conllu)
    n = sentences or DEFAULT_SENTENCES
    draws = np.random.default_rng(0).lognormal(_LEN_MU, _LEN_SIGMA, n)
    return [int(v) for v in np.clip(np.rint(draws), 1, _MAX_LEN)], None


class SentenceWorkload(Workload):
    """LSTM taggers (``kind`` ``"tagger"``, int64 ``[batch, seq]`` word ids)."""

    model_keys = ("path", "macs", "params", "size_bytes", "vocab_size")
    optional_model_keys = ("hidden_sizes", "quantization", "int8_mode")

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
        if data is not None:
            raise BadInputError("--data is image data; give LSTM taggers --conllu FILE")
        self.batch_sizes = batch_sizes or [1]
        self.lengths, self.source = sentence_lengths(conllu, sentences)
        if not self.lengths:
            raise BadInputError(f"{conllu}: no sentences to tag")
        name = infos[0]["input"]["name"]
        for p, info in zip(paths[1:], infos[1:], strict=True):
            if info["input"]["name"] != name:
                raise BadInputError(
                    f"input names differ: {paths[0]} takes {name!r}, {p} takes "
                    f"{info['input']['name']!r}; bench compares models of the same task"
                )
        for p, info in zip(paths, infos, strict=True):
            fixed, seq = info["input"].get("batch"), info["input"]["shape"][0]
            if fixed is not None and any(b != fixed for b in self.batch_sizes):
                raise BadInputError(
                    f"{p} has a fixed batch size {fixed}; use --batch-sizes {fixed}"
                )
            if seq is not None:
                raise BadInputError(
                    f"{p} has a fixed sequence length {seq}; it cannot tag sentences"
                )
            if info.get("vocab_size") is None:
                raise BadInputError(
                    f"{p}: no embedding lookup of {name!r} and no vocab_size metadata"
                )
        self.name: str = name
        self.vocab: int = min(info["vocab_size"] for info in infos)  # ids valid for every model
        self.columns = _feature_columns(paths, infos)
        self.total_tokens = sum(self.lengths)

    def prepare(self, threads: list[int]) -> dict[int, list[Any]]:
        return {}  # the sentence lengths are all there is to load

    def feeds(self, batch: int) -> Feeds:
        feeds, tokens = _tagger_runs(self.name, self.lengths, self.vocab, batch, self.columns)
        return Feeds(feeds, tokens)

    def time(
        self, sessions: list[Any], feeds: Feeds, repeat: int | None, warmup: int
    ) -> tuple[list[list[float]], int]:
        assert feeds.tokens is not None
        times = time_passes(sessions, feeds.feeds, feeds.tokens, repeat, warmup)
        return times, len(times[0]) // len(feeds.feeds)

    def row(
        self, model: str, batch: int, threads: int, times_ms: list[float], repeats: int
    ) -> dict[str, Any]:
        passes, sentences, tokens = repeats, len(self.lengths), self.total_tokens
        srt = sorted(times_ms)
        total_s = sum(srt) / 1e3
        row: dict[str, Any] = {
            "model": model,
            "mode": "decode" if batch == 1 else "batch",
            "batch_size": batch,
            "threads": threads,
            "p50_ms": percentile(srt, 50),
            "p90_ms": percentile(srt, 90),
            "p99_ms": percentile(srt, 99),
            "mean_ms": total_s * 1e3 / len(srt),
            "runs": len(srt),
            "passes": passes,
            "sentences": sentences,
            "tokens": tokens,
            "tokens_per_s": passes * tokens / total_s if total_s > 0 else math.inf,
            "sentences_per_s": passes * sentences / total_s if total_s > 0 else math.inf,
        }
        if batch == 1:
            row["p50_ms_per_sentence"] = row["p50_ms"]
            row["p99_ms_per_sentence"] = row["p99_ms"]
        return row

    def speedup(self, row: dict[str, Any], first: dict[str, Any]) -> float:
        return row["tokens_per_s"] / first["tokens_per_s"]

    def config(self) -> dict[str, Any]:
        total, n = self.total_tokens, len(self.lengths)
        return {
            "sentences": n,
            "tokens": total,
            "mean_length": total / n,
            "word_ids": f"uniform random in [1, {self.vocab}) (seed 0)",
            "throughput": "tokens_per_s = real tokens / total timed time",
            "repeat_unit": "passes over the sentences",
        }


def _feature_columns(paths: list[Path], infos: list[dict[str, Any]]) -> list[int] | None:
    """Table sizes of a feature tagger's extra input columns (the smallest over the
    models, so ids are valid for each), or None for word-id-only taggers."""
    shapes = {len(info["input"]["shape"]) for info in infos}
    if shapes == {1}:
        return None
    cols = {info["input"]["shape"][1] for info in infos if len(info["input"]["shape"]) == 2}
    if len(shapes) > 1 or len(cols) > 1:
        raise BadInputError(
            "the taggers take different inputs (word ids only vs word + feature ids); "
            "bench compares models of the same task"
        )
    sizes = [info.get("feature_vocab_sizes") for info in infos]
    n = cols.pop() - 1
    for p, s in zip(paths, sizes, strict=True):
        if not isinstance(s, list) or len(s) != n:
            raise BadInputError(f"{p}: no feature_vocab_sizes metadata for its {n} feature ids")
    return [min(s[i] for s in sizes) for i in range(n)]


def _tagger_runs(
    name: str, lengths: list[int], vocab: int, batch: int, columns: list[int] | None = None
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Feeds and their real-token counts. Word ids are uniform in ``[1, vocab)`` (seed 0):
    an LSTM's cost does not depend on which words it reads, so no vocabulary is needed.
    Batch 1: one sentence per run, in order. Larger batches: sentences sorted by length
    and cut into groups of ``batch``, each padded with 0 to its longest (how a batch
    tagger buckets its input)."""
    rng = np.random.default_rng(0)
    low = 1 if vocab > 1 else 0
    sents = [rng.integers(low, max(vocab, 1), n, dtype=np.int64) for n in lengths]
    if columns:  # a feature tagger: [n, 1 + features], each column below its table's size
        sents = [
            np.stack(
                [s, *(rng.integers(min(1, v - 1), max(v, 1), len(s)) for v in columns)], -1
            ).astype(np.int64)
            for s in sents
        ]
    if batch == 1:
        return [{name: s[None, :]} for s in sents], list(lengths)
    order = sorted(range(len(sents)), key=lambda i: lengths[i])
    feeds, tokens = [], []
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        x = np.zeros((len(idx), max(lengths[i] for i in idx), *sents[0].shape[1:]), np.int64)
        for r, i in enumerate(idx):
            x[r, : lengths[i]] = sents[i]
        feeds.append({name: x})
        tokens.append(sum(lengths[i] for i in idx))
    return feeds, tokens
