"""A Llama-style language model trained by the Hugging Face Trainer, made smaller by mesimp.

    python examples/hf_causal_lm.py [--quick] [--data DIR] [--out DIR] [--epochs N]
                                    [--no-simplify]

The sentences of UD English EWT (train to train, dev to pick the epoch, test to
report perplexity), a word-level vocabulary with sentence start and end,
``LlamaForCausalLM`` (RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention)
from random init. ``MesimpCallback`` (the lines marked ``# mesimp``) applies meProp,
runs meSimp in the Trainer and shrinks at the end; the smaller model is fine-tuned,
saved as a mesimp model file (reloaded bit-identically) and exported to ONNX.

meSimp on a Llama removes gated-MLP units (gate and up rows, down column together),
query-head slots and kv heads (grouped-query attention: every kv head keeps as many
query heads) and the hidden size (the stream: embeddings, every writer and reader, the
RMSNorms, the LM head's columns). ``--no-simplify`` trains with meProp only (nothing is
removed) and runs the rest.
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
    p.add_argument("--no-simplify", action="store_true", help="meProp only: remove nothing")
    a = p.parse_args()
    torch.set_num_threads(1)  # small matrices: one thread is fastest on a shared machine
    task = load_task("lm", a.data, (QUICK if a.quick else FULL)["lm"])
    epochs = a.epochs or (2 if a.quick else 5)
    model = task.build_model(seed=0)
    macs = mesimp.models.count_macs(model)
    print(f"{len(task.train)} sentences, {len(task.words)} words, dense MACs/token {macs:,}")

    simplify = mesimp.SimplifyConfig(prune_rate=0.05, points_per_epoch=4, cycle_epochs=1)
    callback = MesimpCallback(  # mesimp
        mesimp.MePropConfig(k=0.25, selection="unified"), None if a.no_simplify else simplify
    )
    tmp = tempfile.mkdtemp(prefix="hf-lm-")
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

    # mesimp: the same LlamaForCausalLM with fewer units (a plain copy with --no-simplify)
    small = callback.shrunk or mesimp.shrink(model, task.example_inputs())
    masked_ppl = evaluate(model, task.test, causal=True)["perplexity"]
    small_ppl = evaluate(small, task.test, causal=True)["perplexity"]
    params = [mesimp.models.count_params(m) for m in (model, small)]
    macs = mesimp.models.count_macs(small)
    print(
        f"shrunk: test perplexity {masked_ppl:.2f} (masked) = {small_ppl:.2f} (shrunk), "
        f"params {params[0]:,} -> {params[1]:,}, MACs/token {macs:,}"
    )

    # a plain fine-tune of the smaller model (a Trainer like the one above); dev picks the epoch
    fit(task, small, 1, seed=0, callbacks=[BestOnDev()], lr=3e-4, out_dir=tmp)
    tuned = evaluate(small, task.test, causal=True)["perplexity"]
    print(f"fine-tuned: test perplexity {tuned:.2f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = task.example_inputs()
    path = save_hf_model(out / "lm.small.pt", small, inputs)  # mesimp
    again = mesimp.load_model(path)  # rebuilds LlamaForCausalLM, replays the shrink
    with torch.no_grad():
        same = torch.equal(small.eval()(**inputs).logits, again(**inputs).logits)
    print(f"reloaded {path}: {'bit-identical' if same else 'DIFFERENT'}")
    r = export_hf_onnx(small, inputs, out / "lm.small.onnx")  # mesimp
    print(f"wrote {r['path']} (onnxruntime matches PyTorch to {r['max_abs_diff']:.1e})")
    if not same:
        raise SystemExit("the reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
