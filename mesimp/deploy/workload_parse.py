"""bench's workload for dependency parsers: parse a set of sentences, loop and scorer.

A parser's cost is the whole transition loop, not one ``session.run``: per sentence
about ``2n`` steps, each building the 48 features of every unfinished configuration in
Python and scoring them in onnxruntime (``mesimp.data.parse_decode``). So a *run* here
is the parse of one batch of ``batch_size`` sentences advancing together (batch 1:
one sentence at a time, one ``session.run`` per transition), and a *pass* parses every
sentence of ``--conllu`` once. Rows report ``sentences_per_s`` (also as
``throughput``), ``tokens_per_s`` and the UAS/LAS of the parses (every token counted,
punctuation included), so a smaller or int8 scorer's speed comes with its accuracy.

The models are timed interleaved, pass by pass, the order alternating; each model
encodes words with the vocabularies stored in its own file (``parser_vocabs``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from mesimp.data.parse_decode import attachment_scores, parse
from mesimp.data.parse_features import ParserVocabs
from mesimp.data.parsing import read_trees
from mesimp.deploy.export_parser import VOCABS_KEY, session_scorer
from mesimp.deploy.timing import percentile
from mesimp.deploy.workload import Feeds, Workload
from mesimp.errors import BadInputError, DataError

__all__ = ["DEFAULT_PARSE_BATCHES", "ParseWorkload"]

DEFAULT_PARSE_BATCHES = (1, 256)
MAX_AUTO_PASSES = 5  # repeat=None: passes until ~AUTO_BUDGET_S, at most this many


class ParseWorkload(Workload):
    """Dependency parsers (``kind`` ``"parser"``, int64 ``[batch, 48]`` feature ids)."""

    model_keys = ("path", "macs", "params", "size_bytes")
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
            raise BadInputError("--data is image data; give parsers --conllu FILE")
        if conllu is None:
            raise BadInputError("a parser benchmark parses sentences: give --conllu FILE")
        self.batch_sizes = batch_sizes or list(DEFAULT_PARSE_BATCHES)
        self.vocabs: list[ParserVocabs] = []
        for p, info in zip(paths, infos, strict=True):
            raw = (info.get("metadata") or {}).get(VOCABS_KEY)
            try:
                self.vocabs.append(ParserVocabs.from_dict(json.loads(raw)))
            except (TypeError, ValueError, KeyError, DataError) as e:
                raise BadInputError(
                    f"{p}: no usable '{VOCABS_KEY}' metadata (export parsers with mesimp "
                    f"export): {e}"
                ) from e
        sents = read_trees(conllu, 10_000)
        self.sentences = sents[:sentences] if sentences is not None else sents
        self.source = str(conllu)
        self.tokens = sum(len(s) for s in self.sentences)
        self.paths = [str(p) for p in paths]
        self.scores: dict[str, dict[str, float]] = {}
        self.batch = self.batch_sizes[0]

    def prepare(self, threads: list[int]) -> dict[int, list[Any]]:
        return {}  # the sentences were read up front

    def feeds(self, batch: int) -> Feeds:
        self.batch = batch  # a run is the parse of a batch: nothing to feed up front
        return Feeds([])

    def _pass(self, i: int, scorer: Any, times: list[float]) -> None:
        """Parse every sentence once with model ``i``, timing each batch; keep scores."""
        clock = time.perf_counter
        sents, b = self.sentences, self.batch
        parses = []
        for start in range(0, len(sents), b):
            t0 = clock()
            parses.extend(parse(scorer, sents[start : start + b], self.vocabs[i]))
            times.append((clock() - t0) * 1e3)
        self.scores[self.paths[i]] = attachment_scores(parses, sents)

    def time(
        self, sessions: list[Any], feeds: Feeds, repeat: int | None, warmup: int
    ) -> tuple[list[list[float]], int]:
        scorers = [session_scorer(s) for s in sessions]
        for i, scorer in enumerate(scorers):  # warm-up: the first few sentences
            for _ in range(warmup):
                parse(scorer, self.sentences[: max(self.batch, 1)][:8], self.vocabs[i])
        times: list[list[float]] = [[] for _ in sessions]
        passes = repeat
        if passes is None:  # one pass, then more while they fit the budget
            for i, scorer in enumerate(scorers):
                self._pass(i, scorer, times[i])
            slowest = max(sum(t) for t in times) / 1e3
            from mesimp.deploy.timing import AUTO_BUDGET_S

            passes = int(min(MAX_AUTO_PASSES, max(1, AUTO_BUDGET_S // max(slowest, 1e-6))))
            passes -= 1
            done = 1
        else:
            done = 0
        order = list(range(len(sessions)))
        for r in range(passes):
            for i in order if r % 2 == 0 else order[::-1]:
                self._pass(i, scorers[i], times[i])
        return times, done + passes

    def row(
        self, model: str, batch: int, threads: int, times_ms: list[float], repeats: int
    ) -> dict[str, Any]:
        srt = sorted(times_ms)
        total_s = sum(srt) / 1e3
        n, tokens = len(self.sentences), self.tokens
        sps = repeats * n / total_s if total_s > 0 else math.inf
        s = self.scores.get(model, {})
        return {
            "model": model,
            "mode": "parse",
            "batch_size": batch,
            "threads": threads,
            "p50_ms": percentile(srt, 50),
            "p90_ms": percentile(srt, 90),
            "p99_ms": percentile(srt, 99),
            "mean_ms": total_s * 1e3 / len(srt),
            "runs": len(srt),
            "passes": repeats,
            "sentences": n,
            "tokens": tokens,
            "throughput": sps,
            "sentences_per_s": sps,
            "tokens_per_s": repeats * tokens / total_s if total_s > 0 else math.inf,
            "uas": s.get("uas"),
            "las": s.get("las"),
        }

    def speedup(self, row: dict[str, Any], first: dict[str, Any]) -> float:
        return row["sentences_per_s"] / first["sentences_per_s"]

    def config(self) -> dict[str, Any]:
        n = len(self.sentences)
        return {
            "sentences": n,
            "tokens": self.tokens,
            "mean_length": self.tokens / n if n else 0.0,
            "throughput": "sentences_per_s = sentences / total timed time (transition "
            "loop in Python + scorer in onnxruntime)",
            "run": "the parse of one batch of batch_size sentences advancing together",
            "repeat_unit": "passes over the sentences",
            "attachment_scores": "all tokens, punctuation included",
        }
