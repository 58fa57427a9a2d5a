"""A BERT-style UPOS tagger trained by the Hugging Face Trainer, made smaller by mesimp.

    python examples/hf_tagger.py [--quick] [--data DIR] [--out DIR] [--epochs N]

UD English EWT (train to train, dev to pick the epoch, test to report), a word-level
vocabulary, ``BertForTokenClassification`` from random init. The lines marked
``# mesimp`` are all a Trainer script needs: ``MesimpCallback`` applies meProp before
training, runs meSimp at every optimizer step (the widths land in the Trainer's logs)
and shrinks the model at the end. The smaller model is fine-tuned by a plain Trainer,
saved as a mesimp model file (reloaded bit-identically) and exported to ONNX.
``--quick`` runs a tiny model on 400 sentences in seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import mesimp
from mesimp.integrations.transformers import MesimpCallback, export_hf_onnx, save_hf_model

# isort: split
# after mesimp's integration, which makes torchvision importable beside a CPU-only torch
from transformers import Trainer

from mesimp.data.token_examples import PadCollator
from mesimp.integrations.hf_ewt import (
    DEFAULT_EWT,
    FULL,
    QUICK,
    BestOnDev,
    evaluate,
    fit,
    load_task,
    training_args,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny run for the test suite")
    p.add_argument("--data", default=str(DEFAULT_EWT), help="the UD English EWT directory")
    p.add_argument("--out", default="models/examples")
    p.add_argument("--epochs", type=int, default=None, help="meSimp epochs (then 1 to fine-tune)")
    a = p.parse_args()
    torch.set_num_threads(1)  # small matrices: one thread is fastest on a shared machine
    task = load_task("upos", a.data, (QUICK if a.quick else FULL)["upos"])
    epochs = a.epochs or (2 if a.quick else 5)
    model = task.build_model(seed=0)
    macs = mesimp.models.count_macs(model)
    print(f"{len(task.train)} sentences, {len(task.words)} words, dense MACs/token {macs:,}")

    callback = MesimpCallback(  # mesimp
        mesimp.MePropConfig(k=0.25, selection="unified"),
        mesimp.SimplifyConfig(prune_rate=0.05, points_per_epoch=4, cycle_epochs=1),
    )
    tmp = tempfile.mkdtemp(prefix="hf-tagger-")
    trainer = Trainer(
        model=model,
        args=training_args(tmp, epochs, seed=0, logging_steps=10 if a.quick else 100),
        train_dataset=task.train,
        eval_dataset=task.dev,
        data_collator=PadCollator(),
        callbacks=[callback],  # mesimp
    )
    trainer.train()
    for record in trainer.state.log_history:
        if "eval_loss" in record:
            widths = {k[7:]: v for k, v in record.items() if k.startswith("mesimp/")}
            print(
                f"epoch {record['epoch']:.0f}: dev loss {record['eval_loss']:.4f}, widths {widths}"
            )

    small = callback.shrunk  # mesimp: the same BertForTokenClassification, fewer units
    masked_acc = evaluate(model, task.test, causal=False)["accuracy"]
    small_acc = evaluate(small, task.test, causal=False)["accuracy"]
    params = [mesimp.models.count_params(m) for m in (model, small)]
    macs = mesimp.models.count_macs(small)
    print(
        f"shrunk: test accuracy {masked_acc:.4f} (masked) = {small_acc:.4f} (shrunk), "
        f"params {params[0]:,} -> {params[1]:,}, MACs/token {macs:,}"
    )

    # a plain fine-tune of the smaller model (a Trainer like the one above); dev picks the epoch
    fit(task, small, 1, seed=0, callbacks=[BestOnDev()], lr=3e-4, out_dir=tmp)
    tuned = evaluate(small, task.test, causal=False)["accuracy"]
    print(f"fine-tuned: test accuracy {tuned:.4f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = task.example_inputs()
    path = save_hf_model(out / "tagger.small.pt", small, inputs)  # mesimp
    again = mesimp.load_model(path)  # rebuilds BertForTokenClassification, replays the shrink
    with torch.no_grad():
        same = torch.equal(small.eval()(**inputs).logits, again(**inputs).logits)
    print(f"reloaded {path}: {'bit-identical' if same else 'DIFFERENT'}")
    r = export_hf_onnx(small, inputs, out / "tagger.small.onnx")  # mesimp
    print(f"wrote {r['path']} (onnxruntime matches PyTorch to {r['max_abs_diff']:.1e})")
    if not same:
        raise SystemExit("the reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
