"""What compaction buys: a whole meSimp run against a dense run of the same epochs.

    python -m benchmarks.compact_speed [--families mlp,cnn,tagger,parser] [--rounds 2]
        [--quick] [--merge] [--json F] [--markdown F]

Per family, the variants train through the public ``mesimp.train`` (what ``mesimp
train`` runs), one thread, the same seed and epochs, interleaved round by round (the
order alternates), and each variant's epoch times are its fastest round's:

* ``dense``: the full-width model, plain backprop;
* ``meSimp, compacted``: ``--simplify`` with compaction at every simplification point
  (the default): from the first point on, the model trains at its active widths;
* ``meSimp, masked``: ``--simplify --no-compact``: masked units still computed;
* ``dense at the final widths``: the widths meSimp ends at, trained dense from the
  start: with one full-width epoch, the cost the issue sets as the goal.

Settings: the MLP is ``make demo``'s meSimp run (784-500-500-10, unified k=60, prune
rate 0.01, 6 epochs, Fashion-MNIST); the CNN (channels 32, 64) unified k=8, rate 0.01;
the tagger and the parser are the EWT demo settings (train on ``en_ewt-ud-dev``,
test on ``en_ewt-ud-test``: unified k=20, rate 0.05; the parser k=20, rate 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from mesimp.deploy.timing import cpu_model
from mesimp.files.atomic import atomic_write_text
from mesimp.simplify.rule import SimplifyConfig
from mesimp.training.config import TrainConfig
from mesimp.training.loop import train

DATA = "/usr/share/datasets/fashion-mnist"
EWT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ud-english-ewt"


def family_config(family: str, quick: bool) -> dict[str, Any]:
    """The TrainConfig fields of a family's meSimp run (the dense rows drop k)."""
    if family == "mlp":
        return dict(data=DATA, k=60, epochs=2 if quick else 6, rate=0.01)
    if family == "cnn":
        return dict(
            model="cnn", data=DATA, hidden=[32, 64], k=8, epochs=1 if quick else 3, rate=0.01
        )
    files = dict(
        train_file=str(EWT / "en_ewt-ud-dev.conllu"), test_file=str(EWT / "en_ewt-ud-test.conllu")
    )
    if family == "tagger":
        return dict(
            model="lstm-tagger",
            **files,
            k=20,
            lr=3e-3,
            batch_size=32,
            epochs=2 if quick else 6,
            rate=0.05,
        )
    return dict(
        model="parser",
        **files,
        hidden=500,
        layers=1,
        k=20,
        emb_dim=50,
        batch_size=256,
        epochs=2 if quick else 6,
        rate=0.05,
    )


def run(fields: dict[str, Any], out: Path, variant: str, widths: list[int] | None) -> dict:
    f = dict(fields)
    rate = f.pop("rate")
    if variant.startswith("mesimp"):
        f["simplify"] = SimplifyConfig(prune_rate=rate)
        f["compact"] = variant == "mesimp-compact"
    else:
        f["k"] = 0
        if variant == "dense-final" and widths:
            f["hidden"] = widths if len(widths) > 1 else widths[0]
    cfg = TrainConfig(output=str(out), threads=1, seed=1, evals_per_epoch=1, **f)
    s = train(cfg, progress=False, log=lambda _m: None)
    return {
        "epoch_times_s": s["epoch_times_s"],
        "train_time_s": s["train_time_s"],
        "test_accuracy": s["final"]["test_accuracy"],
        "hidden_sizes": s["hidden_sizes"],
        "params": s["params"],
        "macs": s["macs"],
    }


VARIANTS = ("dense", "mesimp-compact", "mesimp-masked", "dense-final")


def bench_family(family: str, rounds: int, quick: bool) -> dict[str, Any]:
    fields = family_config(family, quick)
    best: dict[str, dict] = {}
    widths = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            if widths is None:  # the final widths come from a meSimp run
                order = ("mesimp-compact", *[v for v in order if v != "mesimp-compact"])
            for v in order:
                res = run(fields, Path(tmp) / f"{v}-{r}.pt", v, widths)
                if v == "mesimp-compact":
                    widths = res["hidden_sizes"]
                if v not in best or res["train_time_s"] < best[v]["train_time_s"]:
                    best[v] = res
                print(
                    f"{family} {v} round {r + 1}: {res['train_time_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    dense = best["dense"]["train_time_s"]
    for v in best.values():
        v["ratio_to_dense"] = v["train_time_s"] / dense
    return {"epochs": fields["epochs"], "variants": best}


def report(results: dict[str, Any]) -> str:
    lines = []
    for family, r in results["families"].items():
        v = r["variants"]
        dense_epoch = statistics.median(v["dense"]["epoch_times_s"])
        load = f", load {r['load_before']:.1f} before" if "load_before" in r else ""
        lines.append(f"\n### {family} ({r['epochs']} epochs, 1 thread{load})\n")
        lines.append(
            "| variant | s per epoch | total s | total ÷ dense | test acc | final widths |"
        )
        lines.append("|---|---|---:|---:|---:|---|")
        for name in VARIANTS:
            x = v[name]
            per = ", ".join(f"{t:.1f}" for t in x["epoch_times_s"])
            lines.append(
                f"| {name} | {per} | {x['train_time_s']:.1f} | {x['ratio_to_dense']:.2f} | "
                f"{x['test_accuracy']:.4f} | {x['hidden_sizes']} |"
            )
        c = v["mesimp-compact"]
        later = c["epoch_times_s"][1:]
        speedups = [dense_epoch / t for t in later]
        goal = v["dense-final"]["train_time_s"] + dense_epoch * (1 - 1 / max(r["epochs"], 1))
        lines.append(
            f"\nEpochs after the first, dense epoch ÷ compacted epoch: "
            f"{', '.join(f'{s:.1f}×' for s in speedups)}. Goal (dense at the final widths + "
            f"one full-width epoch): {goal:.1f} s; compacted meSimp: {c['train_time_s']:.1f} s."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="mlp,cnn,tagger,parser")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    p.add_argument("--merge", action="store_true", help="keep the --json file's other families")
    p.add_argument("--json", default="benchmarks/compact_speed.json")
    p.add_argument("--markdown", default="benchmarks/COMPACT.md")
    a = p.parse_args(argv)
    families = [f for f in a.families.split(",") if f]
    if any(f in ("tagger", "parser") for f in families) and not EWT.is_dir():
        families = [f for f in families if f not in ("tagger", "parser")]
        print(f"no {EWT}: the tagger and the parser are skipped", file=sys.stderr)
    results: dict[str, Any] = {"cpu_model": cpu_model(), "families": {}}
    if a.merge and Path(a.json).is_file():
        results["families"] = json.loads(Path(a.json).read_text())["families"]
    for f in families:  # written after every family: a run that stops keeps what it has
        load = os.getloadavg()[0]
        results["families"][f] = {**bench_family(f, a.rounds, a.quick), "load_before": load}
        text = report(results)
        atomic_write_text(a.json, json.dumps(results, indent=1) + "\n")
        atomic_write_text(a.markdown, "# Compaction: meSimp's training cost\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
