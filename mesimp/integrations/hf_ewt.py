"""Two transformer tasks on UD English EWT, as the Hugging Face examples and the
benchmark run them: data, model, Trainer settings and metric in one place.

* ``upos``: UPOS tagging with a BERT-style encoder (``BertForTokenClassification``),
  word-level vocabulary of the training split (words seen twice or more), accuracy over
  every test word.
* ``lm``: causal language modelling with a Llama-style decoder (``LlamaForCausalLM``:
  RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention), word-level
  vocabulary (words seen three times or more; rarer words fall back to their lowercase
  form, then to ``<num>``/``<punct>``/``<unk>``), perplexity over every test word and
  sentence end.

Models are randomly initialised (nothing is downloaded). ``TaskSize`` holds the
architecture; ``FULL`` trains in minutes per epoch on two cores, ``QUICK`` in seconds
on a few hundred sentences. Model selection on dev: ``BestOnDev`` keeps the weights of
the epoch with the lowest dev loss (in memory) and restores them when training ends.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mesimp.data.conllu import Vocab, build_vocabs
from mesimp.data.token_examples import (
    IGNORE_INDEX,
    PadCollator,
    ewt_splits,
    lm_examples,
    tagging_examples,
)
from mesimp.errors import BadInputError
from mesimp.integrations.transformers import import_transformers

__all__ = [
    "DEFAULT_EWT",
    "FULL",
    "QUICK",
    "BestOnDev",
    "EwtTask",
    "TaskSize",
    "evaluate",
    "fit",
    "load_task",
    "training_args",
]

# ../shared/data/ud-english-ewt beside the repository checkout, as the Makefile expects
DEFAULT_EWT = Path(__file__).resolve().parents[3] / "shared" / "data" / "ud-english-ewt"
TaskName = Literal["upos", "lm"]
_hf = import_transformers()


@dataclass(frozen=True)
class TaskSize:
    """The transformer's shape and how much data it sees (``limit``: first N sentences
    of train, N // 4 of dev and test; None = all)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # the Llama model's key/value heads (grouped-query attention)
    ffn: int = 512
    limit: int | None = None


FULL = {"upos": TaskSize(ffn=512), "lm": TaskSize(ffn=384)}
QUICK = {
    "upos": TaskSize(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, limit=400),
    "lm": TaskSize(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, limit=400),
}
MIN_COUNT = {"upos": 2, "lm": 3}


@dataclass
class EwtTask:
    """One task's examples (``{"input_ids", "labels"}`` lists), vocabularies and size."""

    name: TaskName
    train: list[dict[str, list[int]]]
    dev: list[dict[str, list[int]]]
    test: list[dict[str, list[int]]]
    words: Vocab
    tags: Vocab | None
    size: TaskSize

    @property
    def causal(self) -> bool:
        return self.name == "lm"

    @property
    def metric_name(self) -> str:
        return "perplexity" if self.causal else "accuracy"

    def config(self, size: TaskSize | None = None) -> Any:
        """The Hugging Face config of this task's model (``size`` defaults to the task's)."""
        s = size or self.size
        longest = max(len(e["input_ids"]) for e in self.train + self.dev + self.test)
        if self.causal:
            return _hf.LlamaConfig(
                vocab_size=len(self.words),
                hidden_size=s.hidden,
                intermediate_size=s.ffn,
                num_hidden_layers=s.layers,
                num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads,
                max_position_embeddings=max(256, longest),
                use_cache=False,
                pad_token_id=self.words.pad_index,
                bos_token_id=self.words.bos_index,
                eos_token_id=self.words.eos_index,
            )
        return _hf.BertConfig(
            vocab_size=len(self.words),
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=s.ffn,
            max_position_embeddings=max(256, longest),
            num_labels=len(self.tags),
            pad_token_id=self.words.pad_index,
        )

    def build_model(self, seed: int, size: TaskSize | None = None) -> nn.Module:
        """A randomly initialised model (seeded), in train mode."""
        torch.manual_seed(seed)
        cls = _hf.LlamaForCausalLM if self.causal else _hf.BertForTokenClassification
        return cls(self.config(size)).train()

    def example_inputs(self, n: int = 4) -> dict[str, torch.Tensor]:
        """A few padded dev sentences: what tracing, shrink checks and export run on."""
        batch = PadCollator()(self.dev[:n])
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def size_dict(self) -> dict[str, Any]:
        return asdict(self.size)


def load_task(
    name: TaskName, root: str | os.PathLike | None = None, size: TaskSize | None = None
) -> EwtTask:
    """Read EWT and build a task's examples (``size`` defaults to ``FULL[name]``)."""
    if name not in ("upos", "lm"):
        raise BadInputError(f"task must be 'upos' or 'lm', got {name!r}")
    size = size or FULL[name]
    splits = ewt_splits(root or DEFAULT_EWT)
    if size.limit is not None:
        n = {"train": size.limit, "dev": max(size.limit // 4, 8), "test": max(size.limit // 4, 8)}
        splits = {k: v[: n[k]] for k, v in splits.items()}
    if name == "upos":
        words, tags = build_vocabs(splits["train"], MIN_COUNT[name])
        ex = {k: tagging_examples(v, words, tags) for k, v in splits.items()}
    else:
        words = Vocab.build((s.words for s in splits["train"]), MIN_COUNT[name], "lm")
        tags = None
        ex = {k: lm_examples(v, words) for k, v in splits.items()}
    return EwtTask(name, ex["train"], ex["dev"], ex["test"], words, tags, replace(size))


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[dict[str, list[int]]], causal: bool, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy over every labelled token (tagging) or perplexity over every predicted
    token (causal LM: each word and the sentence end), in eval mode, length-bucketed
    batches; the model's mode is restored."""
    was = model.training
    model.eval()
    collate = PadCollator()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    correct = total = 0
    nll = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = logits.logits.float()
        labels = batch["labels"]
        if causal:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        if causal:
            nll += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        else:
            correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    model.train(was)
    if causal:
        return {"perplexity": math.exp(nll / max(total, 1)), "tokens": total}
    return {"accuracy": correct / max(total, 1), "tokens": total}


class BestOnDev(_hf.TrainerCallback):
    """Keep the weights of the evaluation with the lowest ``eval_loss`` (in memory) and
    load them back when training ends: model selection on dev without checkpoints on
    disk. Needs ``eval_strategy`` set (e.g. ``"epoch"``)."""

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_epoch: float | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        loss = (metrics or {}).get("eval_loss")
        if model is not None and loss is not None and loss < self.best_loss:
            self.best_loss, self.best_epoch = float(loss), state.epoch
            self._state = copy.deepcopy(model.state_dict())
        return control

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> Any:
        if model is not None and self._state is not None:
            model.load_state_dict(self._state)
        return control


def training_args(
    out_dir: str | os.PathLike,
    epochs: float,
    seed: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 32,
    evaluate_dev: bool = True,
    logging_steps: int = 50,
) -> Any:
    """The Trainer settings every run of the examples and the benchmark uses: AdamW,
    linear decay after a short warm-up, clipping at 1, batches bucketed by length (less
    padding), CPU, no checkpoints on disk, dev loss every epoch."""
    return _hf.TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        weight_decay=0.01,
        warmup_steps=0.05,
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch" if evaluate_dev else "no",
        prediction_loss_only=True,
        save_strategy="no",
        logging_steps=logging_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )


def fit(
    task: EwtTask,
    model: nn.Module,
    epochs: float,
    seed: int,
    callbacks: list[Any] | tuple[Any, ...] = (),
    *,
    lr: float = 1e-3,
    logging_steps: int = 100,
    out_dir: str | os.PathLike | None = None,
) -> Any:
    """Train ``model`` on the task with a Hugging Face ``Trainer`` (``training_args``;
    dev loss every epoch) and return the Trainer after ``train()``."""
    with tempfile.TemporaryDirectory(prefix="hf-ewt-") as tmp:
        trainer = _hf.Trainer(
            model=model,
            args=training_args(out_dir or tmp, epochs, seed, lr=lr, logging_steps=logging_steps),
            train_dataset=task.train,
            eval_dataset=task.dev,
            data_collator=PadCollator(),
            callbacks=list(callbacks),
        )
        trainer.train()
    return trainer
