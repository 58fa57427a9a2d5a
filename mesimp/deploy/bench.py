"""onnxruntime CPU benchmark of one or more ONNX models: latency, throughput, accuracy.

``bench([a.onnx, b.onnx], data=...)`` times every model at every (batch size, thread
count) and returns the ``bench --json`` object (schema below). What is measured:

* **Sessions** like ``onnxruntime_perf_test`` on CPU: ``intra_op_num_threads`` fixed to
  the thread count, ``inter_op_num_threads=1``, sequential execution, all graph
  optimizations on. Each timed sample is one ``session.run`` on a prepared batch
  (host wall time with ``time.perf_counter``; input conversion is not timed).
* **No spinning.** ``session.intra_op.allow_spinning = 0``: idle sessions' worker
  threads would otherwise spin and steal cores from the model being timed.
* **Interleaving.** Machines are noisy, so the models of one (batch, threads)
  configuration are measured in the same loop: ``rounds`` rounds, each running every
  model for a block of ``repeat / rounds`` timed runs after one untimed run (which
  re-warms the caches the other models just used); the model order alternates every
  round. Noise then hits all models alike.
* **Latency** ``p50_ms``/``p90_ms``/``p99_ms`` (nearest-rank percentiles) and
  ``mean_ms`` over all timed runs of a model. **Throughput** is examples per second at
  the *median* latency: ``throughput = batch_size / (p50_ms / 1000)``.
* **speedup** = first model's ``p50_ms`` / this model's ``p50_ms`` at the same batch
  size and threads (so the first model's is 1.0). **mac_ratio** = first model's MACs /
  this model's MACs, where MACs per example are summed from the graph: the weight
  matrix size of every ``Gemm``/``MatMul``/``MatMulInteger`` whose weight is an
  initializer. This works for any ONNX file, quantized ones included.
* **accuracy** (with ``data``): the model's accuracy on the full test set, the same
  value for all of a model's rows.

Schema::

    {"results": [{"model", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms",
                  "mean_ms", "runs", "throughput", "speedup", "mac_ratio", "accuracy"?}],
     "models": [{"path", "macs", "params", "size_bytes", "hidden_sizes"?, "accuracy"?}],
     "machine": {"cpu_count", "affinity_cpus", "cpu_model", "platform", "python",
                 "onnxruntime", "numpy"},
     "config": {"batch_sizes", "threads", "repeat", "warmup", "rounds", "data"}}

Sequence models (the kind is read from the model's input, see ``mesimp.deploy.onnx_graph``):

* **LSTM row classifiers** (float ``[batch, rows, width]``) are timed like MLPs on
  ``[b, rows, width]`` images (rows: fixed in the graph, else the ``steps`` metadata of
  ``mesimp export``, else ``width``); same schema.
* **LSTM taggers** (int64 ``[batch, seq]`` word ids) tag whole sentences
  (``workload_sentences``): ``mode: "decode"`` at batch 1 runs one sentence per
  ``session.run``; ``mode: "batch"`` (other ``batch_sizes``) runs length-bucketed,
  zero-padded batches. Sentence lengths come from ``conllu`` or a fixed EWT-like
  distribution; word ids are uniform in ``[1, vocab)`` (vocab = rows of the embedding
  initializer; the LSTM's cost does not depend on the ids). Rows::

    {"model", "mode", "batch_size", "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
     "runs", "passes", "sentences", "tokens", "tokens_per_s", "sentences_per_s",
     "speedup", "mac_ratio", "p50_ms_per_sentence"?, "p99_ms_per_sentence"?}

  ``p*_ms`` are per run (a sentence in decode mode, then equal to
  ``p*_ms_per_sentence``); ``tokens_per_s`` = real tokens / total timed time;
  ``speedup`` = this model's ``tokens_per_s`` / the first model's; MACs are per token.
  ``config`` adds ``sentences``, ``tokens``, ``mean_length``, ``word_ids`` and
  ``repeat_unit`` (``repeat`` counts passes over the sentences).

* **Dependency parsers** (int64 ``[batch, 48]`` feature ids, ``mesimp export`` of a
  ``parser`` checkpoint) parse the sentences of ``conllu`` (``workload_parse``): the
  transition loop in Python, the scorer in onnxruntime; a run parses ``batch_size``
  sentences together. Rows as for taggers (``mode: "parse"``) plus ``throughput`` =
  ``sentences_per_s`` and the parses' ``uas``/``las``.

Models of different kinds are refused in one call (one line).

Where the parts live: reading the graphs in ``onnx_graph``, sessions and interleaved
timing in ``timing``, the two kinds of input in ``workload_batches`` (fixed-shape
batches) and ``workload_sentences`` (taggers) behind the ``workload.Workload``
interface, the table, Markdown and plot in ``tables``. This module validates the
options, picks the workload and runs the loop they share.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.int8 import probe_u8s8_exact
from mesimp.deploy.onnx_graph import KIND_NAMES, graph_macs, load_model_info
from mesimp.deploy.ort_errors import ort_errors, ort_message
from mesimp.deploy.tables import format_table, plot, write_markdown
from mesimp.deploy.tables import to_markdown as to_markdown  # re-exported
from mesimp.deploy.timing import MAX_ROUNDS, machine_info, timing_session
from mesimp.deploy.workload import Workload
from mesimp.deploy.workload_batches import DEFAULT_BATCH_SIZES as DEFAULT_BATCH_SIZES
from mesimp.deploy.workload_batches import BatchWorkload
from mesimp.deploy.workload_parse import ParseWorkload
from mesimp.deploy.workload_sentences import SentenceWorkload, sentence_lengths
from mesimp.errors import BadInputError
from mesimp.progress import bar as progress_bar
from mesimp.progress import line as progress_line

__all__ = [
    "bench",
    "format_table",
    "graph_macs",
    "load_model_info",
    "plot",
    "sentence_lengths",
    "write_markdown",
]

DEFAULT_THREADS = (1, 2)
# The workload of each input kind (``onnx_graph.KIND_NAMES``); any other kind: batches.
WORKLOADS: dict[str, type[Workload]] = {"tagger": SentenceWorkload, "parser": ParseWorkload}


def bench(
    models: Sequence[str | os.PathLike],
    data: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] | None = None,
    threads: Sequence[int] = DEFAULT_THREADS,
    repeat: int | None = None,
    warmup: int = 5,
    progress: bool | None = None,
    *,
    conllu: str | os.PathLike | None = None,
    sentences: int | None = None,
) -> dict[str, Any]:
    """Time ``models`` with onnxruntime on CPU; returns the ``bench --json`` object.

    ``repeat``: timed runs per model per (batch size, threads); ``None`` picks it from
    the warm-up time (about ``timing.AUTO_BUDGET_S`` per model, 20 to 1000 runs).
    ``warmup``: untimed runs per model before timing. ``data``: an image dataset (see
    ``mesimp.data.load_image_dataset``) used for the inputs (test images, tiled for
    large batches) and for accuracy; without it inputs are uniform random in [0, 1).
    ``batch_sizes``: ``None`` means ``DEFAULT_BATCH_SIZES`` (taggers: ``(1,)``).

    The kind of model is read from its input (``load_model_info``): MLPs and LSTM row
    classifiers (``[b, rows, width]`` images) are timed per batch as above; LSTM taggers
    tag whole sentences (``workload_sentences``; ``conllu``, ``sentences``). One call
    takes models of one kind.
    """
    if not models:
        raise BadInputError("give at least one ONNX model to benchmark")
    sizes = _positive_ints(batch_sizes, "batch sizes") if batch_sizes is not None else None
    threads = _positive_ints(threads, "thread counts")
    if repeat is not None:
        repeat = _positive_ints([repeat], "repeat")[0]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BadInputError(f"warmup must be an integer >= 0, got {warmup!r}")
    if sentences is not None:
        sentences = _positive_ints([sentences], "sentences")[0]

    paths = [Path(m) for m in models]
    infos = [load_model_info(p) for p in paths]
    kind0 = infos[0]["input"]["kind"]
    for p, info in zip(paths[1:], infos[1:], strict=True):
        kind = info["input"]["kind"]
        if kind != kind0:
            raise BadInputError(
                f"cannot bench {KIND_NAMES[kind0]} ({paths[0]}) together with "
                f"{KIND_NAMES[kind]} ({p}); bench each kind of model in its own call"
            )
    workload = WORKLOADS.get(kind0, BatchWorkload)(
        paths,
        infos,
        data=data,
        conllu=conllu,
        sentences=sentences,
        batch_sizes=sizes,
    )
    result = _run(workload, paths, infos, threads, repeat, warmup, progress)
    result["warnings"] = int8_warnings(infos)
    return result


def int8_warnings(infos: Sequence[dict[str, Any]]) -> list[str]:
    """One line per int8 file whose weight format saturates on this CPU (``mesimp.deploy.int8``):
    its predictions here differ from the ones checked at export."""
    risky = [i for i in infos if i.get("int8_portable") is False]
    if not risky or probe_u8s8_exact():
        return []
    return [
        f"{i['path']}: int8 mode {i.get('int8_mode')} saturates on this CPU (no VNNI), so its "
        "outputs here differ from the exported ones; re-export with --int8-mode s7"
        for i in risky
    ]


def _run(
    workload: Workload,
    paths: list[Path],
    infos: list[dict[str, Any]],
    threads: list[int],
    repeat: int | None,
    warmup: int,
    progress: bool | None,
) -> dict[str, Any]:
    """Every (threads, batch size) configuration, all models timed interleaved in it;
    the result object without its ``warnings``."""
    batch_sizes = workload.batch_sizes
    opened = workload.prepare(threads)  # thread count -> sessions opened ahead of the loop
    macs0 = infos[0]["macs"]
    results: list[dict[str, Any]] = []
    used: list[int] = []  # repeat units (runs, or passes) per configuration
    runs: list[int] = []  # timed runs per model per configuration
    bar = progress_bar(
        total=len(threads) * len(batch_sizes), progress=progress, desc="bench", unit="config"
    )
    try:
        for t in threads:
            sessions = opened.pop(t, None) or [timing_session(p, t) for p in paths]
            for b in batch_sizes:
                feeds = workload.feeds(b)
                bar.set_postfix_str(_config_name(b, t))
                try:
                    times, repeats = workload.time(sessions, feeds, repeat, warmup)
                except ort_errors() as e:  # loads, but fails to run (e.g. a forged attribute)
                    names = ", ".join(map(str, paths))
                    raise BadInputError(
                        f"onnxruntime cannot run {names} at batch size {b} ({ort_message(e)})"
                    ) from e
                used.append(repeats)
                runs.append(len(times[0]))
                first: dict[str, Any] = {}
                for i, (p, info) in enumerate(zip(paths, infos, strict=True)):
                    row = workload.row(str(p), b, t, times[i], repeats)
                    first = row if i == 0 else first
                    row["speedup"] = workload.speedup(row, first)
                    row["mac_ratio"] = (macs0 / info["macs"]) if info["macs"] else None
                    if "accuracy" in info:
                        row["accuracy"] = info["accuracy"]
                    results.append(row)
                bar.update(1)
                done = len(results) // len(paths)
                total = len(threads) * len(batch_sizes)
                progress_line(progress, f"bench: {_config_name(b, t)} done ({done}/{total})")
            del sessions
    finally:
        bar.close()

    models_out = []
    for info in infos:
        m = {k: info[k] for k in workload.model_keys}
        for k in workload.optional_model_keys:
            if k in info:
                m[k] = info[k]
        models_out.append(m)
    return {
        "results": results,
        "models": models_out,
        "machine": machine_info(),
        "config": {
            "batch_sizes": batch_sizes,
            "threads": threads,
            "repeat": repeat if repeat is not None else f"auto ({min(used)}..{max(used)})",
            "warmup": warmup,
            "rounds": min(MAX_ROUNDS, min(runs)),
            "data": workload.source,
            **workload.config(),
        },
    }


def _config_name(batch: int, threads: int) -> str:
    return f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}"


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise BadInputError(f"{what} must be positive integers, got {v!r}")
        out.append(int(v))
    if not out:
        raise BadInputError(f"{what}: give at least one value")
    return list(dict.fromkeys(out))  # unique, in the given order
