"""CoNLL-U reading and vocabularies for part-of-speech tagging (UD treebanks such as EWT).

:func:`read_conllu` streams a CoNLL-U file line by line and keeps what a tagger or parser
needs: FORM, UPOS, HEAD and DEPREL of each word, the ``# sent_id`` comment and the line
where each sentence starts. Multiword-token lines (``1-2``) and empty nodes (``1.1``) are
skipped; other comments are ignored. Every problem in a file raises
:class:`~mesimp.errors.DataError` with a one-line ``path:line: ...`` message.

:class:`Vocab` maps words or tags to indices (``0`` is ``<pad>``, ``1`` the unknown
symbol) and converts to plain ``str``/``int``/``list``/``dict`` so it can be stored in a
checkpoint read with ``torch.load(weights_only=True)``. :func:`tagging_tensors` turns
sentences into padded index tensors; it is the only function here that imports torch.
"""

from __future__ import annotations

import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from mesimp.data.idx import _one_line
from mesimp.errors import BadInputError, DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BOS",
    "EOS",
    "NUM",
    "PAD",
    "PUNCT",
    "UNK",
    "UNK_TAG",
    "Sentence",
    "Vocab",
    "build_vocabs",
    "encode_tags",
    "iter_conllu",
    "read_conllu",
    "shape_class",
    "split_dev",
    "tagging_tensors",
]

PAD, UNK, NUM, PUNCT, UNK_TAG = "<pad>", "<unk>", "<num>", "<punct>", "<unk-tag>"
BOS, EOS = "<s>", "</s>"
# Reserved symbols at the start of each kind of vocabulary: index 0 pads, index 1 is the
# unknown symbol; word vocabularies add the two shape classes of unknown words, and
# language-model vocabularies ("lm": words that a model also predicts) add the sentence
# boundaries BOS and EOS after those.
SPECIALS: dict[str, tuple[str, ...]] = {
    "word": (PAD, UNK, NUM, PUNCT),
    "tag": (PAD, UNK_TAG),
    "lm": (PAD, UNK, NUM, PUNCT, BOS, EOS),
}
VocabKind = Literal["word", "tag", "lm"]
PAD_INDEX, UNK_INDEX = 0, 1
VOCAB_FORMAT = 1

COLUMNS = ("ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC")
MAX_LINE_BYTES = 1 << 20  # no CoNLL-U line comes near this; longer means a wrong file
_BOM = b"\xef\xbb\xbf"
_INT = re.compile(r"[0-9]+")
_RANGE = re.compile(r"[0-9]+-[0-9]+")  # multiword token, e.g. "1-2"
_EMPTY_NODE = re.compile(r"[0-9]+\.[0-9]+")  # enhanced-UD empty node, e.g. "8.1"
_SENT_ID = re.compile(r"#\s*sent_id\s*=(.*)")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:[.,:/]\d+)*|[.,]\d+)%?")


@dataclass
class Sentence:
    """One sentence: per-word FORM, UPOS, HEAD (0 = root) and DEPREL, all of equal length.

    ``line`` is the first line of the sentence's block in the file (its first comment,
    or its first word line when it has no comment), 1-based. ``path`` names the file for
    error messages; it is not part of equality.
    """

    words: list[str]
    upos: list[str]
    heads: list[int]
    deprels: list[str]
    sent_id: str | None = None
    line: int = 0
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.words)
        if not len(self.upos) == len(self.heads) == len(self.deprels) == n:
            raise DataError(
                f"{self.where()}: {n} words but {len(self.upos)} UPOS tags, "
                f"{len(self.heads)} heads and {len(self.deprels)} relations"
            )

    def __len__(self) -> int:
        return len(self.words)

    def where(self) -> str:
        """``path:line (sent_id ...)``, as far as known: for error messages."""
        loc = f"{self.path or '<sentence>'}:{self.line}"
        return loc + (f" (sent_id {self.sent_id})" if self.sent_id else "")


# ------------------------------------------------------------------------------- reading


def read_conllu(path: str | os.PathLike[str], max_len: int | None = None) -> list[Sentence]:
    """Read every sentence of a CoNLL-U file; see :func:`iter_conllu` for the rules."""
    return list(iter_conllu(path, max_len))


def iter_conllu(path: str | os.PathLike[str], max_len: int | None = None) -> Iterator[Sentence]:
    """Yield the sentences of a CoNLL-U file one at a time, reading it line by line.

    Format: one line per word with 10 tab-separated columns (ID FORM LEMMA UPOS XPOS FEATS
    HEAD DEPREL DEPS MISC); ``#`` comment lines (only ``# sent_id = ...`` is kept); a blank
    (or whitespace-only) line ends a sentence, and the last sentence needs none. The file
    must be UTF-8 (a leading BOM is dropped); a trailing ``\\r`` (CRLF files) is dropped.
    Multiword-token lines (``1-2``) and empty nodes (``1.1``) are skipped after checking
    their column count.

    Raises :class:`DataError` (``path:line: ...``) for a missing or unreadable file, bytes
    that are not UTF-8, a word line without exactly 10 columns, an ID that is not an
    integer, range or empty node, word IDs not running 1..n in order, a HEAD that is not an
    integer in 0..n, an empty FORM, UPOS or DEPREL, a sentence with no word lines, a
    sentence longer than ``max_len`` words, and a file with no sentences at all (empty, or
    only comments and blank lines). ``max_len`` below 1 raises :class:`BadInputError`.
    """
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
        raise BadInputError(f"max_len must be an integer or None, not {max_len!r}")
    if max_len is not None and max_len < 1:
        raise BadInputError(f"max_len must be at least 1, not {max_len}")
    name = os.fspath(path)
    p = Path(path)
    try:
        f = open(p, "rb")  # closed by the with below
    except FileNotFoundError as e:
        raise DataError(f"{name}: CoNLL-U file not found; check the path") from e
    except IsADirectoryError as e:
        raise DataError(f"{name}: is a directory, not a CoNLL-U file") from e
    except OSError as e:
        raise DataError(f"{name}: cannot open CoNLL-U file: {_one_line(e)}") from e
    with f:
        try:
            yield from _parse(f, name, max_len)
        except OSError as e:
            raise DataError(f"{name}: cannot read CoNLL-U file: {_one_line(e)}") from e


class _Block:
    """The sentence being read: words so far and what its checks need."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.upos: list[str] = []
        self.heads: list[int] = []
        self.deprels: list[str] = []
        self.n = 0  # word lines seen (may exceed len(words) once over max_len)
        self.sent_id: str | None = None
        self.start = 0  # first line of the block; 0 while the block is empty
        self.other_lines = 0  # multiword-token and empty-node lines
        self.max_head = 0
        self.max_head_at = (0, 0)  # (line, word ID) of the largest HEAD


def _parse(f: IO[bytes], name: str, max_len: int | None) -> Iterator[Sentence]:
    block = _Block()
    n_sent = 0
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            break
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(
                f"{name}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; "
                "this does not look like a CoNLL-U file"
            )
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{name}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1} of the line); CoNLL-U files must be UTF-8"
            ) from e

        if not line or line.isspace():
            if block.n or block.other_lines:
                n_sent += 1
                yield _finish(block, name, n_sent, max_len)
            if block.start:  # a block of only comments is dropped
                block = _Block()
            continue
        if not block.start:
            block.start = lineno
        if line.startswith("#"):
            m = _SENT_ID.match(line)
            if m:
                block.sent_id = m.group(1).strip() or None
            continue
        _add_line(block, line, name, lineno, max_len)

    if block.n or block.other_lines:
        n_sent += 1
        yield _finish(block, name, n_sent, max_len)
    if n_sent == 0:
        if lineno == 0:
            raise DataError(f"{name}:1: file is empty; expected CoNLL-U sentences")
        raise DataError(
            f"{name}:{lineno}: no sentences in {lineno} line{'s' * (lineno != 1)} "
            "(only comments and blank lines)"
        )


def _add_line(block: _Block, line: str, name: str, lineno: int, max_len: int | None) -> None:
    """Check one non-comment line and add it to ``block`` when it is a word line."""
    cols = line.split("\t")
    if len(cols) != len(COLUMNS):
        hint = " (columns must be separated by tabs, not spaces)" if len(cols) == 1 else ""
        raise DataError(
            f"{name}:{lineno}: expected 10 tab-separated columns, found {len(cols)}{hint}"
        )
    tid = cols[0]
    if not _INT.fullmatch(tid):
        if _RANGE.fullmatch(tid) or _EMPTY_NODE.fullmatch(tid):
            block.other_lines += 1
            return
        raise DataError(
            f"{name}:{lineno}: ID {_show(tid)} is not an integer, a range like 1-2 "
            "or an empty node like 1.1"
        )
    expected = block.n + 1
    if _int(tid) != expected:
        raise DataError(
            f"{name}:{lineno}: word ID {_show(tid)} out of order, expected {expected} "
            "(IDs must run 1..n within a sentence; is a blank line missing?)"
        )
    for col in (1, 3, 7):
        if not cols[col]:
            raise DataError(
                f"{name}:{lineno}: {COLUMNS[col]} of word {expected} is empty "
                "(write _ for no value)"
            )
    if not _INT.fullmatch(cols[6]):
        raise DataError(
            f"{name}:{lineno}: HEAD {_show(cols[6])} of word {expected} is not an integer"
        )
    head = _int(cols[6])
    block.n = expected
    if head > block.max_head:
        block.max_head, block.max_head_at = head, (lineno, expected)
    if max_len is None or expected <= max_len:  # past the limit: count, do not store
        block.words.append(cols[1])
        block.upos.append(cols[3])
        block.heads.append(head)
        block.deprels.append(cols[7])


def _finish(block: _Block, name: str, n_sent: int, max_len: int | None) -> Sentence:
    n = block.n
    if n == 0:
        raise DataError(
            f"{name}:{block.start}: sentence {n_sent} has only multiword-token or empty-node "
            "lines, no words"
        )
    if block.max_head > n:
        line, word = block.max_head_at
        raise DataError(
            f"{name}:{line}: HEAD {block.max_head} of word {word} is outside 0..{n} "
            f"(sentence {n_sent} has {n} words)"
        )
    if max_len is not None and n > max_len:
        raise DataError(
            f"{name}:{block.start}: sentence {n_sent} at line {block.start} has {n} tokens "
            f"> limit {max_len}"
        )
    return Sentence(
        block.words, block.upos, block.heads, block.deprels, block.sent_id, block.start, name
    )


def _int(s: str) -> int:
    """``int`` of an ASCII digit string; absurdly long ones (which would trip Python's
    int-digit limit) become a value no sentence reaches."""
    return int(s) if len(s) <= 18 else 10**18


def _show(s: str, limit: int = 40) -> str:
    """A field for a one-line message: quoted, escaped, cut at ``limit`` characters."""
    return repr(s[:limit]) + ("..." if len(s) > limit else "")


# ---------------------------------------------------------------------------- vocabularies


def shape_class(token: str) -> str:
    """The special symbol an unknown word maps to: ``<num>``, ``<punct>`` or ``<unk>``.

    ``<num>``: a number such as ``42``, ``-3``, ``3.14``, ``1,000``, ``10:30``, ``1/2``,
    ``.5`` or ``50%`` (Unicode decimal digits count). ``<punct>``: every character is
    punctuation or a symbol (Unicode categories P* and S*), e.g. ``...``, ``--``, ``$``,
    ``:)``. ``<unk>``: anything else, including the empty string.
    """
    if _NUMBER.fullmatch(token):
        return NUM
    if token and all(unicodedata.category(c)[0] in "PS" for c in token):
        return PUNCT
    return UNK


class Vocab:
    """Index of words or tags: ``itos[i]`` is the symbol of index ``i``.

    Indices start with reserved symbols: ``0 = <pad>`` and ``1 = <unk>`` for words
    (``<unk-tag>`` for tags), then for words ``2 = <num>`` and ``3 = <punct>``; the
    symbols seen in training follow, most frequent first (ties alphabetical). A data token
    that happens to read ``<pad>`` or ``<unk>`` is an ordinary token, never mistaken for
    the reserved index.

    Unknown words (``kind="word"`` or ``"lm"``), in order: the exact form; its lowercase form (so
    ``The`` at the start of a sentence finds ``the``); else its shape class,
    :func:`shape_class`: ``<num>`` for numbers, ``<punct>`` for all-punctuation/symbol
    tokens, ``<unk>`` otherwise. Training words below ``min_count`` are left out of the
    vocabulary and go through the same path, so the model learns embeddings for the
    three unknown classes from rare training words. Unknown tags (``kind="tag"``) map to
    ``<unk-tag>``; see :func:`encode_tags` to count or reject them. A language-model
    vocabulary (``kind="lm"``) is a word vocabulary with ``4 = <s>`` and ``5 = </s>``
    (sentence start and end) reserved as well.
    """

    def __init__(self, tokens: Iterable[str] = (), kind: VocabKind = "word") -> None:
        if kind not in SPECIALS:
            raise BadInputError(f"vocabulary kind must be 'word', 'tag' or 'lm', not {kind!r}")
        self.kind: str = kind
        self.specials: tuple[str, ...] = SPECIALS[kind]
        self._tokens: list[str] = list(tokens)
        self._stoi: dict[str, int] = {}
        for i, tok in enumerate(self._tokens, start=len(self.specials)):
            if not isinstance(tok, str):
                raise BadInputError(f"vocabulary tokens must be strings, not {type(tok).__name__}")
            if tok in self._stoi:
                raise BadInputError(f"vocabulary token {_show(tok)} appears twice")
            self._stoi[tok] = i

    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[str]],
        min_count: int = 1,
        kind: VocabKind = "word",
    ) -> Vocab:
        """Vocabulary of every token occurring at least ``min_count`` times in ``sequences``."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise BadInputError(f"min_count must be an integer >= 1, not {min_count!r}")
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(seq)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
        )
        return cls(kept, kind)

    @property
    def itos(self) -> list[str]:
        """Index -> symbol, reserved symbols first."""
        return [*self.specials, *self._tokens]

    @property
    def tokens(self) -> list[str]:
        """The learned symbols, without the reserved ones."""
        return list(self._tokens)

    @property
    def pad_index(self) -> int:
        return PAD_INDEX

    @property
    def bos_index(self) -> int:
        """Index of ``<s>`` (sentence start) in a language-model vocabulary."""
        return self._reserved(BOS)

    @property
    def eos_index(self) -> int:
        """Index of ``</s>`` (sentence end) in a language-model vocabulary."""
        return self._reserved(EOS)

    def _reserved(self, symbol: str) -> int:
        if symbol not in self.specials:
            raise BadInputError(f"a {self.kind} vocabulary has no {symbol} (use kind 'lm')")
        return self.specials.index(symbol)

    @property
    def unk_index(self) -> int:
        """Index of ``<unk>`` (words) or ``<unk-tag>`` (tags)."""
        return UNK_INDEX

    def __len__(self) -> int:
        return len(self.specials) + len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.kind == other.kind and self._tokens == other._tokens

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, compared by value

    def __repr__(self) -> str:
        return f"Vocab(kind={self.kind!r}, size={len(self)})"

    def lookup(self, token: str) -> int:
        """Index of ``token``, falling back as described in the class docstring."""
        i = self._stoi.get(token)
        if i is not None:
            return i
        if self.kind == "tag":
            return UNK_INDEX
        low = token.lower()
        if low != token:
            i = self._stoi.get(low)
            if i is not None:
                return i
        return self.specials.index(shape_class(token))

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Indices of ``tokens`` (never fails: unknown ones take the fallback)."""
        return [self.lookup(t) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Symbols of ``ids`` (reserved ones as their names, e.g. ``<unk>``)."""
        itos = self.itos
        return [itos[i] for i in ids]

    def to_dict(self) -> dict[str, Any]:
        """Plain ``str``/``int``/``list`` form, safe for ``torch.load(weights_only=True)``."""
        return {
            "format": VOCAB_FORMAT,
            "kind": self.kind,
            "specials": list(self.specials),
            "tokens": list(self._tokens),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Vocab:
        """Inverse of :meth:`to_dict`; a malformed dict raises :class:`DataError`."""
        if not isinstance(d, dict):
            raise DataError(f"vocabulary must be a dict, not {type(d).__name__}")
        if d.get("format") != VOCAB_FORMAT:
            raise DataError(
                f"vocabulary format {d.get('format')!r} is not supported (expected {VOCAB_FORMAT})"
            )
        kind = d.get("kind")
        if kind not in SPECIALS:
            raise DataError(f"vocabulary kind must be 'word', 'tag' or 'lm', not {kind!r}")
        if d.get("specials") != list(SPECIALS[kind]):
            raise DataError(
                f"{kind} vocabulary has reserved symbols {d.get('specials')!r}, "
                f"expected {list(SPECIALS[kind])}"
            )
        tokens = d.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError("vocabulary 'tokens' must be a list of strings")
        try:
            return cls(tokens, kind)
        except BadInputError as e:
            raise DataError(str(e)) from e


def build_vocabs(sentences: Iterable[Sentence], min_count: int = 1) -> tuple[Vocab, Vocab]:
    """Word vocabulary (words seen ``min_count`` times or more) and tag vocabulary (every
    UPOS tag seen) of the training ``sentences``."""
    sentences = list(sentences)
    words = Vocab.build((s.words for s in sentences), min_count, "word")
    tags = Vocab.build((s.upos for s in sentences), 1, "tag")
    return words, tags


def encode_tags(
    tags: Sequence[str],
    vocab: Vocab,
    on_unknown: Literal["map", "error"] = "map",
    *,
    sentence: Sentence | None = None,
) -> tuple[list[int], int]:
    """Tag indices of ``tags`` and the number of tags not in ``vocab``.

    ``on_unknown="map"`` maps each unknown tag to ``<unk-tag>`` (:attr:`Vocab.unk_index`),
    which no prediction matches, so it counts as an error in accuracy but never crashes.
    ``on_unknown="error"`` raises :class:`DataError` naming the tag and the sentence
    (``sentence`` supplies file, line and sent_id for the message).
    """
    if on_unknown not in ("map", "error"):
        raise BadInputError(f"on_unknown must be 'map' or 'error', not {on_unknown!r}")
    if vocab.kind != "tag":
        raise BadInputError(f"encode_tags needs a tag vocabulary, not a {vocab.kind} vocabulary")
    ids = vocab.encode(tags)
    unknown = [i for i, t in enumerate(tags) if t not in vocab]
    if unknown and on_unknown == "error":
        i = unknown[0]
        where = sentence.where() if sentence is not None else "tag sequence"
        word = f" ({_show(sentence.words[i])})" if sentence is not None else ""
        known = ", ".join(vocab.tokens[:20]) + (", ..." if len(vocab.tokens) > 20 else "")
        raise DataError(
            f"{where}: unknown tag {_show(tags[i])} at word {i + 1}{word}; "
            f"{len(unknown)} unknown in this sentence; known tags: {known}"
        )
    return ids, len(unknown)


def tagging_tensors(
    sentences: Sequence[Sentence],
    word_vocab: Vocab,
    tag_vocab: Vocab,
    *,
    on_unknown: Literal["map", "error"] = "map",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``(words [N, T], tags [N, T], lengths [N])`` int64 tensors, T = longest.

    Padding is index 0 in both. Unknown words take :class:`Vocab`'s fallback; unknown
    tags follow ``on_unknown`` (see :func:`encode_tags`); with ``"map"`` their number is
    ``(tags == tag_vocab.unk_index).sum()``.
    """
    import torch

    if word_vocab.kind != "word":
        raise BadInputError("tagging_tensors: word_vocab must be a word vocabulary")
    n = len(sentences)
    t = max((len(s) for s in sentences), default=0)
    words = torch.zeros((n, t), dtype=torch.long)
    tags = torch.zeros((n, t), dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, s in enumerate(sentences):
        k = len(s)
        lengths[i] = k
        if k:
            words[i, :k] = torch.tensor(word_vocab.encode(s.words), dtype=torch.long)
            ids, _ = encode_tags(s.upos, tag_vocab, on_unknown, sentence=s)
            tags[i, :k] = torch.tensor(ids, dtype=torch.long)
    return words, tags, lengths


def split_dev(
    sentences: Sequence[Sentence], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Sentence], list[Sentence]]:
    """Deterministic random split into ``(train, heldout)``, each in the original order.

    ``heldout`` has ``round(fraction * N)`` sentences, at least 1 when ``fraction > 0`` and
    ``N >= 2``, and leaves at least 1 for training. The same ``seed`` gives the same split.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise BadInputError(f"fraction must be a number, not {fraction!r}")
    if not 0 <= fraction < 1:
        raise BadInputError(f"fraction must be in [0, 1), not {fraction}")
    n = len(sentences)
    k = round(fraction * n)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    train = [s for i, s in enumerate(sentences) if i not in held]
    heldout = [s for i, s in enumerate(sentences) if i in held]
    return train, heldout


# the held-out split is fixed, so runs with different seeds see the same data
SPLIT_SEED = 0


def read_splits(
    read: Callable[[str | os.PathLike[str], int | None], list[Sentence]],
    train: str | os.PathLike[str],
    test: str | os.PathLike[str],
    dev: str | os.PathLike[str] | None,
    heldout: float,
    max_len: int | None,
) -> tuple[list[Sentence], list[Sentence], list[Sentence]]:
    """``(train, dev, test)`` sentences read with ``read``; without a ``dev`` file a fixed
    ``heldout`` fraction of ``train`` (``SPLIT_SEED``) is the dev split."""
    train_all = read(train, max_len)
    test_sents = read(test, max_len)
    if dev is not None:
        return train_all, read(dev, max_len), test_sents
    train_sents, dev_sents = split_dev(train_all, heldout, seed=SPLIT_SEED)
    return train_sents, dev_sents, test_sents
