"""Chen & Manning (2014)'s 48 features of an arc-standard configuration, and their ids.

Positions (C&M's Table, in their order): the top three stack items ``s1 s2 s3`` and the
first three buffer words ``b1 b2 b3``; for ``s1`` and ``s2`` their leftmost and rightmost
dependents ``lc1 rc1`` and the second ones ``lc2 rc2``; and ``lc1(lc1(s))``,
``rc1(rc1(s))`` for both. That is 18 positions: their word and their POS tag make 36
features, and the 12 dependent positions' arc labels 12 more, in that order
(``[words 0:18 | tags 18:36 | labels 36:48]``).

Ids: ``0`` = NULL (no such position), ``1`` = ROOT, and ``OFFSET + i`` for index ``i`` of
the :class:`~mesimp.data.conllu.Vocab` (words: unknown words take its fallback to
``<unk>``/``<num>``/``<punct>``; tags and labels: unknown ones ``<unk-tag>``). An
embedding table therefore has ``len(vocab) + OFFSET`` rows (:func:`table_size`).

POS features are the *gold* UPOS tags of the treebank (C&M used predicted tags).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesimp.data.arcstandard import Configuration
from mesimp.data.conllu import Sentence, Vocab

__all__ = [
    "N_FEATURES",
    "N_LABEL_FEATURES",
    "N_WORD_FEATURES",
    "NULL",
    "OFFSET",
    "ROOT",
    "ParserVocabs",
    "features",
    "table_size",
]

NULL, ROOT, OFFSET = 0, 1, 2
N_WORD_FEATURES = 18  # and as many tag features
N_LABEL_FEATURES = 12
N_FEATURES = 2 * N_WORD_FEATURES + N_LABEL_FEATURES  # 48


def table_size(vocab: Vocab) -> int:
    """Rows of the embedding table of a vocabulary's feature ids."""
    return len(vocab) + OFFSET


@dataclass
class ParserVocabs:
    """Words, UPOS tags and arc labels of the training data; labels fix the transitions."""

    words: Vocab
    tags: Vocab
    labels: Vocab

    @classmethod
    def build(cls, sentences: Sequence[Sentence], min_count: int = 2) -> ParserVocabs:
        """Words seen ``min_count`` times or more (rarer ones train the unknown-word
        classes), every tag and every label of ``sentences``."""
        return cls(
            Vocab.build((s.words for s in sentences), min_count, "word"),
            Vocab.build((s.upos for s in sentences), 1, "tag"),
            Vocab.build((s.deprels for s in sentences), 1, "tag"),
        )

    @property
    def label_names(self) -> list[str]:
        """Label of transition-label index ``i`` (LEFT-ARC is ``1 + i``)."""
        return self.labels.tokens

    def label_index(self, deprel: str) -> int:
        """Transition-label index of a relation; -1 for one unseen in training."""
        i = self.labels.lookup(deprel)
        return i - len(self.labels.specials) if i != self.labels.unk_index else -1

    def encode(self, sentence: Sentence) -> tuple[list[int], list[int]]:
        """Word and tag feature ids of positions ``0..n`` (0 is ROOT)."""
        words = [ROOT] + [OFFSET + i for i in self.words.encode(sentence.words)]
        tags = [ROOT] + [OFFSET + i for i in self.tags.encode(sentence.upos)]
        return words, tags

    def label_feature(self, label_index: int) -> int:
        """Feature id of transition-label index ``label_index``."""
        return OFFSET + len(self.labels.specials) + label_index

    def to_dict(self) -> dict[str, Any]:
        """The three vocabularies as the checkpoint's ``arch`` stores them."""
        return {
            "word_vocab": self.words.to_dict(),
            "tag_vocab": self.tags.to_dict(),
            "label_vocab": self.labels.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParserVocabs:
        return cls(
            Vocab.from_dict(d["word_vocab"]),
            Vocab.from_dict(d["tag_vocab"]),
            Vocab.from_dict(d["label_vocab"]),
        )


def features(
    c: Configuration, words: Sequence[int], tags: Sequence[int], label_base: int
) -> list[int]:
    """The 48 feature ids of configuration ``c`` (module docstring for the layout).

    ``words``/``tags``: ids of positions ``0..n`` (:meth:`ParserVocabs.encode`);
    ``label_base``: the feature id of transition-label index 0.
    """
    st, left, right, lab = c.stack, c.left, c.right, c.labels
    d = len(st)
    s1 = st[-1] if d >= 1 else -1
    s2 = st[-2] if d >= 2 else -1
    s3 = st[-3] if d >= 3 else -1
    nxt, n = c.next, c.n
    b1 = nxt if nxt <= n else -1
    b2 = nxt + 1 if nxt + 1 <= n else -1
    b3 = nxt + 2 if nxt + 2 <= n else -1
    deps = []
    for s in (s1, s2):
        if s < 0:
            deps += [-1] * 6
            continue
        lc, rc = left[s], right[s]
        lc1 = lc[-1] if lc else -1
        rc1 = rc[-1] if rc else -1
        lc2 = lc[-2] if len(lc) >= 2 else -1
        rc2 = rc[-2] if len(rc) >= 2 else -1
        llc = left[lc1][-1] if lc1 >= 0 and left[lc1] else -1
        rrc = right[rc1][-1] if rc1 >= 0 and right[rc1] else -1
        deps += [lc1, rc1, lc2, rc2, llc, rrc]
    # C&M's order: lc1 rc1 lc2 rc2 of s1, then of s2, then lc1(lc1) rc1(rc1) of s1, s2
    order = deps[0:4] + deps[6:10] + [deps[4], deps[5], deps[10], deps[11]]
    pos = [s1, s2, s3, b1, b2, b3, *order]
    out = [words[p] if p >= 0 else NULL for p in pos]
    out += [tags[p] if p >= 0 else NULL for p in pos]
    out += [label_base + lab[p] if p >= 0 else NULL for p in order]
    return out
