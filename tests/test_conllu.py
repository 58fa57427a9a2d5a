"""Tests for mesimp.data.conllu: the CoNLL-U reader, vocabularies and tagging tensors.

Real data: the UD English EWT dev and test files (CC BY-SA 4.0) under
../shared/data/ud-english-ewt (beside the repository); those tests skip when the files are absent.

Hypothesis example counts (stated in each ``@settings``):
- round trip of random sentences written as CoNLL-U: 200 examples;
- random text (UTF-8) fed to the reader: 300; random bytes: 300;
- random mutations of a valid file (delete / duplicate / replace / insert bytes, tabs,
  newlines, invalid UTF-8 included): 300;
- vocabulary build / to_dict / from_dict round trip: 100.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mesimp.data import (
    Sentence,
    Vocab,
    build_vocabs,
    encode_tags,
    iter_conllu,
    read_conllu,
    shape_class,
    split_dev,
    tagging_tensors,
)
from mesimp.data import conllu as conllu_mod
from mesimp.errors import BadInputError, DataError

# ../shared/data beside the repository, as the project lays it out (CI clones the same way).
EWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
UPOS = "ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X".split()
DEPRELS = ["root", "nsubj", "obj", "det", "case", "punct", "nmod:poss", "_"]
ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB_FUZZ = settings(max_examples=100, deadline=None)

# The first sentence of en_ewt-ud-dev.conllu, verbatim (tabs as \t).
DEV_FIRST = (
    "# newdoc id = weblog-blogspot.com_nominations_20041117172713_ENG_20041117_172713\n"
    "# sent_id = weblog-blogspot.com_nominations_20041117172713_ENG_20041117_172713-0001\n"
    "# newpar id = weblog-blogspot.com_nominations_20041117172713_ENG_20041117_172713-p0001\n"
    "# text = From the AP comes this story :\n"
    "1\tFrom\tfrom\tADP\tIN\t_\t3\tcase\t3:case\t_\n"
    "2\tthe\tthe\tDET\tDT\tDefinite=Def|PronType=Art\t3\tdet\t3:det\t_\n"
    "3\tAP\tAP\tPROPN\tNNP\tNumber=Sing\t4\tobl\t4:obl:from\t_\n"
    "4\tcomes\tcome\tVERB\tVBZ\tMood=Ind|Number=Sing|Person=3|Tense=Pres|VerbForm=Fin\t0\troot"
    "\t0:root\t_\n"
    "5\tthis\tthis\tDET\tDT\tNumber=Sing|PronType=Dem\t6\tdet\t6:det\t_\n"
    "6\tstory\tstory\tNOUN\tNN\tNumber=Sing\t4\tnsubj\t4:nsubj\t_\n"
    "7\t:\t:\tPUNCT\t:\t_\t4\tpunct\t4:punct\t_\n"
    "\n"
)


def tok(i: int | str, word: str, upos: str = "NOUN", head: int | str = 0, rel: str = "root") -> str:
    """One CoNLL-U word line (no newline)."""
    return f"{i}\t{word}\t_\t{upos}\t_\t_\t{head}\t{rel}\t_\t_"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def data_error(path: Path, match: str | None = None, **kw: object) -> str:
    """Read ``path`` expecting a one-line DataError; return its message."""
    with pytest.raises(DataError, match=match) as info:
        read_conllu(path, **kw)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    return msg


# ------------------------------------------------------------------------------- real data


def count_blocks(path: Path) -> tuple[int, int]:
    """Sentences and word lines, counted with a plain loop independent of the reader: a
    sentence is a run of non-blank lines holding at least one non-comment line; a word
    line is one whose first field is all digits."""
    sentences = words = 0
    in_sentence = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line == "":
            sentences += in_sentence
            in_sentence = False
        elif not line.startswith("#"):
            in_sentence = True
            words += line.split("\t")[0].isdigit()
    return sentences + in_sentence, words


@pytest.fixture(scope="module")
def ewt() -> dict[str, list[Sentence]]:
    files = {k: EWT / f"en_ewt-ud-{k}.conllu" for k in ("dev", "test")}
    if not all(f.is_file() for f in files.values()):
        pytest.skip(f"UD English EWT not found under {EWT}")
    return {k: read_conllu(f) for k, f in files.items()}


@pytest.mark.parametrize(
    ("split", "n_sent", "n_words"), [("dev", 2001, 25147), ("test", 2077, 25094)]
)
def test_real_counts(ewt: dict[str, list[Sentence]], split: str, n_sent: int, n_words: int) -> None:
    path = EWT / f"en_ewt-ud-{split}.conllu"
    assert count_blocks(path) == (n_sent, n_words)
    sents = ewt[split]
    assert len(sents) == n_sent and sum(len(s) for s in sents) == n_words
    for s in sents:
        assert len(s.words) == len(s.upos) == len(s.heads) == len(s.deprels) >= 1
        assert all(0 <= h <= len(s) for h in s.heads) and s.heads.count(0) >= 1
        assert s.sent_id and s.path == str(path)
    assert len({s.sent_id for s in sents}) == n_sent
    lines = path.read_text(encoding="utf-8").split("\n")
    assert all(lines[s.line - 1].startswith("# ") for s in sents)  # each block opens with comments
    assert all(lines[s.line - 2] == "" for s in sents[1:])


def test_real_first_sentence(ewt: dict[str, list[Sentence]]) -> None:
    assert (EWT / "en_ewt-ud-dev.conllu").read_text(encoding="utf-8").startswith(DEV_FIRST)
    word_lines = [ln.split("\t") for ln in DEV_FIRST.splitlines() if ln and ln[0].isdigit()]
    first = ewt["dev"][0]
    assert first.words == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert first.words == [cols[1] for cols in word_lines]
    assert first.upos == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]
    assert first.upos == [cols[3] for cols in word_lines]
    assert first.heads == [3, 3, 4, 0, 6, 4, 4]
    assert first.deprels == ["case", "det", "obl", "root", "det", "nsubj", "punct"]
    assert (
        first.sent_id == "weblog-blogspot.com_nominations_20041117172713_ENG_20041117_172713-0001"
    )
    assert first.line == 1 and ewt["dev"][1].line == 13


def test_real_upos_tags(ewt: dict[str, list[Sentence]]) -> None:
    for sents in ewt.values():
        assert {t for s in sents for t in s.upos} == set(UPOS)
    _, tags = build_vocabs(ewt["dev"])
    assert len(tags) == 2 + 17 and set(tags.tokens) == set(UPOS)


def test_real_multiword_and_empty_nodes_skipped(ewt: dict[str, list[Sentence]]) -> None:
    """dev line 158 is ``29-30 didn't``; line 1602 is the empty node ``8.1 write``."""
    lines = (EWT / "en_ewt-ud-dev.conllu").read_text(encoding="utf-8").split("\n")
    assert lines[157].startswith("29-30\tdidn't\t") and lines[1601].startswith("8.1\twrite\t")
    for at in (158, 1602):
        sent = max((s for s in ewt["dev"] if s.line <= at), key=lambda s: s.line)
        block = lines[sent.line - 1 : lines.index("", sent.line - 1)]
        word_lines = [ln.split("\t") for ln in block if ln.split("\t")[0].isdigit()]
        assert sent.words == [cols[1] for cols in word_lines]
        assert lines[at - 1] in block and len(word_lines) < len(block)  # the skipped line
    mwt = max((s for s in ewt["dev"] if s.line <= 158), key=lambda s: s.line)
    assert mwt.words[28:30] == ["did", "n't"] and "didn't" not in mwt.words


def test_real_max_len(ewt: dict[str, list[Sentence]]) -> None:
    path = EWT / "en_ewt-ud-dev.conllu"
    longest = max(len(s) for s in ewt["dev"])
    assert len(read_conllu(path, max_len=longest)) == 2001
    idx = next(i for i, s in enumerate(ewt["dev"]) if len(s) == longest)
    at = ewt["dev"][idx].line
    msg = data_error(path, max_len=longest - 1)
    assert msg == (
        f"{path}:{at}: sentence {idx + 1} at line {at} has {longest} tokens > limit {longest - 1}"
    )


def test_real_tagging_tensors(ewt: dict[str, list[Sentence]]) -> None:
    train, held = split_dev(ewt["dev"], 0.1, seed=0)
    assert (len(train), len(held)) == (1801, 200)
    words, tags = build_vocabs(train, min_count=2)
    x, y, lengths = tagging_tensors(ewt["test"], words, tags)
    longest = max(len(s) for s in ewt["test"])
    assert x.shape == y.shape == (2077, longest) and lengths.shape == (2077,)
    assert x.dtype == y.dtype == lengths.dtype == torch.long
    assert int(lengths.sum()) == 25094
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    assert bool((x[~mask] == 0).all()) and bool((y[~mask] == 0).all())
    assert bool((x[mask] > 0).all()) and bool((y[mask] > 1).all())  # no pad, no <unk-tag>
    assert 0.05 < float((x[mask] == 1).float().mean()) < 0.3  # some, not most, unknown


# ----------------------------------------------------------------------- hand-written files


def test_comments_multiword_and_empty_nodes_skipped(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# newdoc id = d1",
            "# sent_id = s1",
            "# text = Don't go.",
            "1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_",
            tok(1, "Do", "AUX", 3, "aux"),
            tok(2, "n't", "PART", 3, "advmod"),
            tok(3, "go", "VERB", 0, "root"),
            "3.1\tgo\tgo\tVERB\t_\t_\t_\t_\t3:conj\t_",
            tok(4, ".", "PUNCT", 3, "punct"),
            "",
            "#sent_id=s2  ",
            tok(1, "Hi", "INTJ"),
            "",
            tok(1, "Bye", "INTJ"),
            "",
        ]
    )
    sents = read_conllu(write(tmp_path / "a.conllu", text))
    assert sents == [
        Sentence(
            ["Do", "n't", "go", "."],
            ["AUX", "PART", "VERB", "PUNCT"],
            [3, 3, 0, 3],
            ["aux", "advmod", "root", "punct"],
            "s1",
            1,
        ),
        Sentence(["Hi"], ["INTJ"], [0], ["root"], "s2", 11),
        Sentence(["Bye"], ["INTJ"], [0], ["root"], None, 14),
    ]
    assert all(s.path == str(tmp_path / "a.conllu") for s in sents)


@pytest.mark.parametrize(
    "variant", ["no-trailing-blank", "bom", "crlf", "extra-blanks", "comment-only-block"]
)
def test_layout_variants(tmp_path: Path, variant: str) -> None:
    lines = [tok(1, "a"), "", "# sent_id = 2", tok(1, "b", "VERB"), tok(2, "c", "X", 1, "obj"), ""]
    text = "\n".join(lines)
    first_lines = [1, 3]
    if variant == "no-trailing-blank":
        text = text.rstrip("\n")
    elif variant == "bom":
        text = "\ufeff" + text
    elif variant == "crlf":
        text = text.replace("\n", "\r\n")
    elif variant == "extra-blanks":
        text = "\n\n" + text.replace("\n\n", "\n \n\t\n\n") + "\n\n"
        first_lines = [3, 7]
    elif variant == "comment-only-block":
        text = "# orphan comment\n\n" + text + "\n# trailing comment\n"
        first_lines = [3, 5]
    sents = read_conllu(write(tmp_path / "f", text))
    assert sents == [
        Sentence(["a"], ["NOUN"], [0], ["root"], None, first_lines[0]),
        Sentence(["b", "c"], ["VERB", "X"], [0, 1], ["root", "obj"], "2", first_lines[1]),
    ]


def test_bom_only_at_file_start(tmp_path: Path) -> None:
    msg = data_error(write(tmp_path / "f", tok(1, "a") + "\n\n\ufeff" + tok(1, "b")))
    assert msg.startswith(f"{tmp_path / 'f'}:3: ID '\\ufeff1' is not an integer")


def test_words_with_spaces_and_odd_characters(tmp_path: Path) -> None:
    words = ["New York", "#hash", "\u00e9t\u00e9", "_", "<pad>", "a\rb", "\U0001f600"]
    text = "".join(tok(i, w, head=i - 1) + "\n" for i, w in enumerate(words, 1))
    (s,) = read_conllu(write(tmp_path / "f", text))
    assert s.words == words and s.heads == list(range(len(words)))


def test_iter_conllu_streams(tmp_path: Path) -> None:
    path = write(tmp_path / "f", tok(1, "a") + "\n\n" + tok(2, "b") + "\n")
    it = iter_conllu(path)
    assert next(it).words == ["a"]  # the first sentence comes before the error in the second
    with pytest.raises(DataError, match=":3: word ID '2' out of order"):
        next(it)


# ------------------------------------------------------------------------------ bad inputs

GOOD = tok(1, "a", head=0) + "\n"
BAD_CASES = [
    # (file content, line in message, regex)
    (GOOD + "2\tb\t_\tNOUN\t_\t_\t1\tdep\t_\n", 2, "expected 10 tab-separated columns, found 9"),
    (GOOD + tok(2, "b", head=1) + "\t_\n", 2, "found 11"),
    ("1 a _ NOUN _ _ 0 root _ _\n", 1, r"found 1 \(columns must be separated by tabs"),
    (GOOD + tok("x", "b") + "\n", 2, "ID 'x' is not an integer"),
    (GOOD + tok("2a", "b") + "\n", 2, "ID '2a' is not an integer"),
    (GOOD + tok("1-x", "b") + "\n", 2, "ID '1-x' is not an integer"),
    (GOOD + tok(2, "b", head="x") + "\n", 2, "HEAD 'x' of word 2 is not an integer"),
    (GOOD + tok(2, "b", head="_") + "\n", 2, "HEAD '_' of word 2 is not an integer"),
    (GOOD + tok(2, "b", head="-1") + "\n", 2, "HEAD '-1' of word 2 is not an integer"),
    (GOOD + tok(3, "b", head=1) + "\n", 2, "word ID '3' out of order, expected 2"),
    (tok(2, "a") + "\n", 1, "word ID '2' out of order, expected 1"),
    (tok(0, "a") + "\n", 1, "word ID '0' out of order, expected 1"),
    (GOOD + tok(1, "b") + "\n", 2, r"word ID '1' out of order, expected 2 .*blank line missing"),
    (GOOD + tok(2, "b", head=9) + "\n", 2, r"HEAD 9 of word 2 is outside 0\.\.2"),
    (GOOD + tok(2, "b", head="9" * 30) + "\n", 2, r"HEAD 10+ of word 2 is outside 0\.\.2"),
    (tok(1, "") + "\n", 1, "FORM of word 1 is empty"),
    (tok(1, "a", upos="") + "\n", 1, "UPOS of word 1 is empty"),
    (GOOD + "\n# c\n1-2\tab\t_\t_\t_\t_\t_\t_\t_\t_\n", 3, "sentence 2 has only multiword"),
    ("", 1, "file is empty"),
    ("# only\n# comments\n", 2, r"no sentences in 2 lines \(only comments and blank lines\)"),
    ("\n \n\n", 3, "no sentences in 3 lines"),
    ("\ufeff", 1, "no sentences in 1 line "),
]


@pytest.mark.parametrize(("content", "line", "match"), BAD_CASES)
def test_bad_input(tmp_path: Path, content: str, line: int, match: str) -> None:
    path = write(tmp_path / "bad.conllu", content)
    msg = data_error(path, match)
    assert msg.startswith(f"{path}:{line}: ")


def test_bad_utf8(tmp_path: Path) -> None:
    data = (GOOD + "\n").encode() + tok(1, "caf").encode() + b"\xe9\n" + tok(2, "b").encode()
    path = write(tmp_path / "latin1.conllu", data)
    msg = data_error(path, "invalid UTF-8")
    assert msg.startswith(f"{path}:3: invalid UTF-8 (byte 0xe9 at byte")


def test_too_long_sentence(tmp_path: Path) -> None:
    lines = [tok(1, "a"), "", *(tok(i, "w", head=i - 1) for i in range(1, 7)), ""]
    path = write(tmp_path / "long.conllu", "\n".join(lines))
    assert len(read_conllu(path, max_len=6)) == 2
    msg = data_error(path, max_len=5)
    assert msg == f"{path}:3: sentence 2 at line 3 has 6 tokens > limit 5"


@pytest.mark.parametrize("max_len", [0, -1, 2.5, True, "5"])
def test_bad_max_len(tmp_path: Path, max_len: object) -> None:
    with pytest.raises(BadInputError, match="max_len"):
        read_conllu(write(tmp_path / "f", GOOD), max_len=max_len)  # type: ignore[arg-type]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    msg = data_error(tmp_path / "nope.conllu", "not found")
    assert msg.startswith(f"{tmp_path / 'nope.conllu'}: ")
    msg = data_error(tmp_path, "directory")
    assert msg.startswith(f"{tmp_path}: ")


def test_overlong_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conllu_mod, "MAX_LINE_BYTES", 64)
    path = write(tmp_path / "f", GOOD + tok(2, "x" * 100, head=1) + "\n")
    assert data_error(path, "longer than 64 bytes").startswith(f"{path}:2: ")
    assert len(read_conllu(write(tmp_path / "g", GOOD + tok(2, "x" * 20, head=1)))) == 1


# ---------------------------------------------------------------------- hypothesis: reader

WORD_CHARS = st.characters(exclude_characters="\t\n", exclude_categories=("Cs",))


@st.composite
def documents(draw: st.DrawFn) -> tuple[bytes, list[Sentence]]:
    """Random sentences written as CoNLL-U with random extras (comments, multiword lines,
    empty nodes, BOM, CRLF, extra blank lines, no trailing blank), and what must be read."""
    crlf, bom = draw(st.booleans()), draw(st.booleans())
    out: list[str] = [""] * draw(st.integers(0, 2))
    expected = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 8))
        words = draw(st.lists(st.text(WORD_CHARS, min_size=1, max_size=6), min_size=n, max_size=n))
        upos = draw(st.lists(st.sampled_from(UPOS), min_size=n, max_size=n))
        heads = draw(st.lists(st.integers(0, n), min_size=n, max_size=n))
        rels = draw(st.lists(st.sampled_from(DEPRELS), min_size=n, max_size=n))
        sent_id = draw(
            st.none() | st.text(string.ascii_letters + string.digits + "-_.", min_size=1)
        )
        start = len(out) + 1
        if draw(st.booleans()):
            out.append("# newdoc")
        if sent_id is not None:
            out.append(f"# sent_id = {sent_id}")
        if draw(st.booleans()):
            out.append("# text = " + " ".join(words))
        for i in range(1, n + 1):
            if i < n and draw(st.booleans()):
                out.append(f"{i}-{i + 1}\t{words[i - 1]}{words[i]}\t_\t_\t_\t_\t_\t_\t_\t_")
            out.append(tok(i, words[i - 1], upos[i - 1], heads[i - 1], rels[i - 1]))
            if draw(st.integers(0, 5)) == 0:
                out.append(f"{i}.1\t{words[i - 1]}\t_\tVERB\t_\t_\t_\t_\t{i}:conj\t_")
        expected.append(Sentence(words, upos, heads, rels, sent_id, start))
        out += [""] * draw(st.integers(1, 2))
    text = "\n".join(out) if draw(st.booleans()) else "\n".join(out).rstrip("\n")
    if crlf:
        text = text.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"), expected


@ROUND_TRIP
@given(doc=documents())
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, doc) -> None:
    data, expected = doc
    path = write(tmp_path_factory.mktemp("rt") / "f.conllu", data)
    assert read_conllu(path) == expected


def parse_or_data_error(path: Path) -> None:
    """The reader either returns well-formed sentences or raises a one-line DataError."""
    try:
        sents = read_conllu(path, max_len=50)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and msg.startswith(str(path))
        kind = re.sub(r"'.*?'|[0-9]+", "N", msg[len(str(path)) :].split(": ", 1)[-1])
        event("DataError: " + " ".join(kind.split()[:3]))
    else:
        event("parsed")
        assert sents
        for s in sents:
            n = len(s.words)
            assert 1 <= n <= 50 and len(s.upos) == len(s.heads) == len(s.deprels) == n
            assert all(0 <= h <= n for h in s.heads) and s.line >= 1
            assert all(w and "\t" not in w and "\n" not in w for w in s.words)


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzz_random_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates -> invalid UTF-8 bytes
    parse_or_data_error(write(tmp_path_factory.mktemp("txt") / "f", data))


FIELD = st.sampled_from(["1", "2", "0", "1-2", "2.1", "_", "x", "NOUN", "", " ", "\ufeff"])
WORD_LINE = st.builds(
    tok,
    st.sampled_from(["1", "2", "3", "1", "2", "0", "1-2", "2.1", "x", "01"]),
    FIELD,
    FIELD,
    st.sampled_from(["0", "1", "2", "3", "9", "_", "x", "-1"]),
    FIELD,
)
CONLLU_LINES = st.one_of(
    WORD_LINE,
    WORD_LINE,
    WORD_LINE,
    st.lists(FIELD, min_size=8, max_size=11).map("\t".join),
    st.sampled_from(["", "# sent_id = s", "#", " ", "\r"]),
)


@FUZZ
@given(lines=st.lists(CONLLU_LINES, max_size=12))
def test_fuzz_conllu_like_lines(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    """Lines assembled from plausible fields reach the checks past the column count."""
    parse_or_data_error(write(tmp_path_factory.mktemp("cl") / "f", "\n".join(lines)))


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    parse_or_data_error(write(tmp_path_factory.mktemp("bin") / "f", data))


VALID = (
    "\ufeff# sent_id = a\n# text = I didn't.\n"
    + "\n".join(
        [
            tok(1, "I", "PRON", 3, "nsubj"),
            "2-3\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_",
            tok(2, "did", "AUX", 3, "aux"),
            tok(3, "n't", "PART", 0, "root"),
            "3.1\tgo\tgo\tVERB\t_\t_\t_\t_\t3:conj\t_",
            tok(4, ".", "PUNCT", 3, "punct"),
            "",
            "# sent_id = b",
            tok(1, "Ok", "INTJ", 0, "root"),
            tok(2, "!", "PUNCT", 1, "punct"),
            "",
        ]
    )
).encode("utf-8")
PIECES = [b"\t", b"\n", b"\r", b"\n\n", b"#", b"0", b"1", b"9", b"-", b".", b"_", b" ", b"x"]
PIECES += [b"\xff", b"\xc3", b"\xef\xbb\xbf", "\u00e9".encode(), b"\x00"]


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["delete", "duplicate", "replace", "insert"]),
            st.integers(0, len(VALID) - 1),
            st.integers(1, 4),
            st.sampled_from(PIECES),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_mutated_valid_file(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[str, int, int, bytes]]
) -> None:
    data = bytearray(VALID)
    for op, pos, width, piece in edits:
        pos %= max(len(data), 1)
        if op == "delete":
            del data[pos : pos + width]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + width]
        elif op == "replace":
            data[pos : pos + 1] = piece
        else:
            data[pos:pos] = piece
    parse_or_data_error(write(tmp_path_factory.mktemp("mut") / "f", bytes(data)))


def test_valid_fuzz_seed_parses(tmp_path: Path) -> None:
    a, b = read_conllu(write(tmp_path / "f", VALID))
    assert a.words == ["I", "did", "n't", "."] and (a.sent_id, a.line) == ("a", 1)
    assert b.words == ["Ok", "!"] and (b.sent_id, b.line) == ("b", 10)


# ----------------------------------------------------------------------------- vocabularies


@pytest.mark.parametrize(
    ("token", "cls"),
    [
        ("42", "<num>"),
        ("-3", "<num>"),
        ("3.14", "<num>"),
        ("1,000,000", "<num>"),
        ("10:30", "<num>"),
        ("1/2", "<num>"),
        (".5", "<num>"),
        ("50%", "<num>"),
        ("\u0663\u0664", "<num>"),  # Arabic-Indic digits
        ("...", "<punct>"),
        ("--", "<punct>"),
        ("$", "<punct>"),
        (":)", "<punct>"),
        ("\u201c", "<punct>"),
        ("-", "<punct>"),
        ("1990s", "<unk>"),
        ("1st", "<unk>"),
        ("3.", "<unk>"),
        ("abc", "<unk>"),
        ("a.", "<unk>"),
        ("", "<unk>"),
    ],
)
def test_shape_class(token: str, cls: str) -> None:
    assert shape_class(token) == cls


def test_vocab_layout_and_min_count() -> None:
    v = Vocab.build([["the", "cat", "the"], ["a", "cat", "the", "dog"]], min_count=2)
    assert v.itos == ["<pad>", "<unk>", "<num>", "<punct>", "the", "cat"]
    assert (v.pad_index, v.unk_index, len(v)) == (0, 1, 6) and v.tokens == ["the", "cat"]
    assert v.encode(["the", "cat", "dog", "a"]) == [4, 5, 1, 1]  # rare words are unknown
    assert v.decode([4, 5, 1, 0]) == ["the", "cat", "<unk>", "<pad>"]
    assert Vocab.build([["b", "a", "c", "a"]]).tokens == ["a", "b", "c"]  # ties alphabetical
    with pytest.raises(BadInputError, match="min_count"):
        Vocab.build([["a"]], min_count=0)


def test_vocab_unknown_words() -> None:
    v = Vocab.build([["the", "cat", "Apple", "apple", "NASA"]])
    i = dict(zip(v.itos, range(len(v)), strict=True))
    assert v.encode(["The", "CAT", "Cat"]) == [i["the"], i["cat"], i["cat"]]  # lowercase
    assert v.encode(["Apple", "apple", "APPLE"]) == [i["Apple"], i["apple"], i["apple"]]
    assert v.lookup("nasa") == 1  # no upper-casing fallback
    assert v.encode(["1,000", "3.5", "...", "?!", "Dog", "dog"]) == [2, 2, 3, 3, 1, 1]


def test_vocab_reserved_names_in_data_are_ordinary_tokens() -> None:
    v = Vocab.build([["<pad>", "<unk>", "x"]])
    assert v.lookup("<pad>") not in (0, 1, 2, 3) and v.lookup("<unk>") not in (0, 1, 2, 3)
    assert Vocab.build([["x"]]).lookup("<pad>") == 1  # unknown -> <unk>, never padding


def test_vocab_dict_round_trip(tmp_path: Path) -> None:
    words = Vocab.build([["Hello", "world", "<pad>", "\u00e9t\u00e9"]])
    tags = Vocab.build([["NOUN", "VERB"]], kind="tag")
    for v in (words, tags):
        d = v.to_dict()
        assert json.loads(json.dumps(d)) == d  # plain types only
        assert Vocab.from_dict(d) == v and Vocab.from_dict(d).itos == v.itos
        torch.save({"vocab": d}, tmp_path / "ck.pt")
        loaded = torch.load(tmp_path / "ck.pt", weights_only=True)["vocab"]
        assert Vocab.from_dict(loaded) == v
    assert words != tags and words != Vocab.build([["Hello"]])


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ([], "must be a dict"),
        ({"format": 2, "kind": "word", "specials": [], "tokens": []}, "format 2"),
        ({"format": 1, "kind": "char", "specials": [], "tokens": []}, "kind"),
        ({"format": 1, "kind": "tag", "specials": ["<pad>", "<unk>"], "tokens": []}, "reserved"),
        ({"format": 1, "kind": "tag", "specials": ["<pad>", "<unk-tag>"]}, "list of strings"),
        ({"format": 1, "kind": "tag", "specials": ["<pad>", "<unk-tag>"], "tokens": [1]}, "list"),
        (
            {"format": 1, "kind": "tag", "specials": ["<pad>", "<unk-tag>"], "tokens": ["A", "A"]},
            "twice",
        ),
    ],
)
def test_vocab_from_bad_dict(d: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Vocab.from_dict(d)


@VOCAB_FUZZ
@given(
    seqs=st.lists(st.lists(st.text(max_size=4), max_size=6), max_size=6),
    min_count=st.integers(1, 3),
    probe=st.lists(st.text(max_size=4), max_size=6),
)
def test_vocab_round_trip_fuzz(seqs: list[list[str]], min_count: int, probe: list[str]) -> None:
    v = Vocab.build(seqs, min_count)
    w = Vocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert w == v and w.encode(probe) == v.encode(probe)
    ids = v.encode(probe)
    assert all(0 < i < len(v) for i in ids)  # never padding, always in range
    assert [v.decode([i])[0] for i, t in zip(ids, probe, strict=True) if t in v] == [
        t for t in probe if t in v
    ]


def test_encode_tags_unknown() -> None:
    tags = Vocab.build([["NOUN", "VERB"]], kind="tag")
    assert tags.itos == ["<pad>", "<unk-tag>", "NOUN", "VERB"]
    assert encode_tags(["NOUN", "VERB"], tags) == ([2, 3], 0)
    assert encode_tags(["NOUN", "ADJ", "noun", "ADJ"], tags) == ([2, 1, 1, 1], 3)
    assert encode_tags([], tags, "error") == ([], 0)
    s = Sentence(["big", "dog"], ["ADJ", "NOUN"], [2, 0], ["amod", "root"], "s-7", 12, "x.conllu")
    with pytest.raises(DataError) as info:
        encode_tags(s.upos, tags, "error", sentence=s)
    msg = str(info.value)
    assert msg.startswith("x.conllu:12 (sent_id s-7): unknown tag 'ADJ' at word 1 ('big')")
    assert "NOUN, VERB" in msg and "\n" not in msg
    with pytest.raises(DataError, match="^tag sequence: unknown tag 'X'"):
        encode_tags(["X"], tags, "error")
    with pytest.raises(BadInputError, match="on_unknown"):
        encode_tags(["NOUN"], tags, "ignore")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="tag vocabulary"):
        encode_tags(["NOUN"], Vocab.build([["NOUN"]]))


def test_sentence_lengths_must_agree() -> None:
    with pytest.raises(DataError, match="2 words but 1 UPOS"):
        Sentence(["a", "b"], ["X"], [0, 1], ["root", "dep"], None, 4, "f")


# ----------------------------------------------------------------------- tensors and splits


def test_tagging_tensors() -> None:
    train = [
        Sentence(["the", "dog", "ran"], ["DET", "NOUN", "VERB"], [2, 3, 0], ["det"] * 3, None, 1),
        Sentence(["a", "cat"], ["DET", "NOUN"], [2, 0], ["det", "root"], None, 5),
    ]
    words, tags = build_vocabs(train)
    test = [
        Sentence(
            ["The", "cat", "sat", "."], ["DET", "NOUN", "VERB", "PUNCT"], [2, 3, 0, 3], ["x"] * 4
        ),
        Sentence(["42"], ["NUM"], [0], ["root"]),
    ]
    x, y, lengths = tagging_tensors(test, words, tags)
    w, t = {s: k for k, s in enumerate(words.itos)}, {s: k for k, s in enumerate(tags.itos)}
    assert x.tolist() == [[w["the"], w["cat"], 1, 3], [2, 0, 0, 0]]
    assert y.tolist() == [[t["DET"], t["NOUN"], t["VERB"], 1], [1, 0, 0, 0]]
    assert lengths.tolist() == [4, 1] and x.dtype == y.dtype == lengths.dtype == torch.long
    assert int((y == tags.unk_index).sum()) == 2  # the count of unknown tags
    with pytest.raises(DataError, match="unknown tag 'PUNCT' at word 4"):
        tagging_tensors(test, words, tags, on_unknown="error")
    x, y, lengths = tagging_tensors([], words, tags)
    assert x.shape == y.shape == (0, 0) and lengths.shape == (0,)
    with pytest.raises(BadInputError, match="word vocabulary"):
        tagging_tensors(test, tags, tags)


def test_split_dev() -> None:
    sents = [Sentence([str(i)], ["X"], [0], ["root"], None, i) for i in range(1, 101)]
    train, held = split_dev(sents, 0.1, seed=0)
    assert (len(train), len(held)) == (90, 10)
    assert split_dev(sents, 0.1, seed=0) == (train, held)  # deterministic
    assert split_dev(sents, 0.1, seed=1)[1] != held
    assert sorted(s.line for s in train + held) == list(range(1, 101))
    assert [s.line for s in train] == sorted(s.line for s in train)  # original order kept
    assert [s.line for s in held] == sorted(s.line for s in held)
    assert split_dev(sents, 0.0) == (sents, [])
    assert [len(p) for p in split_dev(sents[:2], 0.01)] == [1, 1]
    assert [len(p) for p in split_dev(sents[:2], 0.99)] == [1, 1]
    assert split_dev(sents[:1], 0.5) == (sents[:1], [])
    for bad in (-0.1, 1.0, 2, "0.1", True):
        with pytest.raises(BadInputError, match="fraction"):
            split_dev(sents, bad)  # type: ignore[arg-type]
