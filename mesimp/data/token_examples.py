"""Treebank sentences as token-id examples for transformer models (Hugging Face style).

Two tasks on a CoNLL-U treebank such as UD English EWT, with a word-level vocabulary
built from its training split (``mesimp.data.conllu.Vocab``; no subword tokenizer, so
one word is one token and tagging needs no label alignment):

* **UPOS tagging**: ``{"input_ids": word ids, "labels": UPOS ids}`` per sentence
  (``tagging_examples``).
* **Causal language modelling**: ``{"input_ids": [<s>, words..., </s>], "labels": the
  same}`` per sentence (``lm_examples``); the model shifts the labels itself (Hugging
  Face's ``*ForCausalLM`` do), so it predicts every word and the end of the sentence,
  never ``<s>``. Perplexity counts those predictions.

``PadCollator`` batches either kind the way Hugging Face models take it: ``input_ids``
right-padded with ``<pad>`` (index 0), ``attention_mask`` (1 = real token) and
``labels`` padded with -100, the index PyTorch's and Hugging Face's losses ignore.
Everything here is plain Python and torch: no ``transformers`` import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mesimp.data.conllu import Sentence, Vocab, encode_tags, read_conllu
from mesimp.errors import BadInputError, DataError

__all__ = [
    "IGNORE_INDEX",
    "PadCollator",
    "ewt_splits",
    "lm_examples",
    "tagging_examples",
    "token_count",
]

IGNORE_INDEX = -100  # labels that no loss counts (padding)
SPLITS = ("train", "dev", "test")


def ewt_splits(
    root: str | os.PathLike[str], max_len: int | None = None
) -> dict[str, list[Sentence]]:
    """The train, dev and test sentences of a UD treebank directory (``*-ud-train.conllu``
    and so on, as UD English EWT ships them). A missing directory or split is a one-line
    ``DataError`` naming it."""
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"{d}: treebank directory not found (expected UD English EWT's CoNLL-U)")
    out = {}
    for split in SPLITS:
        found = sorted(d.glob(f"*-ud-{split}.conllu"))
        if len(found) != 1:
            what = "no" if not found else "several"
            raise DataError(f"{d}: {what} *-ud-{split}.conllu file(s); expected exactly one")
        out[split] = read_conllu(found[0], max_len)
    return out


def tagging_examples(
    sentences: Sequence[Sentence], words: Vocab, tags: Vocab
) -> list[dict[str, list[int]]]:
    """One ``{"input_ids", "labels"}`` example per sentence: word ids and UPOS ids.

    Unknown words take the vocabulary's fallback; an unknown tag maps to ``<unk-tag>``,
    which no prediction matches (it counts as an error, never a crash)."""
    if words.kind != "word" or tags.kind != "tag":
        raise BadInputError("tagging_examples needs a word vocabulary and a tag vocabulary")
    return [
        {"input_ids": words.encode(s.words), "labels": encode_tags(s.upos, tags, sentence=s)[0]}
        for s in sentences
    ]


def lm_examples(sentences: Sequence[Sentence], vocab: Vocab) -> list[dict[str, list[int]]]:
    """One ``{"input_ids", "labels"}`` example per sentence: ``<s> words </s>``, labels
    equal to the inputs (a causal LM shifts them)."""
    if vocab.kind != "lm":
        raise BadInputError("lm_examples needs a language-model vocabulary (Vocab kind 'lm')")
    bos, eos = vocab.bos_index, vocab.eos_index
    out = []
    for s in sentences:
        ids = [bos, *vocab.encode(s.words), eos]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def token_count(examples: Sequence[dict[str, list[int]]], causal: bool) -> int:
    """How many predictions a metric averages over: every label, or for a causal LM
    every label but the first of each sentence (``<s>`` is never predicted)."""
    return sum(len(e["labels"]) - (1 if causal else 0) for e in examples)


@dataclass
class PadCollator:
    """Examples -> a batch of padded int64 tensors (``data_collator`` for the Trainer).

    ``input_ids`` are right-padded with ``pad_id``, ``attention_mask`` marks real tokens
    and ``labels`` (when the examples have them) are padded with -100. Right padding
    keeps every real token at the positions it has alone, so a causal model's outputs
    for a sentence do not depend on the batch it is in.
    """

    pad_id: int = 0

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise BadInputError("cannot collate an empty batch")
        n, t = len(examples), max(len(e["input_ids"]) for e in examples)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        has_labels = "labels" in examples[0]
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            if labels is not None:
                if len(e["labels"]) != k:
                    raise BadInputError(f"example {i}: {len(e['labels'])} labels for {k} input ids")
                labels[i, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        return batch
