"""POS tagging on UD English EWT: dense LSTM vs meProp vs meSimp (+ shrink) vs dense at
the meSimp width.

    python -m benchmarks.pos_lstm [--epochs 5] [--hidden 500] [--k 20] [--prune-rate 0.01]
        [--points 2] [--seed 1] [--quick] [--json FILE]

Trains on ``en_ewt-ud-dev.conllu`` (90/10 split: the held-out 10% picks the best epoch)
and tests on ``en_ewt-ud-test.conllu``. Every run uses the same epochs, batch size,
Adam (dense), learning rate and seed; meProp and meSimp use unified selection. The
meSimp row's accuracy is measured again on the *shrunk* plain tagger. Prints a markdown
table: run, kept width, test UPOS accuracy, train time (training steps only, no eval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mesimp.data.conllu import Vocab, read_conllu, tagging_tensors
from mesimp.simplify import SimplifyConfig
from mesimp.tagging import shrink_tagger, tagger_accuracy, train_tagger

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=EWT)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--prune-rate", type=float, default=0.01)
    p.add_argument("--points", type=int, default=2, help="simplification points per epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 epochs, hidden 64 (a smoke run)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.hidden = 2, 64
    train = args.data / "en_ewt-ud-dev.conllu"
    test = args.data / "en_ewt-ud-test.conllu"
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    def run(name: str, **kw) -> dict:
        print(f"== {name}", flush=True)
        r = train_tagger(train, test, progress=True, **common, **kw)
        return {"run": name, "width": r["widths"][0], "test": r["test_accuracy"], "r": r}

    rows = [run(f"dense h={args.hidden}", hidden=args.hidden)]
    rows.append(run(f"meProp k={args.k}", hidden=args.hidden, k=args.k))
    simp = SimplifyConfig(prune_rate=args.prune_rate, points_per_epoch=args.points)
    ms = run(
        f"meSimp k={args.k} p={args.prune_rate} + shrink",
        hidden=args.hidden,
        k=args.k,
        simplify=simp,
    )
    r = ms["r"]
    small = shrink_tagger(r["model"])
    words = Vocab.from_dict(r["arch"]["word_vocab"])
    tags = Vocab.from_dict(r["arch"]["tag_vocab"])
    x, y, _ = tagging_tensors(read_conllu(test), words, tags)
    ms["test_masked"], ms["test"] = ms["test"], tagger_accuracy(small, x, y)
    ms["width"] = small.config.hidden
    rows.append(ms)
    rows.append(run(f"dense h={ms['width']} (scratch)", hidden=ms["width"]))

    print(
        f"\nUD EWT POS: train en_ewt-ud-dev (90%), test en_ewt-ud-test; epochs={args.epochs}, "
        f"batch={args.batch_size}, lr={args.lr}, seed={args.seed}, emb=100\n"
    )
    print("| run | kept width | test UPOS acc | train time (s) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['run']} | {row['width']} | {row['test']:.4f} | "
            f"{row['r']['train_time_s']:.1f} |"
        )
    if args.json:
        keep = ("test_accuracy", "heldout_accuracy", "best_epoch", "widths", "train_time_s")
        raw = [
            {
                "run": w["run"],
                "width": w["width"],
                "test": w["test"],
                **{k: w["r"][k] for k in keep},
            }
            for w in rows
        ]
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"data": str(args.data), "json": str(args.json)},
                    "rows": raw,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
