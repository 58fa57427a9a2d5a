"""Transformers on real text: meSimp inside the Hugging Face Trainer against Torch-Pruning.

    python -m benchmarks.transformers_ewt [--quick] [--tasks upos,lm] [--seeds 0,1,2]
        [--epochs E] [--finetune F] [--k K] [--prune-rate P] [--simplify KEY=VALUE,...]
        [--rows dense,mesimp,...] [--json FILE] [--markdown FILE]

Two tasks on UD English EWT (``mesimp.integrations.hf_ewt``): UPOS tagging with
``BertForTokenClassification`` (test accuracy) and causal language modelling with
``LlamaForCausalLM`` (test perplexity), random init, word-level vocabularies, every run
in the Hugging Face ``Trainer`` (AdamW, linear decay, batch 32, 1 torch thread). Rows,
each with E epochs of training in total:

* ``dense``: E epochs; dev picks the epoch. Its weights after E - F epochs are kept
  for ``tp``.
* ``mesimp``: ``MesimpCallback(units="all")``: meProp (unified top-k, k = 25 % of each
  width) and meSimp on every unit the Simplifier can remove (heads, FFN and hidden size
  once mesimp has group-level units; FFN units today) for E - F epochs, ``shrink``, then
  F epochs of plain fine-tuning (dev picks the epoch).
* ``mesimp-ffn``: the same with ``units="ffn"`` (meProp and meSimp on FFN units only).
* ``tp``: Torch-Pruning on the dense weights after E - F epochs, pruned to exactly the
  ``mesimp`` row's widths (per layer: FFN units, whole attention heads; the hidden
  size), group by group with ``DependencyGraph`` and its importance: group L2 norm
  (``GroupMagnitudeImportance``) or ``GroupTaylorImportance`` (gradients of 8 training
  batches), whichever gives the lower dev loss right after pruning; then F epochs of
  fine-tuning like ``mesimp``.
* ``scratch``: the ``mesimp`` row's architecture, freshly initialised (the model's own
  init), trained E epochs.

Per row: the test metric (mean ± sd over seeds), params, MACs per token (every Linear
layer, the output layer included; embeddings are lookups and attention's score
products are left out), and the onnxruntime speed-up over ``dense`` (tokens/s, 1
thread, the first 200 test sentences: one per run at batch 1, length-bucketed batches
of 32; ``tp`` and ``scratch`` share ``mesimp``'s graph and are not timed again). A row
that cannot run records its one-line reason; each graph analysis (the set-up of a
Trainer run with the Simplifier's, Torch-Pruning's grouping) is given ``--setup-limit``
seconds. ``--simplify`` sets more ``SimplifyConfig`` fields for both meSimp rows (for
example ``schedule=cubic,target=0.55,target_epoch=3``: a fixed size in place of the
prune rate); ``--rows`` runs a subset (without ``dense``, compare with another run's
``dense`` of the same seed: the speed-ups are still measured against the dense graph).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mesimp
from mesimp.data.token_examples import PadCollator
from mesimp.deploy.bench_tokens import bench_token_models
from mesimp.deploy.timing import machine_info
from mesimp.files.atomic import atomic_write_text
from mesimp.integrations.hf_ewt import (
    FULL,
    QUICK,
    BestOnDev,
    EwtTask,
    evaluate,
    fit,
    load_task,
)
from mesimp.integrations.transformers import (
    MesimpCallback,
    export_hf_onnx,
    hf_widths,
    import_transformers,
)
from mesimp.models import count_macs, count_params

_hf = import_transformers()
ROWS = ("dense", "mesimp", "mesimp-ffn", "tp", "scratch")
TIMED = ("mesimp", "mesimp-ffn")  # beside dense; tp and scratch have mesimp's graph
TIMING_SENTENCES = 200
GOALS = {"upos": {"mac_ratio": 3.0, "max_loss_points": 1.0}, "lm": {"mac_ratio": 2.0}}


class SetupTimeout(Exception):
    """A graph analysis (the Simplifier's, Torch-Pruning's) ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Raise ``SetupTimeout`` in this (main) thread after ``seconds`` (SIGALRM): graph
    traversals that do not finish on some models (a Llama's attention) must not hang
    the run. ``SetupDeadline`` can end it early."""

    def expire(signum: int, frame: Any) -> None:
        raise SetupTimeout(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class SetupDeadline(_hf.TrainerCallback):
    """Ends ``time_limit`` at the first training step: only the set-up of a Trainer run
    (the callbacks' ``on_train_begin``: meProp swap, the Simplifier's analysis) is
    limited, not the training."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signal.alarm(0)
        return control


class Snapshot(_hf.TrainerCallback):
    """A copy of the model at the end of epoch ``epoch`` (Torch-Pruning's start)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.model = epoch, None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None and round(state.epoch) == self.epoch:
            self.model = copy.deepcopy(model)
        return control


def run(
    task: EwtTask,
    model: nn.Module,
    epochs: int,
    seed: int,
    callbacks: list[Any],
    setup_limit: int,
    lr: float = 1e-3,
) -> None:
    """``hf_ewt.fit`` (dev every epoch; BestOnDev, where given, restores the best) with
    ``setup_limit`` seconds to reach the first step."""
    with time_limit(setup_limit, "set-up (the Simplifier's analysis)"):
        fit(task, model, epochs, seed, [SetupDeadline(), *callbacks], lr=lr, logging_steps=10**9)


def metric(task: EwtTask, model: nn.Module) -> float:
    return evaluate(model, task.test, task.causal)[task.metric_name]


# -- Torch-Pruning at given widths -----------------------------------------------------

_ROOTS = {  # per family: (FFN writer, query, the attention module) under one block
    "bert": ("intermediate.dense", "attention.self.query", "attention.self"),
    "llama": ("mlp.gate_proj", "self_attn.q_proj", "self_attn"),
}


def _blocks(model: nn.Module) -> list[tuple[str, str]]:
    """(block prefix, family) of every transformer block, in order."""
    out = []
    for name, _ in model.named_modules():
        for family, (ffn, _, _) in _ROOTS.items():
            if name.endswith("." + ffn):
                out.append((name[: -len(ffn)], family))
    return out


def taylor_grads(task: EwtTask, model: nn.Module, batches: int = 8) -> None:
    """Accumulate gradients of the training loss over a few batches (Taylor importance)."""
    model.train()
    model.zero_grad()
    collate = PadCollator()
    for i in range(batches):
        batch = collate(task.train[i * 32 : (i + 1) * 32])
        model(**batch).loss.backward()


def tp_graph(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Torch-Pruning's own dependency graph of ``model`` (no mesimp leaves: the peer as
    it comes), traced in eval mode on keyword inputs; the model's mode is restored."""
    import torch_pruning as tp

    training = model.training
    try:
        return tp.DependencyGraph().build_dependency(
            model.eval(),
            example_inputs=inputs,
            forward_fn=lambda m, x: m(**x).logits,
            verbose=False,
        )
    finally:
        model.train(training)


def tp_prune(task: EwtTask, dense: nn.Module, widths: dict[str, Any], importance: Any) -> nn.Module:
    """A copy of ``dense`` pruned to ``widths`` (``hf_widths``' form) group by group:
    FFN units and whole heads per block, then the hidden size, each keeping the
    highest-scoring units under ``importance`` (all scores taken before any pruning)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    if isinstance(importance, tp.importance.GroupTaylorImportance):
        taylor_grads(task, model)
    dg = tp_graph(model, task.example_inputs())
    modules = dict(model.named_modules())
    now = hf_widths(model)
    plan: list[tuple[nn.Module, Any, list[int]]] = []

    def lowest(root: nn.Module, fn: Any, n: int, keep: int, unit: int = 1) -> list[int]:
        group = dg.get_pruning_group(root, fn, idxs=list(range(n)))
        score = importance(group).detach().double().view(-1, unit).sum(1)
        worst = torch.argsort(score)[: n // unit - keep].tolist()
        return sorted(c for h in worst for c in range(h * unit, (h + 1) * unit))

    for (prefix, family), want, have in zip(
        _blocks(model), widths["layers"], now["layers"], strict=True
    ):
        ffn_name, q_name, attn_name = _ROOTS[family]
        ffn = modules[prefix + ffn_name]
        if want["ffn"] < have["ffn"]:
            drop = lowest(ffn, tp.prune_linear_out_channels, have["ffn"], want["ffn"])
            plan.append((ffn, tp.prune_linear_out_channels, drop))
        if want["heads"] < have["heads"] or want["kv_heads"] < have["kv_heads"]:
            if family != "bert":
                raise RuntimeError("Torch-Pruning head pruning is set up for BERT blocks only")
            q, attn = modules[prefix + q_name], modules[prefix + attn_name]
            head = attn.attention_head_size
            drop = lowest(q, tp.prune_linear_out_channels, q.out_features, want["heads"], head)
            plan.append((q, tp.prune_linear_out_channels, drop))
    if widths["hidden"] < now["hidden"]:
        emb = model.get_input_embeddings()
        drop = lowest(emb, tp.prune_embedding_out_channels, now["hidden"], widths["hidden"])
        plan.append((emb, tp.prune_embedding_out_channels, drop))
    for root, fn, drop in plan:
        dg.get_pruning_group(root, fn, idxs=drop).prune()
    for _, m in model.named_modules():  # BERT's self-attention keeps head counts
        if hasattr(m, "attention_head_size") and hasattr(m, "query"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features
    model.zero_grad(set_to_none=True)
    got = hf_widths(model)
    if got != widths:
        raise RuntimeError(f"Torch-Pruning gave widths {got}, asked for {widths}")
    return model


def best_tp(task: EwtTask, dense: nn.Module, widths: dict[str, Any]) -> tuple[nn.Module, str]:
    """Group L2 norm or Taylor, whichever leaves the lower dev loss right after pruning."""
    import torch_pruning as tp

    scored = []
    for name, imp in (
        ("group-norm", tp.importance.GroupMagnitudeImportance(p=2)),
        ("taylor", tp.importance.GroupTaylorImportance()),
    ):
        pruned = tp_prune(task, dense, widths, imp)
        scored.append((dev_loss(task, pruned), name, pruned))
    _, name, pruned = min(scored, key=lambda s: s[0])
    return pruned, name


@torch.no_grad()
def dev_loss(task: EwtTask, model: nn.Module) -> float:
    was = model.training
    model.eval()
    collate = PadCollator()
    total = n = 0.0
    for i in range(0, len(task.dev), 64):
        batch = collate(task.dev[i : i + 64])
        tokens = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * tokens
        n += tokens
    model.train(was)
    return total / max(n, 1)


# -- one seed of one task --------------------------------------------------------------


def one_seed(task: EwtTask, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    e, f = a.epochs, a.finetune
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}

    def record(key: str, model: nn.Module, t0: float, **extra: Any) -> None:
        models[key] = model
        rows[key] = {
            task.metric_name: metric(task, model),
            "params": count_params(model),
            "macs_per_token": count_macs(model),
            "widths": hf_widths(model),
            "time_s": time.perf_counter() - t0,
            **extra,
        }
        value, macs = rows[key][task.metric_name], rows[key]["macs_per_token"]
        print(f"  {task.name} seed {seed} {key}: {value:.4f}, MACs/token {macs:,}", file=sys.stderr)

    t0 = time.perf_counter()
    dense = task.build_model(seed)
    snap = Snapshot(e - f)
    if "dense" in a.rows:
        run(task, dense, e, seed, [BestOnDev(), snap], a.setup_limit)
        record("dense", dense, t0)
    else:  # the same seed's dense row from another run; this one times against it
        models["dense"] = dense  # onnxruntime's speed does not depend on the weights
        rows["dense"] = {"error": "not run (--rows)"}

    for key, units in (("mesimp", "all"), ("mesimp-ffn", "ffn")):
        if key not in a.rows:
            continue
        t0 = time.perf_counter()
        try:
            model = task.build_model(seed)
            cb = MesimpCallback(
                mesimp.MePropConfig(k=a.k, selection="unified"),
                mesimp.SimplifyConfig(
                    **{"prune_rate": a.prune_rate, "points_per_epoch": 4, **a.simplify}
                ),
                units=units,
                example_inputs=task.example_inputs(),
            )
            run(task, model, e - f, seed, [cb], a.setup_limit)
            before = metric(task, model)
            small = cb.shrunk
            run(task, small, f, seed + 1000, [BestOnDev()], a.setup_limit, lr=a.finetune_lr)
            record(key, small, t0, before_finetune=before, simplified=list(cb.simplifier.layers))
        except Exception as err:  # record why the row could not run, then go on
            rows[key] = {"error": _one_line(err)}
            print(f"  {task.name} seed {seed} {key}: {rows[key]['error']}", file=sys.stderr)

    if "error" in rows.get("mesimp", {"error": ""}):
        for key in ("tp", "scratch"):
            rows[key] = {"error": "no meSimp widths (the mesimp row did not run)"}
    else:
        widths = rows["mesimp"]["widths"]
        t0 = time.perf_counter()
        try:
            if "tp" not in a.rows:
                raise RuntimeError("not run (--rows)")
            with time_limit(a.setup_limit, "Torch-Pruning's graph analysis"):
                pruned, how = best_tp(task, snap.model, widths)
            run(task, pruned, f, seed + 1000, [BestOnDev()], a.setup_limit, lr=a.finetune_lr)
            record("tp", pruned, t0, importance=how)
        except Exception as err:  # Torch-Pruning fails in many ways: record, go on
            rows["tp"] = {"error": _one_line(err)}
        if "scratch" not in a.rows:
            rows["scratch"] = {"error": "not run (--rows)"}
            return _with_speed(task, seed, rows, models)
        t0 = time.perf_counter()
        scratch = copy.deepcopy(models["mesimp"])
        torch.manual_seed(seed)
        scratch.apply(scratch._init_weights)  # the model's own init at the meSimp widths
        run(task, scratch, e, seed, [BestOnDev()], a.setup_limit)
        record("scratch", scratch, t0)

    return _with_speed(task, seed, rows, models)


def _with_speed(
    task: EwtTask, seed: int, rows: dict[str, dict[str, Any]], models: dict[str, nn.Module]
) -> dict[str, Any]:
    for key, s in ort_speedups(task, models).items():
        rows[key].update(s)
    return {"seed": seed, "rows": rows}


def _fields(text: str) -> dict[str, Any]:
    """``KEY=VALUE,...`` as SimplifyConfig fields (numbers parsed, the rest strings)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def ort_speedups(task: EwtTask, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Export dense and the timed rows; tokens/s ratios over dense at batch 1 and 32."""
    keys = ["dense", *(k for k in TIMED if k in models)]
    sentences = [e["input_ids"] for e in task.test[:TIMING_SENTENCES]]
    with tempfile.TemporaryDirectory(prefix="hf-ewt-onnx-") as tmp:
        paths = []
        for k in keys:
            r = export_hf_onnx(models[k], task.example_inputs(), Path(tmp) / f"{k}.onnx")
            paths.append(r["path"])
        res = bench_token_models(paths, sentences, batch_sizes=(1, 32), threads=1)
    out: dict[str, dict[str, float]] = {k: {} for k in keys}
    for row in res["results"]:
        key = keys[paths.index(row["model"])]
        out[key][f"speedup_b{row['batch_size']}"] = row["speedup"]
        out[key][f"tokens_per_s_b{row['batch_size']}"] = row["tokens_per_s"]
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# -- the report ------------------------------------------------------------------------


def summarize(task: EwtTask, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: metric mean/sd, params, MACs, speed-ups (means over seeds that ran)."""
    out: dict[str, Any] = {}
    m = task.metric_name
    for key in ROWS:
        ok = [r["rows"][key] for r in runs if "error" not in r["rows"].get(key, {"error": 1})]
        if not ok:
            errors = {r["rows"].get(key, {}).get("error", "not run") for r in runs}
            out[key] = {"error": "; ".join(sorted(errors))}
            continue
        vals = [row[m] for row in ok]
        s: dict[str, Any] = {
            "seeds": len(ok),
            m: statistics.mean(vals),
            f"{m}_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "params": statistics.mean(row["params"] for row in ok),
            "macs_per_token": statistics.mean(row["macs_per_token"] for row in ok),
            "widths": ok[0]["widths"],
        }
        for b in (1, 32):
            sp = [row[f"speedup_b{b}"] for row in ok if f"speedup_b{b}" in row]
            if sp:
                s[f"speedup_b{b}"] = statistics.mean(sp)
        if key == "tp":
            s["importance"] = sorted({row["importance"] for row in ok})
        out[key] = s
    return out


def goals(name: str, summary: dict[str, Any]) -> list[str]:
    """The issue's acceptance lines, met or not, from a task's summary."""
    d, ms = summary["dense"], summary["mesimp"]
    if "(--rows)" in d.get("error", ""):
        return [f"{name}: no dense row in this run (--rows): see the same seed's dense row"]
    if "error" in ms or "error" in d:
        return [f"{name}: no meSimp result ({ms.get('error', d.get('error'))})"]
    ratio = d["macs_per_token"] / ms["macs_per_token"]
    g = GOALS[name]
    verdict = "met" if ratio >= g["mac_ratio"] else "not met"
    lines = [f"MAC ratio {ratio:.2f}× (goal ≥ {g['mac_ratio']}×): {verdict}"]
    if name == "upos":
        loss = 100 * (d["accuracy"] - ms["accuracy"])
        lines.append(
            f"accuracy loss {loss:.2f} points (goal ≤ 1): {'met' if loss <= 1 else 'not met'}"
        )
        tp = summary["tp"]
        if "error" not in tp:
            ahead = ms["accuracy"] >= tp["accuracy"]
            a, b = 100 * ms["accuracy"], 100 * tp["accuracy"]
            lines.append(
                f"meSimp {a:.2f} vs Torch-Pruning {b:.2f}: {'met' if ahead else 'not met'}"
            )
    else:
        rise = 100 * (ms["perplexity"] / d["perplexity"] - 1)
        lines.append(f"perplexity +{rise:.1f} % (goal ≤ 5 %): {'met' if rise <= 5 else 'not met'}")
    return [f"{name}: {line}" for line in lines]


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"## Transformers on UD English EWT ({'quick' if cfg['quick'] else 'full'} run)",
        "",
        f"{cfg['epochs']} epochs per row ({cfg['epochs'] - cfg['finetune']} + "
        f"{cfg['finetune']} fine-tune for mesimp and tp), seeds {cfg['seeds']}, meProp "
        f"k={cfg['k']} unified, prune rate {cfg['prune_rate']}"
        + "".join(f", {k}={v}" for k, v in cfg.get("simplify", {}).items())
        + "; CPU: "
        f"{results['machine'].get('cpu_model')}. Speed-ups: onnxruntime tokens/s over "
        "dense, 1 thread, batch 1 / batch 32 sentences.",
    ]
    for name, t in results["tasks"].items():
        m = "accuracy %" if name == "upos" else "perplexity"
        size = t["size"]
        kv = f" ({size['kv_heads']} key/value)" if name == "lm" else ""
        lines += [
            "",
            f"### {name}: {t['model']} (hidden {size['hidden']}, {size['layers']} layers, "
            f"{size['heads']} heads{kv}, FFN {size['ffn']}), {t['train_sentences']:,} training "
            f"sentences, vocabulary {t['vocab']:,}",
            "",
            f"| row | test {m} | params | MACs/token | MAC ratio | ORT b=1 / b=32 "
            "| widths (first seed) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        s = t["summary"]
        dmacs = s["dense"].get("macs_per_token")
        for key in ROWS:
            r = s[key]
            if "(--rows)" in r.get("error", "") or r.get("error") == "not run":
                continue
            if "error" in r:
                lines.append(f"| {key} | n/a: {r['error']} | | | | | |")
                continue
            v, sd = r[t["metric"]], r[f"{t['metric']}_sd"]
            val = f"{100 * v:.2f} ± {100 * sd:.2f}" if name == "upos" else f"{v:.2f} ± {sd:.2f}"
            sp = "as mesimp"
            if "speedup_b1" in r:
                sp = f"{r['speedup_b1']:.2f}× / {r['speedup_b32']:.2f}×"
            w = r["widths"]
            heads, ffn = [x["heads"] for x in w["layers"]], [x["ffn"] for x in w["layers"]]
            ws = f"hidden {w['hidden']}, heads {heads}, FFN {ffn}"
            ratio = f"{dmacs / r['macs_per_token']:.2f}×" if dmacs else ""
            label = key + (f" ({', '.join(r['importance'])})" if key == "tp" else "")
            lines.append(
                f"| {label} | {val} | {r['params']:,.0f} | {r['macs_per_token']:,.0f} | "
                f"{ratio} | {sp} | {ws} |"
            )
        lines += ["", *(f"- {g}" for g in t["goals"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 400 sentences, 1 seed")
    p.add_argument("--tasks", default="upos,lm")
    p.add_argument("--seeds", default=None, help="default 0,1,2 (quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="per row (default 6; quick 3)")
    p.add_argument("--finetune", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--k", type=float, default=0.25)
    p.add_argument("--prune-rate", type=float, default=0.05)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument(
        "--simplify",
        type=_fields,
        default={},
        help="more SimplifyConfig fields, KEY=VALUE,... (e.g. schedule=cubic,target=0.55)",
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"a subset of {','.join(ROWS)}")
    p.add_argument("--setup-limit", type=int, default=None, help="seconds (120; quick 30)")
    p.add_argument("--data", default=None, help="the UD English EWT directory")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    a = p.parse_args(argv)
    a.rows = a.rows.split(",")
    a.epochs = a.epochs or (3 if a.quick else 6)
    a.finetune = a.finetune or (1 if a.quick else 2)
    a.setup_limit = a.setup_limit or (30 if a.quick else 120)
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    stem = "transformers_ewt_quick" if a.quick else "transformers_ewt"
    here = Path(__file__).resolve().parent
    json_path = Path(a.json or here / f"{stem}.json")
    md_path = Path(a.markdown or here / f"{stem.upper()}.md")
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "config": {
            **{k: v for k, v in vars(a).items() if k not in ("json", "markdown")},
            "seeds": seeds,
            "torch_threads": 1,
        },
        "machine": machine_info(),
        "tasks": {},
    }
    for name in a.tasks.split(","):
        task = load_task(name, a.data, (QUICK if a.quick else FULL)[name])
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            runs.append(one_seed(task, seed, a))
            print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            summary = summarize(task, runs)
            results["tasks"][name] = {
                "model": "BertForTokenClassification" if name == "upos" else "LlamaForCausalLM",
                "metric": task.metric_name,
                "size": task.size_dict(),
                "train_sentences": len(task.train),
                "vocab": len(task.words),
                "runs": runs,
                "summary": summary,
                "goals": goals(name, summary),
            }
            # after every seed, so a long run that stops keeps what it measured
            atomic_write_text(json_path, json.dumps(results, indent=1, allow_nan=False) + "\n")
            atomic_write_text(md_path, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
