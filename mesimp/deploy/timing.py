"""How bench times onnxruntime sessions fairly on a noisy machine, and on what machine.

Every number bench reports comes from here:

* ``timing_session``: sessions set up like ``onnxruntime_perf_test`` on CPU (fixed
  ``intra_op_num_threads``, one inter-op thread, sequential, all graph optimizations)
  and with spinning off, so idle sessions do not steal cores from the one being timed.
* ``round_robin``: the models are timed in the same loop, ``MAX_ROUNDS`` rounds of one
  slice of the plan per model, the order alternating, each after an untimed re-warm
  run. Noise then hits all models alike, which is what makes ratios robust.
* ``time_repeats`` (one fixed input, ``repeat`` runs) and ``time_passes`` (passes over
  a list of inputs, the taggers' sentences) choose the plan, with ``repeat=None`` sized
  from the warm-up time to about ``AUTO_BUDGET_S`` per model.
* ``percentile``: nearest-rank, so a reported latency is one that was measured.
* ``machine_info`` (and ``cpu_model``): the CPU and library versions the timings
  belong to.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from mesimp.deploy.int8 import probe_u8s8_exact
from mesimp.deploy.ort_errors import ort_message
from mesimp.errors import BadInputError
from mesimp.nn import kernels

__all__ = [
    "AUTO_BUDGET_S",
    "MAX_ROUNDS",
    "cpu_model",
    "machine_info",
    "percentile",
    "round_robin",
    "time_passes",
    "time_repeats",
    "timing_session",
]

MAX_ROUNDS = 10
# With repeat=None, each model gets about this much timed wall time per configuration,
# within [MIN_AUTO_REPEAT, MAX_AUTO_REPEAT] runs.
AUTO_BUDGET_S = 0.5
MIN_AUTO_REPEAT = 20
MAX_AUTO_REPEAT = 1000
# Taggers with repeat=None: at most this many passes over the sentences.
MAX_AUTO_PASSES = 20


def timing_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session of ``path`` set up for timing with ``threads`` threads."""
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


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile (a value that was actually measured)."""
    idx = max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)
    return sorted_ms[idx]


def time_repeats(
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
    return round_robin(sessions, [feed], [0] * repeat)


def time_passes(
    sessions: list[Any],
    feeds: list[dict[str, np.ndarray]],
    tokens: list[int],
    passes: int | None,
    warmup: int,
) -> list[list[float]]:
    """Per session, the wall time (ms) of every run of ``passes`` passes over ``feeds``,
    measured round-robin (``round_robin``)."""
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
    return round_robin(sessions, feeds, plan)


def round_robin(
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


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere, which
    on Linux is usually empty): timings from different CPUs must not be mixed up."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """The ``machine`` object of a bench result: CPU, platform and library versions."""
    import onnxruntime as ort

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": affinity,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "int8_u8s8_exact": probe_u8s8_exact(),
        # which meProp path training takes here (bench times inference, which has none;
        # it does not start a first-use build to find out)
        "meprop_kernel": kernels.kernel_name(allow_build=False),
    }
