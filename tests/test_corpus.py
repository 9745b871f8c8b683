"""Corpus readers and granularity: each format, each kind of bad input, strict mode."""

from __future__ import annotations

import json

import pytest

from dmoe.corpus import read_corpus, read_documents, split_passages, split_sentences
from dmoe.errors import CorpusError

PASSAGE = ("Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891. "
           "Dr. Curie won the Nobel Prize in Physics in 1903. She died in 1934.")


def words(n: int, start: int = 0) -> str:
    """n words in sentences of 10 words each."""
    sents = [" ".join(f"w{start + i + j}" for j in range(10)).capitalize() + "."
             for i in range(0, n, 10)]
    return " ".join(sents)


def test_split_sentences_keeps_abbreviations_together():
    assert split_sentences(PASSAGE) == [
        "Marie Curie was born in Warsaw in 1867.", "She moved to Paris in 1891.",
        "Dr. Curie won the Nobel Prize in Physics in 1903.", "She died in 1934."]
    assert split_sentences("  \n ") == []


def test_split_passages_balances_and_keeps_a_100_word_passage_whole():
    assert len(split_passages(words(100), 100)) == 1
    parts = split_passages(words(260), 100)
    assert [len(p.split()) for p in parts] == [90, 90, 80]  # 3 passages of ~87 words
    assert " ".join(parts) == words(260)  # nothing lost, order kept
    # one huge sentence is cut into word chunks
    assert [len(p.split()) for p in split_passages(" ".join(["x"] * 500), 100)] == [100] * 5


def test_jsonl_reader_keeps_meta_and_splits_passages(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"id": 7, "text": words(260), "title": "T", "url": "u"}) + "\n\n"
                 + json.dumps({"id": "b", "text": PASSAGE}) + "\n")
    report = read_corpus(f)
    assert report.documents == 2 and report.skips == []
    assert [u.id for u in report.units] == ["7#0", "7#1", "7#2", "b#0"]
    assert report.units[0].title == "T"
    assert report.units[0].meta == {"url": "u", "doc_id": "7", "passage": 0}
    doc = read_corpus(f, granularity="document").units
    assert [u.id for u in doc] == ["7", "b"] and doc[1].text == PASSAGE


def test_jsonl_bad_records_are_reported_with_line_numbers(tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [json.dumps({"id": "a", "text": "Fine text."}).encode(),
             b'{"id": "b", "text": "unterminated',
             json.dumps({"id": "c"}).encode(),
             json.dumps({"id": "d", "text": "   "}).encode(),
             b'{"id": "e", "text": "caf\xe9"}',
             json.dumps({"id": "a", "text": "Same id again."}).encode(),
             json.dumps({"id": "f", "text": "x" * 50}).encode(),
             json.dumps(["not", "an", "object"]).encode(),
             json.dumps({"id": "g", "text": 3}).encode(),
             json.dumps({"text": "No id here."}).encode()]
    f.write_bytes(b"\n".join(lines) + b"\n")
    report = read_corpus(f, max_chars=40)
    got = [(s.line, s.reason.split(":")[0].split(" (")[0]) for s in report.skips]
    assert got == [(2, "malformed JSON"), (3, "missing 'text' field"), (4, "empty text"),
                   (5, "invalid UTF-8 at byte 24"), (6, "duplicate id 'a'"),
                   (7, "text too long"), (8, "expected a JSON object, got list"),
                   (9, "'text' is int, not a string")]
    assert all(s.source == str(f) for s in report.skips)
    assert [u.id for u in report.units] == ["a#0", "bad.jsonl:10#0"]
    assert str(report.skips[0]).startswith(f"{f}:2: malformed JSON")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: malformed JSON"):
        read_corpus(f, strict=True)


def test_tsv_dpr_format_with_and_without_header(tmp_path):
    body = ('1\t"Aaron ( or ; ""Ahärôn"") is a prophet."\tAaron\n'
            "2\tSecond passage text.\tAaron\n")
    with_header = tmp_path / "psgs.tsv"
    with_header.write_text("id\ttext\ttitle\n" + body)
    no_header = tmp_path / "plain.tsv"
    no_header.write_text(body)
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf" + ("id\ttext\ttitle\n" + body).encode())
    for f in (with_header, no_header, bom):
        units = read_corpus(f, granularity="document").units
        assert [(u.id, u.title) for u in units] == [("1", "Aaron"), ("2", "Aaron")]
        assert units[0].text == 'Aaron ( or ; "Ahärôn") is a prophet.'


def test_tsv_bad_rows(tmp_path):
    f = tmp_path / "bad.tsv"
    f.write_bytes(b"id\ttext\ttitle\nonly-one-field\n1\t\tT\n2\tok\xff\tT\n3\tGood.\tT\n"
                  b"3\tAgain.\tT\n")
    report = read_corpus(f)
    assert [(s.line, s.reason.split(" (")[0]) for s in report.skips] == [
        (2, "expected id<TAB>text[<TAB>title], got 1 field"), (3, "empty text"),
        (4, "invalid UTF-8 at byte 4"), (6, "duplicate id '3'")]
    assert [u.id for u in report.units] == ["3#0"]


def test_text_folder_ids_titles_and_bad_files(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain text file. Two sentences.")
    (root / "sub" / "b.md").write_text("intro line\n# Curie Biography\n\n" + PASSAGE)
    (root / "empty.md").write_text("# Only a heading\n")
    (root / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    (root / "data.csv").write_text("x,y\n")
    (root / ".hidden.txt").write_text("ignored")
    report = read_corpus(root, granularity="document")
    assert [(u.id, u.title) for u in report.units] == [("a.txt", "a"),
                                                       ("sub/b.md", "Curie Biography")]
    assert report.units[1].text.startswith("intro line Marie Curie")
    assert [(s.source.split("/")[-1], s.line, s.reason.split(" (")[0]) for s in report.skips] == [
        ("bad.txt", 2, "invalid UTF-8 at byte 14"), ("data.csv", 0, "not a corpus file"),
        ("empty.md", 0, "empty text")]
    single = read_corpus(root / "a.txt")
    assert [u.id for u in single.units] == ["a.txt#0"]


def test_cluster_groups_consecutive_passages_of_one_title(tmp_path):
    f = tmp_path / "c.jsonl"
    recs = [{"id": str(i), "text": f"Passage {i}.", "title": "A" if i < 4 else "B"}
            for i in range(6)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    units = read_corpus(f, granularity="cluster", cluster_size=3).units
    assert [u.id for u in units] == ["0#0..2#0", "3#0", "4#0..5#0"]
    assert units[0].text == "Passage 0. Passage 1. Passage 2."
    assert units[0].meta["doc_ids"] == ["0", "1", "2"]


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(CorpusError, match="cannot tell the format"):
        read_documents(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="granularity"):
        read_corpus(tmp_path / "x.parquet", fmt="jsonl", granularity="chapter")  # type: ignore[arg-type]
