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
  (``_bench_tagger``): ``mode: "decode"`` at batch 1 runs one sentence per
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

Models of different kinds are refused in one call (one line).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.int8 import probe_u8s8_exact
from mesimp.deploy.onnx_graph import KIND_NAMES, graph_macs, load_model_info
from mesimp.deploy.ort_errors import one_line, ort_errors, ort_message
from mesimp.deploy.tables import format_table, plot, write_markdown
from mesimp.deploy.tables import to_markdown as to_markdown  # re-exported
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

DEFAULT_BATCH_SIZES = (1, 32, 256, 4096)
DEFAULT_THREADS = (1, 2)
MAX_ROUNDS = 10
# With repeat=None, each model gets about this much timed wall time per configuration,
# within [MIN_AUTO_REPEAT, MAX_AUTO_REPEAT] runs.
AUTO_BUDGET_S = 0.5
MIN_AUTO_REPEAT = 20
MAX_AUTO_REPEAT = 1000
# Sequence-model benchmarks (LSTM taggers): sentences without a --conllu file.
DEFAULT_SENTENCES = 500
# Synthetic sentence lengths: log-normal, fitted to UD English EWT (dev and test: mean
# 12.1-12.6 words, median 9-10, 90th percentile 26, longest 81): these give mean 12.6.
_LEN_MU, _LEN_SIGMA, _MAX_LEN = 2.1, 0.95, 160
MAX_AUTO_PASSES = 20


# -- sessions and inputs -----------------------------------------------------------------------
def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Worker threads of a session keep spinning after its run; with several sessions
    # timed in turn on the same cores, that spinning stole the second core from the
    # next model (measured: a 784-80-64 MLP at batch 256 and 2 threads took 0.163 ms
    # interleaved with the dense model vs 0.087 ms alone). No spinning = fair turns.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BadInputError(f"{path}: onnxruntime cannot load it ({ort_message(e)})") from e


def _batch(pool: np.ndarray, b: int) -> np.ndarray:
    """``b`` rows from ``pool``, tiled when ``b`` exceeds it (C-contiguous float32)."""
    reps = -(-b // len(pool))
    x = np.concatenate([pool] * reps)[:b] if reps > 1 else pool[:b]
    return np.ascontiguousarray(x, dtype=np.float32)


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile (a value that was actually measured)."""
    idx = max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)
    return sorted_ms[idx]


def _accuracy(session: Any, x: np.ndarray, y: np.ndarray, batch: int = 2048) -> float:
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(y), batch):
        out = session.run(None, {name: x[i : i + batch]})[0]
        correct += int((out.reshape(len(out), -1).argmax(-1) == y[i : i + batch]).sum())
    return correct / len(y)


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": affinity,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "int8_u8s8_exact": probe_u8s8_exact(),
    }


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise BadInputError(f"{what} must be positive integers, got {v!r}")
        out.append(int(v))
    if not out:
        raise BadInputError(f"{what}: give at least one value")
    return list(dict.fromkeys(out))  # unique, in the given order


# -- the benchmark -----------------------------------------------------------------------------
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
    the warm-up time (about ``AUTO_BUDGET_S`` per model, 20 to 1000 runs). ``warmup``:
    untimed runs per model before timing. ``data``: an image dataset (see
    ``mesimp.data.load_image_dataset``) used for the inputs (test images, tiled for
    large batches) and for accuracy; without it inputs are uniform random in [0, 1).
    ``batch_sizes``: ``None`` means ``DEFAULT_BATCH_SIZES`` (taggers: ``(1,)``).

    The kind of model is read from its input (``load_model_info``): MLPs and LSTM row
    classifiers (``[b, rows, width]`` images) are timed per batch as above; LSTM taggers
    tag whole sentences (``_bench_tagger``; ``conllu``, ``sentences``). One call takes
    models of one kind.
    """
    if not models:
        raise BadInputError("give at least one ONNX model to benchmark")
    if batch_sizes is not None:
        batch_sizes = _positive_ints(batch_sizes, "batch sizes")
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
    if kind0 == "tagger":
        if data is not None:
            raise BadInputError("--data is image data; give LSTM taggers --conllu FILE")
        result = _bench_tagger(
            paths,
            infos,
            conllu,
            batch_sizes or [1],
            threads,
            repeat,
            warmup,
            progress,
            sentences,
        )
        result["warnings"] = int8_warnings(infos)
        return result
    if conllu is not None or sentences is not None:
        raise BadInputError(
            f"--conllu and --sentences are for LSTM taggers; {paths[0]} is {KIND_NAMES[kind0]}"
        )
    result = _bench_batches(
        paths,
        infos,
        data,
        batch_sizes or list(DEFAULT_BATCH_SIZES),
        threads,
        repeat,
        warmup,
        progress,
    )
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


def _bench_batches(
    paths: list[Path],
    infos: list[dict[str, Any]],
    data: str | os.PathLike | None,
    batch_sizes: list[int],
    threads: list[int],
    repeat: int | None,
    warmup: int,
    progress: bool | None,
) -> dict[str, Any]:
    """``bench`` for MLPs and row classifiers: every batch size, interleaved."""
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
        if fixed is not None and any(b != fixed for b in batch_sizes):
            raise BadInputError(f"{p} has a fixed batch size {fixed}; use --batch-sizes {fixed}")
    shape = tuple(sig0["shape"])
    features = math.prod(shape)

    ds = None
    opened: dict[int, list[Any]] = {}  # thread count -> sessions opened ahead of the loop
    if data is not None:
        from mesimp.data import load_image_dataset

        ds = load_image_dataset(data, dev_size=0)  # only the test split is used
        if ds.x_test.shape[1] != features:
            raise BadInputError(
                f"the models take {features} input features ({sig0['name']!r} {list(shape)}) "
                f"but the data at {ds.source} has {ds.x_test.shape[1]} per example"
            )
        if len(ds.y_test) == 0:
            raise BadInputError(f"the data at {ds.source} has an empty test split")
        pool = ds.x_test.numpy().reshape(-1, *shape)
    else:
        # Open the models before allocating their inputs: onnxruntime refuses a graph whose
        # declared input does not fit its weights, and such a (forged) input shape must
        # not make bench allocate gigabytes first. The sessions are reused below.
        opened[threads[0]] = [_session(p, threads[0]) for p in paths]
        try:
            pool = np.random.default_rng(0).random((max(batch_sizes), *shape), dtype=np.float32)
        except (MemoryError, ValueError) as e:  # a huge or negative declared input shape
            raise BadInputError(
                f"{paths[0]}: cannot allocate inputs of shape {[max(batch_sizes), *shape]} "
                f"({one_line(e)})"
            ) from e

    macs0 = infos[0]["macs"]
    if ds is not None:
        x_all = np.ascontiguousarray(ds.x_test.numpy().reshape(-1, *shape), dtype=np.float32)
        y_all = ds.y_test.numpy()
        for p, info in zip(paths, infos, strict=True):
            try:
                info["accuracy"] = _accuracy(_session(p, max(threads)), x_all, y_all)
            except ort_errors() as e:  # loads, but fails to run (e.g. a forged Gemm attribute)
                raise BadInputError(f"{p}: onnxruntime cannot run it ({ort_message(e)})") from e

    results: list[dict[str, Any]] = []
    bar = progress_bar(
        total=len(threads) * len(batch_sizes), progress=progress, desc="bench", unit="config"
    )
    used_repeats: dict[tuple[int, int], int] = {}
    try:
        for t in threads:
            sessions = opened.pop(t, None) or [_session(p, t) for p in paths]
            name = sig0["name"]
            for b in batch_sizes:
                feed = {name: _batch(pool, b)}
                bar.set_postfix_str(_config_name(b, t))
                try:
                    times = _time_interleaved(sessions, feed, repeat, warmup)
                except ort_errors() as e:  # loads, but fails to run (e.g. a forged attribute)
                    names = ", ".join(map(str, paths))
                    raise BadInputError(
                        f"onnxruntime cannot run {names} at batch size {b} ({ort_message(e)})"
                    ) from e
                used_repeats[(b, t)] = len(times[0])
                p50_first = None
                for i, (p, info) in enumerate(zip(paths, infos, strict=True)):
                    row = _row(str(p), b, t, times[i])
                    p50_first = row["p50_ms"] if i == 0 else p50_first
                    row["speedup"] = p50_first / row["p50_ms"]
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
        m = {k: info[k] for k in ("path", "macs", "params", "size_bytes")}
        for k in ("hidden_sizes", "quantization", "int8_mode", "accuracy"):
            if k in info:
                m[k] = info[k]
        models_out.append(m)
    reps = sorted(set(used_repeats.values()))
    return {
        "results": results,
        "models": models_out,
        "machine": machine_info(),
        "config": {
            "batch_sizes": batch_sizes,
            "threads": threads,
            "repeat": repeat if repeat is not None else f"auto ({reps[0]}..{reps[-1]})",
            "warmup": warmup,
            "rounds": min(MAX_ROUNDS, min(used_repeats.values())),
            "data": ds.source if ds is not None else None,
            "throughput": "batch_size / p50 latency (examples/s)",
        },
    }


def _time_interleaved(
    sessions: list[Any], feed: dict[str, np.ndarray], repeat: int | None, warmup: int
) -> list[list[float]]:
    """Per session, ``repeat`` wall times (ms) of ``session.run``, measured round-robin."""
    clock = time.perf_counter
    warm_s = []
    for s in sessions:
        t_min = math.inf
        for _ in range(max(warmup, 1)):
            t0 = clock()
            s.run(None, feed)
            t_min = min(t_min, clock() - t0)
        warm_s.append(t_min)
    if repeat is None:
        per_run = max(max(warm_s), 1e-6)
        repeat = int(min(MAX_AUTO_REPEAT, max(MIN_AUTO_REPEAT, AUTO_BUDGET_S / per_run)))
    return _round_robin(sessions, [feed], [0] * repeat)


def _round_robin(
    sessions: list[Any], feeds: list[dict[str, np.ndarray]], plan: list[int]
) -> list[list[float]]:
    """Per session, the wall time (ms) of ``session.run(feeds[k])`` for every k of
    ``plan``: the plan is cut into ``MAX_ROUNDS`` consecutive slices and each round runs
    one slice per model, the order alternating, after one untimed re-warm run (caches
    are cold after the other models ran). Interleaving is what makes ratios taken in
    one run robust to a noisy machine."""
    clock = time.perf_counter
    rounds = min(MAX_ROUNDS, len(plan))
    cuts = [len(plan) * r // rounds for r in range(rounds + 1)]
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(rounds):
        block = plan[cuts[r] : cuts[r + 1]]
        for i in order if r % 2 == 0 else order[::-1]:
            s = sessions[i]
            s.run(None, feeds[block[0]])
            for k in block:
                t0 = clock()
                s.run(None, feeds[k])
                times[i].append((clock() - t0) * 1e3)
    return times


def _config_name(batch: int, threads: int) -> str:
    return f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}"


def _row(model: str, batch: int, threads: int, times_ms: list[float]) -> dict[str, Any]:
    srt = sorted(times_ms)
    p50 = _percentile(srt, 50)
    return {
        "model": model,
        "batch_size": batch,
        "threads": threads,
        "p50_ms": p50,
        "p90_ms": _percentile(srt, 90),
        "p99_ms": _percentile(srt, 99),
        "mean_ms": sum(srt) / len(srt),
        "runs": len(srt),
        "throughput": batch / (p50 / 1e3),
    }


# -- taggers ----------------------------------------------------------------------------------
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


def _tagger_runs(
    name: str, lengths: list[int], vocab: int, batch: int
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Feeds and their real-token counts. Word ids are uniform in ``[1, vocab)`` (seed 0):
    an LSTM's cost does not depend on which words it reads, so no vocabulary is needed.
    Batch 1: one sentence per run, in order. Larger batches: sentences sorted by length
    and cut into groups of ``batch``, each padded with 0 to its longest (how a batch
    tagger buckets its input)."""
    rng = np.random.default_rng(0)
    low = 1 if vocab > 1 else 0
    sents = [rng.integers(low, max(vocab, 1), n, dtype=np.int64) for n in lengths]
    if batch == 1:
        return [{name: s[None, :]} for s in sents], list(lengths)
    order = sorted(range(len(sents)), key=lambda i: lengths[i])
    feeds, tokens = [], []
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        x = np.zeros((len(idx), max(lengths[i] for i in idx)), np.int64)
        for r, i in enumerate(idx):
            x[r, : lengths[i]] = sents[i]
        feeds.append({name: x})
        tokens.append(sum(lengths[i] for i in idx))
    return feeds, tokens


def _bench_tagger(
    paths: list[Path],
    infos: list[dict[str, Any]],
    conllu: str | os.PathLike | None,
    batch_sizes: list[int],
    threads: list[int],
    repeat: int | None,
    warmup: int,
    progress: bool | None,
    sentences: int | None = None,
) -> dict[str, Any]:
    """``bench`` for LSTM taggers: tag whole sentences, models interleaved.

    Batch 1 is ``mode: "decode"``: one ``session.run`` per sentence, every sentence of
    the set timed in turn. Other batch sizes are ``mode: "batch"``: sentences bucketed by
    length into padded batches. ``repeat`` counts passes over the set (``None``: about
    ``AUTO_BUDGET_S`` of runs per model, 1 to ``MAX_AUTO_PASSES`` passes). Rounds
    interleave the models as in ``_time_interleaved``, each round a slice of the passes.
    ``tokens_per_s`` = real tokens / total timed time; ``speedup`` is this model's
    tokens/s over the first model's (the same runs, so a ratio of total times).
    """
    lengths, source = sentence_lengths(conllu, sentences)
    if not lengths:
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
        if fixed is not None and any(b != fixed for b in batch_sizes):
            raise BadInputError(f"{p} has a fixed batch size {fixed}; use --batch-sizes {fixed}")
        if seq is not None:
            raise BadInputError(f"{p} has a fixed sequence length {seq}; it cannot tag sentences")
        if info.get("vocab_size") is None:
            raise BadInputError(f"{p}: no embedding lookup of {name!r} and no vocab_size metadata")
    vocab = min(info["vocab_size"] for info in infos)  # ids valid for every model
    total_tokens = sum(lengths)
    macs0 = infos[0]["macs"]
    results: list[dict[str, Any]] = []
    used: list[int] = []  # passes per configuration
    runs: list[int] = []  # timed runs per model per configuration
    bar = progress_bar(
        total=len(threads) * len(batch_sizes), progress=progress, desc="bench", unit="config"
    )
    try:
        for t in threads:
            sessions = [_session(p, t) for p in paths]
            for b in batch_sizes:
                feeds, tokens = _tagger_runs(name, lengths, vocab, b)
                bar.set_postfix_str(_config_name(b, t))
                try:
                    times = _time_runs(sessions, feeds, tokens, repeat, warmup)
                except ort_errors() as e:
                    names = ", ".join(map(str, paths))
                    raise BadInputError(
                        f"onnxruntime cannot run {names} at batch size {b} ({ort_message(e)})"
                    ) from e
                passes = len(times[0]) // len(feeds)
                used.append(passes)
                runs.append(len(times[0]))
                first = None
                for i, (p, info) in enumerate(zip(paths, infos, strict=True)):
                    row = _tagger_row(str(p), b, t, times[i], passes, len(lengths), total_tokens)
                    first = row["tokens_per_s"] if i == 0 else first
                    row["speedup"] = row["tokens_per_s"] / first
                    row["mac_ratio"] = (macs0 / info["macs"]) if info["macs"] else None
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
        m = {k: info[k] for k in ("path", "macs", "params", "size_bytes", "vocab_size")}
        for k in ("hidden_sizes", "quantization", "int8_mode"):
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
            "data": source,
            "sentences": len(lengths),
            "tokens": total_tokens,
            "mean_length": total_tokens / len(lengths),
            "word_ids": f"uniform random in [1, {vocab}) (seed 0)",
            "throughput": "tokens_per_s = real tokens / total timed time",
            "repeat_unit": "passes over the sentences",
        },
    }


def _time_runs(
    sessions: list[Any],
    feeds: list[dict[str, np.ndarray]],
    tokens: list[int],
    passes: int | None,
    warmup: int,
) -> list[list[float]]:
    """Per session, the wall time (ms) of every run of ``passes`` passes over ``feeds``,
    measured round-robin (``_round_robin``)."""
    clock = time.perf_counter
    per_token = []
    for s in sessions:
        t_run = 0.0
        n_tok = 0
        for j in range(max(warmup, 1)):
            k = j % len(feeds)
            t0 = clock()
            s.run(None, feeds[k])
            t_run += clock() - t0
            n_tok += tokens[k]
        per_token.append(t_run / max(n_tok, 1))
    if passes is None:
        per_pass = max(max(per_token) * sum(tokens), 1e-6)
        passes = int(min(MAX_AUTO_PASSES, max(1, AUTO_BUDGET_S // per_pass)))
    plan = [k for _ in range(passes) for k in range(len(feeds))]
    return _round_robin(sessions, feeds, plan)


def _tagger_row(
    model: str,
    batch: int,
    threads: int,
    times_ms: list[float],
    passes: int,
    sentences: int,
    tokens: int,
) -> dict[str, Any]:
    srt = sorted(times_ms)
    total_s = sum(srt) / 1e3
    row: dict[str, Any] = {
        "model": model,
        "mode": "decode" if batch == 1 else "batch",
        "batch_size": batch,
        "threads": threads,
        "p50_ms": _percentile(srt, 50),
        "p90_ms": _percentile(srt, 90),
        "p99_ms": _percentile(srt, 99),
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
