"""The meProp/meSimp papers' POS-tagging rows, on the full UD English EWT.

    python -m benchmarks.tagger_paper --rows dense,topk10 [--epochs 5] [--runs DIR]
    python -m benchmarks.tagger_paper --report [--runs DIR]   # -> TAGGER.md + tagger.json

A long, separate command (hours of CPU; not part of the suite). ``--rows`` trains the
named rows one after the other in this process (start several processes for several
rows: each writes ``DIR/<row>.json`` and ``DIR/<row>.pt`` atomically); ``--report``
shrinks the meSimp checkpoint (verified masked == shrunk in float64) and writes
``benchmarks/TAGGER.md`` and ``benchmarks/tagger.json``.

Protocol (one seed; sized to a shared 2-core CPU, see TAGGER.md): train on
``en_ewt-ud-train`` (12,544 sentences), pick the best of ``2 x epochs`` dev checks on
``en_ewt-ud-dev``, report UPOS token accuracy on ``en_ewt-ud-test`` at that check. Model:
word embedding 100 + suffix-3 and shape embeddings 30 each -> bidirectional LSTM (one
forward and one backward ``nn.LSTM`` of 500 units) -> Linear; dropout 0.3 on the LSTM's
input and output; Adam lr 2e-3, batch 32 sentences, bucketed by length (windows of
3,200 sentences). Rows: dense; meProp per-example top-10 (the paper's) and top-20;
unified top-10 (mesimp's default selection); meSimp (unified top-20, prune rate 0.05,
4 points an epoch, cycle 1); dense at the meSimp kept widths (``samewidth``, after
``mesimp``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
HERE = Path(__file__).resolve().parent
PROTOCOL: dict[str, Any] = dict(
    model="lstm-tagger",
    hidden=500,
    layers=1,
    bidirectional=True,
    word_features=True,
    bucket=3200,
    emb_dim=100,
    dropout=0.3,
    lr=2e-3,
    batch_size=32,
    evals_per_epoch=2,
    seed=1,
    save_every=0,
    threads=1,
)
ROWS: dict[str, dict[str, Any]] = {
    "dense": dict(k=0),
    "topk10": dict(k=10, selection="topk"),
    "topk20": dict(k=20, selection="topk"),
    "unified10": dict(k=10, selection="unified"),
    "mesimp": dict(k=20, selection="unified", simplify=True),
    "samewidth": dict(k=0),  # hidden = the meSimp row's kept widths
}
LABELS = {
    "dense": "dense BiLSTM h=500 per direction",
    "topk10": "meProp per-example top-10 (the paper's)",
    "topk20": "meProp per-example top-20",
    "unified10": "meProp unified top-10 (mesimp's selection)",
    "mesimp": "meSimp (unified top-20, rate 0.05, 4 points/epoch), shrunk",
    "samewidth": "dense at the meSimp widths",
}
PAPER = {
    "dense": "97.22 (LSTM 500d)",
    "topk10": "97.25 (top-10)",
    "mesimp": "97.25 (top-20, 500->60)",
}


def _write_json(path: Path, obj: Any) -> None:
    from mesimp.files.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def run_row(name: str, epochs: int, runs: Path) -> dict[str, Any]:
    """Train one row; its result (and checkpoint) go to ``runs``."""
    import torch

    from mesimp import SimplifyConfig, TrainConfig, train

    torch.set_num_threads(1)
    kw = dict(ROWS[name])
    if kw.pop("simplify", False):
        kw["simplify"] = SimplifyConfig(prune_rate=0.05, points_per_epoch=4)
    cfg = dict(PROTOCOL)
    if name == "samewidth":
        widths = json.loads((runs / "mesimp.json").read_text())["widths"]
        cfg["hidden"] = widths
    config = TrainConfig(
        train_file=str(EWT / "en_ewt-ud-train.conllu"),
        dev_file=str(EWT / "en_ewt-ud-dev.conllu"),
        test_file=str(EWT / "en_ewt-ud-test.conllu"),
        epochs=epochs,
        output=str(runs / f"{name}.pt"),
        **cfg,
        **kw,
    )
    t0 = time.time()
    r = train(config, progress=False, log=lambda m: print(f"[{name}] {m}", flush=True))
    result = {
        "row": name,
        "label": LABELS[name],
        "test": r["best"]["test_accuracy"],
        "dev": r["best"]["dev_accuracy"],
        "best_epoch": r["best"]["epoch"],
        "widths": r["active_widths"],
        "hidden_sizes": r["hidden_sizes"],
        "params": r["params"],
        "train_time_s": r["train_time_s"],
        "wall_s": time.time() - t0,
        "epochs": epochs,
        "config": {k: v for k, v in config.to_dict().items() if k != "extra"},
    }
    _write_json(runs / f"{name}.json", result)
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def report(runs: Path) -> None:
    """Shrink the meSimp model, then TAGGER.md and tagger.json from the rows' results."""
    from mesimp.files.atomic import atomic_write_text
    from mesimp.simplify.checkpoint_shrink import shrink_checkpoint

    results = {}
    for name in ROWS:
        p = runs / f"{name}.json"
        if p.exists():
            results[name] = json.loads(p.read_text())
    m = results.get("mesimp")
    if m is not None and (runs / "mesimp.pt").exists():
        s = shrink_checkpoint(runs / "mesimp.pt", runs / "mesimp.small.pt")
        m["shrunk"] = {
            "widths": s["after"]["hidden_sizes"],
            "params": s["after"]["params"],
            "max_abs_diff": s["max_abs_diff"],
            "test": s["after"].get("test_accuracy"),
            "verified_on": s["verified_on"],
        }
    _write_json(HERE / "tagger.json", {"protocol": PROTOCOL, "rows": results})
    lines = [
        "# POS tagging on full UD English EWT (the meProp / meSimp papers' tagger task)",
        "",
        "Generated by `python -m benchmarks.tagger_paper --report` from the runs of "
        "`python -m benchmarks.tagger_paper --rows ...` (see the module docstring).",
        "",
        "| row | paper (its data) | dev UPOS % | test UPOS % | widths (fwd, bwd) | params "
        "| best at epoch | train time s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        widths = r["widths"]
        test = r["test"]
        if name == "mesimp" and "shrunk" in r:
            widths = r["shrunk"]["widths"]
            test = r["shrunk"]["test"] if r["shrunk"]["test"] is not None else test
        lines.append(
            f"| {r['label']} | {PAPER.get(name, '-')} | {_fmt(r['dev'])} | {_fmt(test)} | "
            f"{', '.join(map(str, widths))} | {r['params']:,} | {r['best_epoch']:.1f} | "
            f"{r['train_time_s']:.0f} |"
        )
    atomic_write_text(HERE / "TAGGER.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=Path("runs/tagger_paper"))
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args(argv)
    a.runs.mkdir(parents=True, exist_ok=True)
    for name in filter(None, a.rows.split(",")):
        if name not in ROWS:
            ap.error(f"unknown row {name!r} (rows: {', '.join(ROWS)})")
        r = run_row(name, a.epochs, a.runs)
        print(json.dumps({k: r[k] for k in ("row", "test", "dev", "widths", "wall_s")}), flush=True)
    if a.report:
        report(a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
