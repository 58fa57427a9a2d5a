"""Compression quality at equal size and equal epochs: meSimp against Torch-Pruning and
dense from scratch (issue 30).

    python -m benchmarks.quality --tasks mlp --seeds 1,2,3 --json quality-s1.json
    python -m benchmarks.quality --report quality-s1.json quality-s2.json \\
        --markdown benchmarks/QUALITY.md --plot benchmarks/quality

Task ``mlp``: Fashion-MNIST 784-500-500-10, Adam 1e-3, batch 50, ``--epochs`` (10)
epochs for every row, test accuracy of the best-on-dev checkpoint (dev = the first
5,000 training images). Rows, per seed:

* ``dense``: plain backprop at 500-500.
* ``old``: the previous default, unified k=60, ``--prune-rate 0.01``, 4 points per
  epoch, cycles of 1 epoch, for epochs - 2; shrink; 2 epochs of plain fine-tuning.
  ``old_tp`` / ``old_scratch``: Torch-Pruning and dense from scratch at its widths.
* per ``--targets`` fraction T: ``new@T``, the new recipe: unified top-k with
  k = max(60, the target width) (``--k``: 60, 75, 150 for 10, 15, 30 %), a warm-up of
  ``--warmup`` epochs (3), then the cubic schedule to T of each layer by
  ``--target-epoch`` (8), 4 points an epoch, compaction; shrink; plain backprop for the
  remaining epochs (``--in-run``: meProp goes on in the same run instead). ``tp@T``:
  dense for ``--target-epoch`` epochs, Torch-Pruning L2 magnitude to the same widths,
  fine-tuned for the remaining epochs; ``scratch@T``: dense from scratch at the same
  widths for all the epochs.

Tasks ``parser`` and ``tagger`` (full UD EWT; PARSER.md's and TAGGER.md's protocols, 3
epochs in all): ``new``, ``SimplifyConfig.recipe(1, target)`` for one epoch (parser:
per-example top-150 to 30 %; tagger: unified top-60 to 12 %), shrink, 2 epochs plain;
``scratch``, the same widths from scratch for 3 epochs. Their dense baselines are the
write-ups' (same protocol and seed 1).

Every finished run is written to ``--json`` at once (atomically), and a rerun with the
same file skips the runs it holds, so an interrupted run continues. ``--report``
renders the tables (mean ± sd over seeds) and the accuracy-vs-MACs plot from one or
more such files (e.g. one per process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.mesimp_fmnist import _run
from benchmarks.suite import tp
from mesimp.files.atomic import atomic_write_text
from mesimp.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mesimp.simplify.checkpoint_shrink import shrink_checkpoint
from mesimp.simplify.rule import SimplifyConfig

HIDDEN, IN, OUT = 500, 784, 10


def mlp_macs(widths: list[int]) -> int:
    """Multiply-accumulates per image of 784-w1-w2-10 (the Linear layers)."""
    dims = [IN, *widths, OUT]
    return sum(a * b for a, b in zip(dims, dims[1:], strict=False))


class Store:
    """The runs done so far, one JSON file, rewritten after every run."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.runs: dict[str, Any] = {}
        if path is not None and path.exists():
            self.runs = json.loads(path.read_text())["runs"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.runs.get(key)

    def put(self, key: str, run: dict[str, Any]) -> dict[str, Any]:
        self.runs[key] = run
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"runs": self.runs}, indent=1) + "\n")
        return run


def _result(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "test": r["test"],
        "widths": list(r["widths"]),
        "macs": mlp_macs(list(r["widths"])),
        "time_s": r["time"],
    }


def mlp_seed(a: argparse.Namespace, seed: int, store: Store, work: Path) -> None:
    """Every MLP row of one seed that ``store`` does not hold yet."""
    common = dict(epochs=a.epochs, seed=seed, batch_size=50, data=None, hidden=HIDDEN)
    mk = dict(k=60, selection="unified")

    def once(row: str, fn: Any) -> dict[str, Any]:
        key = f"mlp/{row}/{seed}"
        got = store.get(key)
        if got is None:
            t = time.perf_counter()
            got = store.put(key, fn())
            print(f"{key}: {got['test']:.4f} {got['widths']} "
                  f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        return got

    if "dense" in a.only:
        once("dense", lambda: _result(_run(work, f"dense-{seed}", **common)))

    def old() -> dict[str, Any]:
        simp = SimplifyConfig(prune_rate=0.01, points_per_epoch=4, cycle_epochs=1)
        e1 = a.epochs - 2
        r = _run(work, f"old-{seed}", **{**common, "epochs": e1}, **mk, simplify=simp)
        rep = shrink_checkpoint(work / f"old-{seed}.pt", work / f"old-{seed}.small.pt")
        ft = _run(
            work,
            f"old-ft-{seed}",
            **{**common, "epochs": 2},
            init=str(work / f"old-{seed}.small.pt"),
        )
        return _result(
            {**ft, "time": r["time"] + ft["time"], "widths": rep["after"]["hidden_sizes"]}
        )

    budgets = [("old", old, a.epochs - 2)] if "old" in a.only else []
    for t in a.targets if "new" in a.only else []:

        def new(t: float = t) -> dict[str, Any]:
            # meProp's k: max(60, the target width), so the last points see (nearly)
            # dense gradients (k=60 at a 150-unit target lost 0.6 pt; k=50 at a 50-unit
            # one lost 0.3 pt against k=60: QUALITY.md's k ablation)
            k = max(60, round(t * HIDDEN)) if a.k == "target" else int(a.k)
            mk = dict(k=k, selection="unified")
            simp = SimplifyConfig(
                points_per_epoch=4,
                cycle_epochs=0,
                warmup_epochs=a.warmup,
                schedule="cubic",
                target=t,
                target_epoch=a.target_epoch,
            )
            if a.in_run:  # the fine-tune epochs continue meProp in the same run
                return _result(_run(work, f"new{t}-{seed}", **common, **mk, simplify=simp))
            te = a.target_epoch
            r = _run(work, f"new-{seed}", **{**common, "epochs": te}, **mk, simplify=simp)
            small = work / f"new-{seed}.small.pt"
            rep = shrink_checkpoint(work / f"new-{seed}.pt", small)
            ft = _run(
                work, f"new-ft-{seed}", **{**common, "epochs": a.epochs - te}, init=str(small)
            )
            widths = rep["after"]["hidden_sizes"]
            return _result({**ft, "time": r["time"] + ft["time"], "widths": widths})

        budgets.append((f"new@{t}", new, a.target_epoch))
    for row, fn, dense_epochs in budgets:
        widths = once(row, fn)["widths"]
        suffix = row[len("new") :] if row.startswith("new") else ""
        prefix = "old_" if row == "old" else ""
        once(
            f"{prefix}scratch{suffix}",
            lambda w=widths: _result(_run(work, f"scratch-{seed}", **{**common, "hidden": w})),
        )
        if tp.available():
            once(
                f"{prefix}tp{suffix}",
                lambda w=widths, e=dense_epochs: tp_row(work, seed, w, e, a.epochs, common),
            )


def tp_row(
    work: Path, seed: int, widths: list[int], dense_epochs: int, epochs: int, common: dict
) -> dict[str, Any]:
    """Dense for ``dense_epochs`` (one run per seed and length, kept in ``work`` for the
    other budgets), Torch-Pruning L2 magnitude to ``widths``, fine-tuned to ``epochs``."""
    base = work / f"tp-base{dense_epochs}-{seed}.pt"
    t = 0.0
    if not base.exists():
        t = _run(work, base.stem, **{**common, "epochs": dense_epochs})["time"]
    t0 = time.perf_counter()
    ckpt = load_checkpoint(base)
    model = tp.prune_mlp_to_widths(model_from_checkpoint(ckpt, meprop=False), widths)
    pruned = work / f"tp-pruned-{seed}.pt"
    arch = {**ckpt["arch"], "hidden_sizes": list(widths)}
    save_checkpoint(pruned, make_checkpoint(model, arch, None, {"pruned_by": "torch-pruning"}))
    t += time.perf_counter() - t0
    ft = _run(
        work, f"tp-ft-{seed}", **{**common, "epochs": epochs - dense_epochs}, init=str(pruned)
    )
    return _result({**ft, "time": t + ft["time"], "widths": widths})


# -- the paper tasks: the recipe and dense from scratch at its widths, per seed --------------
EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
PARSER = dict(model="parser", emb_dim=50, batch_size=256, lr=1e-3, layers=1, hidden=500)
PAPER_TASKS = {  # task -> (base config, meProp, target, metric)
    "parser": (PARSER, dict(k=150, selection="topk"), 0.3, "test_uas"),
    "tagger": ({}, dict(k=60, selection="unified"), 0.12, "test_accuracy"),
}


def paper_seed(a: argparse.Namespace, task: str, seed: int, store: Store, work: Path) -> None:
    """``new``: ``SimplifyConfig.recipe(1, target)`` for one epoch with meProp's
    k = max(60, target width), shrink, 2 epochs plain; ``scratch``: the target widths
    from scratch, 3 epochs (QUALITY.md's protocols, from PARSER.md and TAGGER.md)."""
    from benchmarks.tagger_paper import PROTOCOL
    from mesimp import TrainConfig, train

    base, mk, target, metric = PAPER_TASKS[task]
    files = {
        "train_file": str(EWT / ("en_ewt-ud-dev.conllu" if a.quick else "en_ewt-ud-train.conllu")),
        "dev_file": None if a.quick else str(EWT / "en_ewt-ud-dev.conllu"),
        "test_file": str(EWT / "en_ewt-ud-test.conllu"),
    }
    common = {**(PROTOCOL if task == "tagger" else base), **files, "seed": seed}
    common.update(threads=1, save_every=0)

    def run(name: str, **kw: Any) -> dict[str, Any]:
        cfg = TrainConfig(**{**common, **kw, "output": str(work / f"{task}-{name}-{seed}.pt")})
        r = train(cfg, progress=False, log=lambda m: None)
        return {"test": r["best"][metric], "widths": r["hidden_sizes"], "time_s": r["train_time_s"]}

    def new() -> dict[str, Any]:
        simp = SimplifyConfig.recipe(1, target=target)
        first = run("new", epochs=1, simplify=simp, **mk)
        pre, small = (work / f"{task}-{n}-{seed}.pt" for n in ("new", "small"))
        shrink_checkpoint(pre, small)
        ft = run("ft", epochs=2, init=str(small))
        return {**ft, "time_s": first["time_s"] + ft["time_s"]}

    for row, fn in (("new", new), ("scratch", None)):
        key = f"{task}/{row}/{seed}"
        if store.get(key) is not None:
            continue
        if fn is None:
            widths = store.get(f"{task}/new/{seed}")["widths"]
            got = run("scratch", epochs=3, hidden=widths if len(widths) > 1 else widths[0])
        else:
            got = fn()
        store.put(key, got)
        print(f"{key}: {got['test']:.4f} {got['widths']}", file=sys.stderr, flush=True)


# -- the report ----------------------------------------------------------------------------
def _ms(v: list[float]) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.mean(v):.2f} ± {100 * sd:.2f}"


def rows_of(runs: dict[str, Any], task: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key, r in runs.items():
        t, row, seed = key.split("/")
        if t == task:
            out.setdefault(row, []).append({**r, "seed": int(seed)})
    return out


LABELS = {
    "dense": "dense 500-500",
    "old": "meSimp, old default (rate 0.01, 8 ep) + shrink + 2 ep fine-tune",
    "old_tp": "Torch-Pruning L2 at the old widths (dense 8 ep + 2 ep fine-tune)",
    "old_scratch": "dense from scratch at the old widths",
    "new": "meSimp, new recipe (k = max(60, target width); warm-up 3 ep, cubic to the "
    "target by epoch 8, shrink, 2 ep fine-tune)",
    "tp": "Torch-Pruning L2 at the new recipe's widths (dense 8 ep + 2 ep fine-tune)",
    "scratch": "dense from scratch at the new recipe's widths",
}


def _label(row: str) -> str:
    base, _, t = row.partition("@")
    return LABELS[base] + (f", target {float(t):.0%}" if t else "")


def mlp_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    dense = rows.get("dense", [])
    dmacs = dense[0]["macs"] if dense else mlp_macs([HIDDEN, HIDDEN])
    dense_by_seed = {r["seed"]: r["test"] for r in dense}
    lines = [
        "| row | seeds | test acc % (mean ± sd) | Δ vs dense (pt) | widths (per seed) "
        "| kept % | MACs/image | MAC ÷ |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]

    def order(row: str) -> tuple[float, int]:
        base, _, t = row.partition("@")
        rank = ["dense", "old", "old_tp", "old_scratch", "new", "tp", "scratch"].index(base)
        return (-float(t) if t else -9.0, rank)  # the old budget first, then large to small

    for row in sorted(rows, key=order):
        rs = sorted(rows[row], key=lambda r: r["seed"])
        acc = [r["test"] for r in rs]
        delta = [r["test"] - dense_by_seed[r["seed"]] for r in rs if r["seed"] in dense_by_seed]
        widths = " / ".join("-".join(map(str, r["widths"])) for r in rs)
        kept = statistics.mean(sum(r["widths"]) / (2 * HIDDEN) for r in rs)
        macs = statistics.mean(r["macs"] for r in rs)
        d = f"{100 * statistics.mean(delta):+.2f}" if delta and row != "dense" else "–"
        lines.append(
            f"| {_label(row)} | {len(rs)} | {_ms(acc)} | {d} | {widths} | {100 * kept:.1f} "
            f"| {macs:,.0f} | {dmacs / macs:.1f}× |"
        )
    return "\n".join(lines)


def verdicts(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per budget: the new recipe against Torch-Pruning and scratch (means over seeds)."""
    out = []
    mean = lambda rs: statistics.mean(r["test"] for r in rs)  # noqa: E731
    for row in sorted(r for r in rows if r.startswith("new@")):
        t = row.partition("@")[2]
        new = mean(rows[row])
        parts = [f"target {float(t):.0%}: meSimp {100 * new:.2f}"]
        for peer in ("tp", "scratch"):
            p = rows.get(f"{peer}@{t}")
            if p:
                gap = 100 * (new - mean(p))
                ok = "**met**" if gap >= 0 else "**not met**"
                parts.append(f"vs {peer} {100 * mean(p):.2f} ({gap:+.2f} pt: {ok})")
        out.append("- " + "; ".join(parts))
    return out


def plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy against MACs: meSimp's curve beside Torch-Pruning's and scratch's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = {
        "meSimp (new recipe)": ("new", "o-"),
        "Torch-Pruning L2": ("tp", "s--"),
        "dense from scratch": ("scratch", "^:"),
    }
    for label, (base, style) in series.items():
        pts = []
        for row, rs in rows.items():
            if row.partition("@")[0] == base:
                accs = [100 * r["test"] for r in rs]
                pts.append(
                    (
                        statistics.mean(r["macs"] for r in rs),
                        statistics.mean(accs),
                        statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    )
                )
        if pts:
            x, y, e = zip(*sorted(pts), strict=True)
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
    for row, marker, label in (
        ("old", "D", "meSimp old default"),
        ("old_tp", "x", "TP at old widths"),
    ):
        if rows.get(row):
            rs = rows[row]
            ax.plot(
                statistics.mean(r["macs"] for r in rs),
                100 * statistics.mean(r["test"] for r in rs),
                marker,
                label=label,
            )
    if rows.get("dense"):
        d = 100 * statistics.mean(r["test"] for r in rows["dense"])
        ax.axhline(d, color="grey", lw=0.8, label=f"dense 500-500 ({d:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Fashion-MNIST MLP: accuracy vs MACs (equal epochs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the paper tasks (one seed each: recorded runs, see QUALITY.md) -------------------------
def paper_macs(task: str, width: int) -> int:
    """MACs per parser configuration / per tagged token of the hidden part and output."""
    if task == "parser":  # 48 features x 50-d embeddings -> h -> 103 transitions
        return 48 * 50 * width + width * 103
    # BiLSTM tagger: two directions of 4 gates over (160 inputs + h), Linear 2h -> 19 tags
    return 2 * 4 * width * (160 + width) + 2 * width * 19


def paper_plot(task: str, doc: dict[str, Any], path: Path) -> None:
    """The recorded rows of a paper task: its metric against MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in doc["rows"]:
        x = paper_macs(task, row["width"])
        ax.plot(
            x, row["score"], row.get("marker", "o"), label=f"{row['label']} ({row['score']:.2f})"
        )
    ax.set_xscale("log")
    ax.set_xlabel("MACs per " + ("parser configuration" if task == "parser" else "token"))
    ax.set_ylabel(doc["metric"])
    ax.set_title(f"{doc['title']} (equal epochs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(files: list[Path], markdown: Path | None, plot_prefix: Path | None) -> str:
    runs: dict[str, Any] = {}
    for f in files:
        runs.update(json.loads(f.read_text())["runs"])
    rows = rows_of(runs, "mlp")
    text = "\n".join([mlp_table(rows), "", *verdicts(rows)]) if rows else ""
    for task in PAPER_TASKS:
        prow = rows_of(runs, task)
        if prow:
            text += f"\n\n| {task} row | seeds | test % (mean ± sd) | widths |\n"
            text += "|---|---:|---:|---|\n"
            for row, rs in prow.items():
                widths = " / ".join("-".join(map(str, r["widths"])) for r in rs)
                text += f"| {row} | {len(rs)} | {_ms([r['test'] for r in rs])} | {widths} |\n"
    if plot_prefix is not None and rows:
        plot(rows, plot_prefix.with_name(plot_prefix.name + "_mlp.png"))
    paper = Path(__file__).with_name("quality_paper.json")
    if plot_prefix is not None and paper.exists():
        for task, doc in json.loads(paper.read_text()).items():
            paper_plot(task, doc, plot_prefix.with_name(f"{plot_prefix.name}_{task}.png"))
    if markdown is not None:
        atomic_write_text(markdown, text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tasks",
        default="mlp",
        help="comma-separated: mlp (every row), parser, tagger (the recipe and scratch; "
        "full EWT, minutes per run; --quick trains on the dev file)",
    )
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--targets", default="0.1,0.15,0.3", help="kept width fractions of the new recipe"
    )
    p.add_argument("--warmup", type=int, default=3, help="new recipe: warm-up epochs")
    p.add_argument("--target-epoch", type=int, default=8, help="new recipe: target reached")
    p.add_argument(
        "--in-run",
        action="store_true",
        help="new recipe: fine-tune with meProp in the same run (default: shrink, then "
        "plain backprop for the remaining epochs, as the old default and `make demo` do)",
    )
    p.add_argument("--only", default="dense,old,new", help="row families to run (and peers)")
    p.add_argument(
        "--k", default="target", help="new recipe's k: an int, or 'target': max(60, target width)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here")
    p.add_argument("--json", type=Path, default=None, help="runs file (continued if it exists)")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG prefix: PREFIX_mlp.png")
    p.add_argument("--report", type=Path, nargs="*", default=None, help="render these files")
    p.add_argument("--quick", action="store_true", help="2 epochs, 1 seed: a smoke test")
    a = p.parse_args(argv)
    if a.report is not None:
        print(report(a.report, a.markdown, a.plot))
        return 0
    a.targets = [float(t) for t in a.targets.split(",") if t]
    a.only = set(a.only.split(","))
    if a.quick:
        a.epochs, a.warmup, a.target_epoch = 3, 0, 2
    torch.set_num_threads(a.threads)
    store = Store(a.json)
    tasks = a.tasks.split(",")
    unknown = set(tasks) - {"mlp", *PAPER_TASKS}
    if unknown:
        p.error(f"unknown tasks: {', '.join(sorted(unknown))} (mlp, parser, tagger)")
    seeds = [int(s) for s in a.seeds.split(",")][: 1 if a.quick else None]
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for task in tasks:
                if task == "mlp":
                    mlp_seed(a, seed, store, work)
                else:
                    paper_seed(a, task, seed, store, work)
    print(report([a.json], a.markdown, a.plot) if a.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
