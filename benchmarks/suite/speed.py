"""Speed: backward-time ratios (training) and onnxruntime speed-ups (inference).

Backward ratio
    ``benchmarks.meprop_speed``'s measurement, reused: the time of ``loss.backward()``
    alone (forward and ``grad = None`` untimed) on fixed random minibatches, every
    variant interleaved in the same rounds, a variant's time = its fastest round, the
    ratio = dense's time / the variant's. It is measured once per comparison on
    freshly built models at each row's configuration (width, k, selection, MSBP), not
    inside training: the training loop has no per-phase timer, and on a shared
    machine the interleaved measurement is the one that survives the noise. The
    whole-step cost (optimizer included) is what the training-time ratio shows.

onnxruntime
    The rows' checkpoints are exported with ``mesimp.export.export_onnx`` (fp32 and
    int8) and timed together in one ``mesimp.bench.bench`` call, so all models are
    interleaved; speed-up = dense P50 / model P50 at the same batch size, thread count
    and precision (int8 against int8 dense, as benchmarks/ort_speed.py does).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.meprop_speed import _Batches, _ratios, backward_runner, interleaved
from mesimp.deploy.bench import bench
from mesimp.deploy.export import export_onnx
from mesimp.models import MLPConfig, build_model
from mesimp.nn import kernels
from mesimp.nn.meprop import MePropConfig
from mesimp.nn.swap import meprop_

BACKWARD_METHOD = (
    "dense backward time / the row's backward time, timed as benchmarks/meprop_speed.py "
    "does (loss.backward() alone, on the kernel path training takes: compiled where "
    "built; variants interleaved in the same rounds, each "
    "variant's fastest round), once per comparison on models built at each row's "
    "configuration (width, k, selection, MSBP), not inside training (the trainer has "
    "no per-phase timer). MLP: random batches of 50; LSTM: random batches of 32 "
    "sentences x 25 words, on copies of the trained models of the first seed. Rows "
    "with phases (meSimp, Torch-Pruning) list one ratio per phase."
)
MLP_BATCH = 50  # the training batch size of comparison A
LSTM_BATCH, LSTM_STEPS = 32, 25  # comparison B's batch; EWT sentences average ~17 words


def mlp_model(widths: list[int], meprop: MePropConfig | None = None) -> nn.Module:
    """An MLP 784-widths-10, meProp'd (hidden layers only) when ``meprop`` is given."""
    model = build_model(MLPConfig(hidden_sizes=list(widths)))
    return meprop_(model, meprop) if meprop is not None else model


def backward_ratios(
    variants: dict[str, nn.Module],
    batches: Any,
    rounds: int,
    iters: int,
    warmup: int,
    reference: str = "dense",
) -> dict[str, float]:
    """Dense backward time / each variant's, all timed interleaved (meprop_speed's
    ``interleaved`` + ``backward_runner``; ``batches`` has ``next() -> (x, y)``)."""
    # the kernel mode the trainer runs under (compiled where built), not meprop_speed's
    # default of the Python path
    path = kernels.mode()
    runners = {name: backward_runner(m, batches, path) for name, m in variants.items()}
    times = interleaved(runners, rounds, iters, warmup)
    return {name: _ratios(times[reference], t)["min"] for name, t in times.items()}


def mlp_backward_ratios(
    variants: dict[str, nn.Module], rounds: int, iters: int, warmup: int, seed: int = 0
) -> dict[str, float]:
    return backward_ratios(variants, _Batches(MLP_BATCH, seed), rounds, iters, warmup)


class _FlatLogits(nn.Module):
    """``[B, T, C]`` logits as ``[B*T, C]``, so meprop_speed's runner (which calls
    ``cross_entropy(model(x), y)``) times a tagger unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.reshape(-1, out.shape[-1])


class _WordBatches:
    """Fixed random ``[B, T]`` word-id batches with flattened random tags."""

    def __init__(self, vocab: int, tags: int, seed: int = 0, n: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = [
            (
                torch.randint(1, vocab, (LSTM_BATCH, LSTM_STEPS), generator=g),
                torch.randint(1, tags, (LSTM_BATCH * LSTM_STEPS,), generator=g),
            )
            for _ in range(n)
        ]
        self.i = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i = (self.i + 1) % len(self.data)
        return self.data[self.i]


def lstm_backward_ratios(
    variants: dict[str, nn.Module], vocab: int, tags: int, rounds: int, iters: int, warmup: int
) -> dict[str, float]:
    """Backward ratios of tagger models (deep-copied, in training mode)."""
    wrapped = {}
    for name, m in variants.items():
        c = copy.deepcopy(m)
        c.train()
        wrapped[name] = _FlatLogits(c)
    return backward_ratios(wrapped, _WordBatches(vocab, tags), rounds, iters, warmup)


# -- onnxruntime ---------------------------------------------------------------------------
def ort_speedups(
    dense_ckpt: str | Path,
    others: dict[str, str | Path],
    work: Path,
    data: str | None,
    batch_sizes: list[int],
    threads: int,
    repeat: int | None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, dict[str, Any]]:
    """Speed-ups of each checkpoint in ``others`` over ``dense_ckpt`` in onnxruntime.

    Returns ``{name: {"fp32_b1": x, ..., "int8_b256": x, "fp32_accuracy": a,
    "int8_accuracy": a}}`` plus ``"dense"`` (its speed-ups are 1 by definition).
    """
    names = ["dense", *others]
    ckpts = {"dense": Path(dense_ckpt), **{k: Path(v) for k, v in others.items()}}
    paths: dict[tuple[str, bool], str] = {}
    exported: dict[tuple[str, bool], dict[str, Any]] = {}
    for name in names:
        for int8 in (False, True):
            out = work / f"{name}{'.int8' if int8 else ''}.onnx"
            log(f"export {name} {'int8' if int8 else 'fp32'}")
            exported[(name, int8)] = export_onnx(ckpts[name], out, int8=int8, data=data)
            paths[(name, int8)] = str(out)
    order = [paths[(n, False)] for n in names] + [paths[(n, True)] for n in names]
    res = bench(
        order,
        data=data,
        batch_sizes=batch_sizes,
        threads=[threads],
        repeat=repeat,
        progress=False,
    )
    p50 = {(r["model"], r["batch_size"]): r["p50_ms"] for r in res["results"]}
    acc = {m["path"]: m.get("accuracy") for m in res["models"]}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {}
        for int8 in (False, True):
            prec = "int8" if int8 else "fp32"
            d, m = paths[("dense", int8)], paths[(name, int8)]
            for b in batch_sizes:
                row[f"{prec}_b{b}"] = p50[(d, b)] / p50[(m, b)]
                row[f"{prec}_b{b}_p50_ms"] = p50[(m, b)]
            row[f"{prec}_accuracy"] = acc.get(m)
        row["hidden_sizes"] = exported[(name, False)]["hidden_sizes"]
        out[name] = row
    out["_machine"] = res["machine"]
    out["_config"] = res["config"]
    return out
