"""Comparison B: LSTM POS tagger on UD English EWT, every method at the same epochs.

Train on ``en_ewt-ud-dev.conllu`` (``train_tagger`` holds 10% out to pick the best
epoch), report on ``en_ewt-ud-test.conllu``. Rows: dense h=500, meProp (unified
top-k), meSimp (its accuracy re-measured on the *shrunk* plain tagger), dense from
scratch at the meSimp width, and a Torch-Pruning attempt on the trained dense tagger.

``mesimp.tagging.train_tagger`` is called with keyword arguments only (``hidden=``,
``k=``, ``selection=``, ``simplify=``, ``epochs=``, ``seed=``), so its other arguments
may change without touching this file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from benchmarks.suite import tp
from benchmarks.suite.config import LSTMSettings, SuiteConfig
from benchmarks.suite.mlp import diverged_epoch, first_line
from benchmarks.suite.results import (
    DIVERGED,
    FAILED,
    LSTM_ROWS,
    ORT_KEYS,
    bad_run,
    finish_row,
    new_row,
    ok_run,
    set_time_ratios,
    skipped_row,
)
from benchmarks.suite.speed import lstm_backward_ratios
from mesimp.data.conllu import Vocab, read_conllu, tagging_tensors
from mesimp.errors import MesimpError
from mesimp.files.atomic import atomic_write_text
from mesimp.models import count_params
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.loop import TrainingDiverged

Log = Callable[[str], None]
TRAIN_FILE, TEST_FILE = "en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu"


def lstm_ort_speedups(
    dense: dict[str, Any],
    small: dict[str, Any],
    work: Path,
    test: Path,
    batch_sizes: list[int],
    threads: int,
    repeat: int | None,
) -> dict[str, Any]:
    """onnxruntime tagging speed-ups of the meSimp tagger over the dense one.

    Both plain taggers (``result["small"]`` of two ``_Tagger`` runs) are saved as
    checkpoints, exported fp32 and int8 (``mesimp.export``: one LSTM node, parity
    checked on the test file) and timed interleaved by ``mesimp.bench`` on the test
    file's sentences: batch 1 is decode mode (one sentence per run), larger batches
    are length-bucketed padded batches. A speed-up is the ratio of tokens per second
    (int8 against int8 dense). Returns ``{"fp32_b1", ..., "int8_b256"}`` plus the
    tokens/s and per-sentence P50/P99 of each model.
    """
    from mesimp.deploy.bench import bench
    from mesimp.deploy.export import export_onnx
    from mesimp.files.checkpoint import make_checkpoint, save_checkpoint

    paths: dict[tuple[str, bool], str] = {}
    for name, r in (("dense", dense), ("mesimp", small)):
        model = r["small"]
        arch = {
            **model.config.to_dict(),
            "word_vocab": r["arch"]["word_vocab"],
            "tag_vocab": r["arch"]["tag_vocab"],
        }
        ckpt = work / f"tagger-{name}.pt"
        save_checkpoint(ckpt, make_checkpoint(model, arch))
        for int8 in (False, True):
            out = work / f"tagger-{name}{'.int8' if int8 else ''}.onnx"
            export_onnx(ckpt, out, int8=int8, conllu=test)
            paths[(name, int8)] = str(out)
    order = [paths[("dense", False)], paths[("mesimp", False)]]
    order += [paths[("dense", True)], paths[("mesimp", True)]]
    res = bench(
        order,
        batch_sizes=batch_sizes,
        threads=[threads],
        repeat=repeat,
        progress=False,
        conllu=test,
    )
    by = {(r["model"], r["batch_size"]): r for r in res["results"]}
    out: dict[str, Any] = {}
    for int8 in (False, True):
        prec = "int8" if int8 else "fp32"
        d, m = paths[("dense", int8)], paths[("mesimp", int8)]
        for b in batch_sizes:
            out[f"{prec}_b{b}"] = by[(m, b)]["tokens_per_s"] / by[(d, b)]["tokens_per_s"]
            for who, path in (("dense", d), ("mesimp", m)):
                row = by[(path, b)]
                out[f"{prec}_b{b}_{who}_tokens_per_s"] = row["tokens_per_s"]
                if "p50_ms_per_sentence" in row:
                    out[f"{prec}_b{b}_{who}_p50_ms_per_sentence"] = row["p50_ms_per_sentence"]
                    out[f"{prec}_b{b}_{who}_p99_ms_per_sentence"] = row["p99_ms_per_sentence"]
    return out


def head_conllu(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` sentences of a CoNLL-U file (sentences end at a blank line)."""
    blocks = [b for b in src.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    atomic_write_text(dst, "\n\n".join(blocks[:n]) + "\n\n")
    return dst


def data_files(s: LSTMSettings, work: Path) -> tuple[Path, Path]:
    root = Path(s.data)
    train, test = root / TRAIN_FILE, root / TEST_FILE
    if s.train_sentences:
        train = head_conllu(train, work / TRAIN_FILE, s.train_sentences)
    if s.test_sentences:
        test = head_conllu(test, work / TEST_FILE, s.test_sentences)
    return train, test


def methods(s: LSTMSettings) -> dict[str, str]:
    h, k, e = s.hidden, s.k, s.epochs
    return {
        "dense": f"Embedding(100) -> LSTM {h} -> Linear, plain backprop, {e} epochs",
        "meprop": f"{s.selection} k={k} of {h} units ({k / h:.0%}), {e} epochs",
        "mesimp": f"{s.selection} k={k}, prune rate {s.prune_rate}, {s.points} points/epoch, "
        f"{e} epochs; accuracy of the shrunk plain tagger",
        "dense_same": f"plain backprop at the meSimp width of the same seed, {e} epochs",
        "tp": "Torch-Pruning L2 magnitude on the trained dense tagger, to the meSimp width",
    }


def _history(records: list[dict[str, Any]]) -> dict[str, list]:
    """Steps and widths at the start and at every simplification point."""
    steps, widths = [], []
    for r in records:
        if r.get("event") == "start" and "widths" in r:
            steps.append(0)
            widths.append(r["widths"])
        elif r.get("event") == "simplify" and "step" in r:
            steps.append(r["step"])
            widths.append(r["widths"])
    return {"step": steps, "widths": widths}


class _Tagger:
    """Runs ``train_tagger`` and turns its result (or its failure) into a result run."""

    def __init__(self, train: Path, test: Path, epochs: int, lr: float) -> None:
        from mesimp.training.sequence import tagger_accuracy, train_tagger

        self.train_path, self.test_path, self.epochs, self.lr = train, test, epochs, lr
        self._train, self.accuracy = train_tagger, tagger_accuracy
        self._tensors: tuple[Any, Any] | None = None

    def __call__(self, seed: int, **kw: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            r = self._train(
                self.train_path, self.test_path, epochs=self.epochs, lr=self.lr, seed=seed, **kw
            )
        except TrainingDiverged as e:
            return bad_run(seed, DIVERGED, first_line(e), diverged_epoch(e)), None
        except MesimpError as e:
            return bad_run(seed, FAILED, first_line(e)), None
        small = r["shrunk"]  # train_lstm's shrink of the best (masked) model
        run = ok_run(
            seed,
            r["best"]["test_accuracy"],
            r["active_widths"],
            count_params(small),
            r["train_time_s"],
        )
        r["small"] = small
        return run, r

    def test_accuracy(self, model: nn.Module, result: dict[str, Any]) -> float:
        """Test accuracy of ``model`` with the vocabularies of ``result``'s run."""
        if self._tensors is None:
            words = Vocab.from_dict(result["arch"]["word_vocab"])
            tags = Vocab.from_dict(result["arch"]["tag_vocab"])
            x, y, _ = tagging_tensors(read_conllu(self.test_path), words, tags)
            self._tensors = (x, y)
        return self.accuracy(model, *self._tensors)


def _width(widths: list[int]) -> int | list[int]:
    return widths[0] if len(widths) == 1 else list(widths)


def run_lstm(cfg: SuiteConfig, work: Path, log: Log) -> dict[str, Any]:
    s = cfg.lstm
    desc = methods(s)
    if not (Path(s.data) / TRAIN_FILE).is_file() or not (Path(s.data) / TEST_FILE).is_file():
        why = f"skipped: UD English EWT not found in {s.data}"
        return {"rows": [skipped_row("lstm", k, desc[k], why) for k, _ in LSTM_ROWS]}
    train, test = data_files(s, work)
    tag = _Tagger(train, test, s.epochs, s.lr)
    rows = {key: new_row("lstm", key, desc[key]) for key, _ in LSTM_ROWS}
    have_tp = tp.available()
    if not have_tp:
        rows["tp"] = skipped_row("lstm", "tp", desc["tp"], tp.NOT_INSTALLED)
    history: dict[str, Any] = {}
    timing: dict[str, nn.Module] = {}  # the first complete seed's models, for backward ratios
    timing_widths: list[int] = []
    ort: dict[str, Any] | None = None
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        log(f"LSTM seed {seed}: dense h={s.hidden}")
        dense_run, dense = tag(seed, hidden=s.hidden)
        log(f"LSTM seed {seed}: meProp k={s.k}")
        mp_run, mp = tag(seed, hidden=s.hidden, k=s.k, selection=s.selection)
        log(f"LSTM seed {seed}: meSimp")
        simp = SimplifyConfig(prune_rate=s.prune_rate, points_per_epoch=s.points)
        ms_run, ms = tag(seed, hidden=s.hidden, k=s.k, selection=s.selection, simplify=simp)
        for key, run in (("dense", dense_run), ("meprop", mp_run), ("mesimp", ms_run)):
            rows[key]["runs"].append(run)
        if ms is None:
            rows["dense_same"]["runs"].append(bad_run(seed, FAILED, "no meSimp width"))
            if have_tp:
                rows["tp"]["runs"].append(bad_run(seed, FAILED, "no meSimp width"))
            continue
        widths = ms_run["widths"]
        shrunk_acc = tag.test_accuracy(ms["small"], ms)
        ms_run["masked_test_accuracy"] = ms_run["test_accuracy"]
        ms_run["test_accuracy"] = shrunk_acc
        history[str(seed)] = {**_history(ms.get("records") or []), "final_widths": widths}
        log(f"LSTM seed {seed}: dense at the meSimp width {widths}")
        same_run, same = tag(seed, hidden=_width(widths))
        rows["dense_same"]["runs"].append(same_run)
        if have_tp:
            rows["tp"]["runs"].append(_tp_run(tag, seed, dense, dense_run, widths))
        if dense is not None and ort is None:
            log(f"LSTM seed {seed}: onnxruntime export and tagging speed")
            sp = cfg.speed
            ort = lstm_ort_speedups(
                dense, ms, work, test, sp.ort_batch_sizes, sp.ort_threads, sp.ort_repeat
            )
        if not timing and dense is not None and mp is not None:
            timing = {
                "dense": dense["module"],
                "meprop": mp["module"],
                "mesimp_train": ms["module"],
                "small": ms["small"],
            }
            timing_widths = widths
        log(f"LSTM seed {seed} done in {time.perf_counter() - t0:.0f} s")
    ordered = [finish_row(rows[key]) for key, _ in LSTM_ROWS]
    set_time_ratios(ordered)
    _add_ort(rows, ort or {"note": "not measured (no trained models)"}, s.hidden)
    if timing:
        log("LSTM: backward-time ratios")
        _add_backward(rows, timing, timing_widths, cfg)
    return {
        "rows": ordered,
        "data": {"train": str(train), "test": str(test)},
        "width_history": history,
    }


def _tp_run(
    tag: _Tagger,
    seed: int,
    dense: dict[str, Any] | None,
    dense_run: dict[str, Any],
    widths: list[int],
) -> dict[str, Any]:
    """Torch-Pruning on the trained dense tagger; no fine-tuning (``train_tagger`` has no
    way to start from a given model), so its accuracy is the pruned model's as is."""
    if dense is None:
        return bad_run(seed, FAILED, "the dense run failed")
    if len(widths) != 1:
        return bad_run(seed, FAILED, f"one LSTM layer expected, widths {widths}")
    model = dense["module"]
    vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
    out = tp.try_prune_lstm(model, widths[0], vocab)
    if not out["ok"]:
        return bad_run(seed, FAILED, f"torch-pruning {tp.version()}: {out['error']}")
    pruned = out["model"]
    run = ok_run(
        seed,
        tag.test_accuracy(pruned, dense),
        widths,
        count_params(pruned),
        dense_run["train_time_s"],
    )
    run["note"] = "no fine-tuning after pruning"
    return run


def _add_ort(rows: dict[str, dict[str, Any]], ort: dict[str, Any], h: int) -> None:
    for key in ("dense", "meprop"):
        rows[key]["ort_note"] = f"1 by construction: the same LSTM {h} graph as dense"
    measured = all(k in ort for k in ORT_KEYS)
    for key in ("mesimp", "dense_same", "tp"):
        if measured:
            rows[key]["ort"] = {k: float(ort[k]) for k in ORT_KEYS}
            if key != "mesimp":
                rows[key]["ort_note"] = "same width as meSimp: meSimp's measurement"
        else:
            rows[key]["ort_note"] = ort.get("note", "n/a")


def _add_backward(
    rows: dict[str, dict[str, Any]],
    models: dict[str, nn.Module],
    widths: list[int],
    cfg: SuiteConfig,
) -> None:
    dense = models["dense"]
    vocab = next(m for m in dense.modules() if isinstance(m, nn.Embedding)).num_embeddings
    tags = [m for m in dense.modules() if isinstance(m, nn.Linear)][-1].out_features
    sp = cfg.speed
    r = lstm_backward_ratios(models, vocab, tags, sp.rounds, sp.iters, sp.warmup)
    w = "-".join(map(str, widths))
    rows["dense"]["backward"] = [{"phase": "training", "ratio": r["dense"]}]
    rows["meprop"]["backward"] = [{"phase": "training", "ratio": r["meprop"]}]
    rows["mesimp"]["backward"] = [
        {
            "phase": f"meSimp training (k={cfg.lstm.k}, masked, at the end)",
            "ratio": r["mesimp_train"],
        },
        {"phase": f"shrunk model (dense at {w})", "ratio": r["small"]},
    ]
    rows["dense_same"]["backward"] = [{"phase": f"training (dense at {w})", "ratio": r["small"]}]
    if rows["tp"]["status"] == "ok":
        rows["tp"]["backward"] = [{"phase": "dense training", "ratio": r["dense"]}]
