"""Sub-word features of the tagger: a word's 3-letter suffix and its shape.

Why these and not a character model: an unknown word's tag is mostly told by its
ending (``-ing``, ``-ly``, ``-ed``, ``-tion``) and its look (capitalised, digits,
hyphens, all caps); two extra embedding lookups give a tagger both at the cost of a
``Gather`` each, train as fast as the word embedding, and export to ONNX as plain
``Gather`` nodes, while a character CNN/LSTM would add a second recurrent model per
word to train, shrink and export on a shared 2-core machine.

A tagger with features reads ``x [N, T, 1 + len(FEATURES)]`` int64: channel 0 is the
word id (0 = padding, as before), then one id per feature (0 = padding too). Each
feature has its own :class:`~mesimp.data.conllu.Vocab` (kind ``"word"``) built from the
training sentences with the same ``min_count`` as the words, so rare suffixes and
shapes take the unknown path and its embedding is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mesimp.data.conllu import Sentence, Vocab
from mesimp.errors import DataError

__all__ = [
    "FEATURES",
    "build_feature_vocabs",
    "feature_strings",
    "feature_vocabs_from_arch",
    "tagger_input",
    "word_shape",
]

SUFFIX_LEN = 3
SHAPE_MAX = 6  # characters of a shape string kept (runs already collapsed)


def word_shape(token: str) -> str:
    """``Xx`` style shape: upper -> ``X``, lower -> ``x``, digit -> ``d``, other
    characters kept as they are; runs of the same symbol collapsed, cut at
    ``SHAPE_MAX``. ``McDonald`` -> ``XxXx``, ``U.S.`` -> ``X.X.``, ``3.14`` -> ``d.d``,
    ``well-known`` -> ``x-x``."""
    out: list[str] = []
    for c in token:
        s = "X" if c.isupper() else "x" if c.islower() else "d" if c.isdigit() else c
        if not out or out[-1] != s:
            out.append(s)
    return "".join(out[:SHAPE_MAX])


def _suffix(token: str) -> str:
    return token.lower()[-SUFFIX_LEN:]


FEATURES: dict[str, Callable[[str], str]] = {"suffix3": _suffix, "shape": word_shape}


def feature_strings(token: str) -> list[str]:
    """The feature strings of one word, in ``FEATURES`` order."""
    return [f(token) for f in FEATURES.values()]


def build_feature_vocabs(sentences: Sequence[Sentence], min_count: int = 2) -> list[Vocab]:
    """One vocabulary per feature, from the training sentences."""
    return [
        Vocab.build(([f(w) for w in s.words] for s in sentences), min_count, "word")
        for f in FEATURES.values()
    ]


def tagger_input(
    sentences: Sequence[Sentence], word_ids: torch.Tensor, vocabs: Sequence[Vocab]
) -> torch.Tensor:
    """``word_ids [N, T]`` (from ``tagging_tensors``) with the feature channels added:
    ``[N, T, 1 + len(vocabs)]``; no vocabularies -> ``word_ids`` unchanged."""
    if not vocabs:
        return word_ids
    n, t = word_ids.shape
    x = torch.zeros((n, t, 1 + len(vocabs)), dtype=torch.long)
    x[..., 0] = word_ids
    fns = list(FEATURES.values())
    for i, s in enumerate(sentences):
        if not len(s):
            continue
        for c, (f, v) in enumerate(zip(fns, vocabs, strict=True), start=1):
            x[i, : len(s), c] = torch.tensor([v.lookup(f(w)) for w in s.words])
    return x


def feature_vocabs_from_arch(arch: dict[str, Any]) -> list[Vocab]:
    """The feature vocabularies stored in a tagger's ``arch`` (none for a word-only one)."""
    dicts = arch.get("feature_vocabs") or []
    sizes = list(arch.get("feature_vocab_sizes") or [])
    if len(dicts) != len(sizes):
        raise DataError(
            f"the tagger has {len(sizes)} feature embeddings but {len(dicts)} feature vocabularies"
        )
    vocabs = [Vocab.from_dict(d) for d in dicts]
    for v, n in zip(vocabs, sizes, strict=True):
        if len(v) > n:
            raise DataError(f"a feature vocabulary ({len(v)}) exceeds its embedding ({n} rows)")
    return vocabs
