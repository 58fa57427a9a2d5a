"""Token-id examples for transformer models (``mesimp.data.token_examples``): EWT splits,
the tagging and language-model encodings, and the padding collator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mesimp.data.conllu import BOS, EOS, Sentence, Vocab, build_vocabs
from mesimp.data.token_examples import (
    IGNORE_INDEX,
    PadCollator,
    ewt_splits,
    lm_examples,
    tagging_examples,
    token_count,
)
from mesimp.errors import BadInputError, DataError

EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"


def _sent(words: list[str], tags: list[str]) -> Sentence:
    n = len(words)
    return Sentence(words, tags, [0] * n, ["dep"] * n)


SENTS = [
    _sent(["The", "dog", "barks", "."], ["DET", "NOUN", "VERB", "PUNCT"]),
    _sent(["A", "dog", "sleeps"], ["DET", "NOUN", "VERB"]),
]


def test_lm_vocab_reserves_sentence_boundaries_and_round_trips():
    v = Vocab.build((s.words for s in SENTS), 1, "lm")
    assert v.itos[:6] == ["<pad>", "<unk>", "<num>", "<punct>", BOS, EOS]
    assert v.bos_index == 4 and v.eos_index == 5
    assert v.lookup(BOS) == 1  # a word that reads "<s>" is no sentence boundary
    with pytest.raises(BadInputError, match="no <s>"):
        _ = Vocab.build([["a"]], 1, "word").bos_index
    assert v.lookup("dog") == 6  # the most frequent word follows the reserved symbols
    assert v.lookup("the") == 1 and v.lookup("DOG") == v.lookup("dog")  # lowercase fallback
    assert v.lookup("42") == 2 and v.lookup("zebra") == 1
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(DataError, match="reserved"):
        Vocab.from_dict({**v.to_dict(), "specials": ["<pad>", "<unk>"]})


def test_lm_examples_wrap_sentences_in_boundaries():
    v = Vocab.build((s.words for s in SENTS), 1, "lm")
    ex = lm_examples(SENTS, v)
    assert ex[0]["input_ids"] == [4, *v.encode(SENTS[0].words), 5]
    assert ex[0]["labels"] == ex[0]["input_ids"]
    assert token_count(ex, causal=True) == (4 + 1) + (3 + 1)  # every word and the end
    with pytest.raises(BadInputError, match="language-model vocabulary"):
        lm_examples(SENTS, Vocab.build((s.words for s in SENTS), 1, "word"))


def test_tagging_examples_map_words_and_tags():
    words, tags = build_vocabs(SENTS)
    ex = tagging_examples(SENTS, words, tags)
    assert tags.decode(ex[0]["labels"]) == SENTS[0].upos
    assert words.decode(ex[1]["input_ids"]) == ["A", "dog", "sleeps"]
    assert token_count(ex, causal=False) == 7
    with pytest.raises(BadInputError):
        tagging_examples(SENTS, tags, words)


def test_pad_collator_pads_right_and_ignores_padding_in_labels():
    batch = PadCollator()(
        [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())
    unlabelled = PadCollator(pad_id=9)([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    assert set(unlabelled) == {"input_ids", "attention_mask"}
    assert unlabelled["input_ids"].tolist() == [[1, 9], [1, 2]]
    with pytest.raises(BadInputError, match="2 labels for 1 input ids"):
        PadCollator()([{"input_ids": [1], "labels": [1, 2]}])
    with pytest.raises(BadInputError, match="empty batch"):
        PadCollator()([])


def test_ewt_splits_name_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="treebank directory not found"):
        ewt_splits(tmp_path / "nope")
    (tmp_path / "x-ud-train.conllu").write_text("1\ta\ta\tX\tX\t_\t0\troot\t_\t_\n")
    with pytest.raises(DataError, match="no \\*-ud-dev.conllu"):
        ewt_splits(tmp_path)


@pytest.mark.skipif(not EWT.is_dir(), reason=f"{EWT} not found")
def test_ewt_splits_read_the_official_split():
    splits = ewt_splits(EWT)
    assert [len(splits[k]) for k in ("train", "dev", "test")] == [12544, 2001, 2077]
