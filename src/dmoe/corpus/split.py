"""Knowledge-unit granularity: documents -> passages -> units.

Three granularities (DESIGN.md step 1):

- ``document``: one unit per input document, text as given (whitespace collapsed).
- ``passage``: each document split on sentence boundaries into passages of about ``passage_words``
  words; unit id ``{doc_id}#{n}`` (n counts from 0, also for a document that yields one passage).
- ``cluster``: passages (as above) grouped ``cluster_size`` at a time, in corpus order, never across
  a change of *group* (the document's title, or its id when it has no title — so consecutive DPR
  passages of one Wikipedia article may share a cluster); unit id ``{first}..{last}`` of the passage
  ids it holds (just ``{first}`` for a cluster of one).

Passage packing: a document of ``W`` words becomes ``n = max(1, round(W / passage_words))``
passages of target ``W / n`` words; sentences are added in order and a passage is closed when the
next sentence would put more than half of its words past the target. A 100-word DPR passage at the
default 100 stays whole; a sentence longer than twice the target is cut into chunks of
``target`` words first.

Sentence splitting is a regex (end punctuation, optional closing quote/bracket, whitespace, then an
upper-case letter, digit or quote), with a short list of abbreviations that do not end a sentence.
This module knows nothing about files (see ``readers``) or augmentation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Literal

from dmoe.corpus.units import KnowledgeUnit

Granularity = Literal["passage", "document", "cluster"]
GRANULARITIES: tuple[str, ...] = ("passage", "document", "cluster")

_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "no", "inc", "ltd",
           "co", "corp", "gen", "col", "lt", "sgt", "rev", "mt", "fig", "approx", "e.g", "i.e",
           "u.s", "u.k", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
           "nov", "dec"}


def normalize_space(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space; strip the ends."""
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace collapsed); never empty for non-blank text."""
    text = normalize_space(text)
    if not text:
        return []
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        candidate = text[start:m.start()]
        last_word = candidate.rsplit(" ", 1)[-1].rstrip(".!?\"'”’)]").lower()
        if last_word in _ABBREV or (len(last_word) == 1 and last_word.isalpha()):
            continue  # "Dr. Smith", "J. R. R. Tolkien": not a boundary
        sentences.append(candidate.strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _word_count(s: str) -> int:
    return len(s.split())


def _chunk_long(sentences: list[str], limit: int, size: int) -> list[str]:
    """Cut any sentence longer than ``limit`` words into chunks of ``size`` words."""
    out: list[str] = []
    for s in sentences:
        words = s.split()
        if len(words) <= limit:
            out.append(s)
        else:
            out.extend(" ".join(words[i:i + size]) for i in range(0, len(words), size))
    return out


def split_passages(text: str, passage_words: int = 100) -> list[str]:
    """Split a document into passages of about ``passage_words`` words (module docstring)."""
    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words!r}")
    sentences = split_sentences(text)
    total = sum(_word_count(s) for s in sentences)
    if total == 0:
        return []
    n = max(1, round(total / passage_words))
    target = total / n
    sentences = _chunk_long(sentences, int(2 * target), max(1, round(target)))
    passages: list[str] = []
    current: list[str] = []
    words = 0
    for s in sentences:
        w = _word_count(s)
        if current and words + w / 2 > target:
            passages.append(" ".join(current))
            current, words = [], 0
        current.append(s)
        words += w
    if current:
        passages.append(" ".join(current))
    return passages


def passages_of(doc: KnowledgeUnit, passage_words: int = 100) -> Iterator[KnowledgeUnit]:
    """The passage units of one document: ids ``{doc.id}#{n}``, title and meta inherited."""
    for n, text in enumerate(split_passages(doc.text, passage_words)):
        meta = {**doc.meta, "doc_id": doc.id, "passage": n}
        yield KnowledgeUnit(id=f"{doc.id}#{n}", text=text, title=doc.title, meta=meta)


def clusters_of(passages: Iterable[KnowledgeUnit], cluster_size: int = 3) -> Iterator[KnowledgeUnit]:
    """Group consecutive passages ``cluster_size`` at a time within a group (module docstring)."""
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size!r}")
    group: list[KnowledgeUnit] = []

    def flush() -> KnowledgeUnit:
        ids = [p.id for p in group]
        uid = ids[0] if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"
        doc_ids = list(dict.fromkeys(str(p.meta.get("doc_id", p.id)) for p in group))
        return KnowledgeUnit(id=uid, text=" ".join(p.text for p in group), title=group[0].title,
                             meta={"doc_ids": doc_ids, "passages": ids})

    def key(p: KnowledgeUnit) -> str:
        return p.title or str(p.meta.get("doc_id", p.id))

    for p in passages:
        if group and (len(group) == cluster_size or key(p) != key(group[-1])):
            yield flush()
            group = []
        group.append(p)
    if group:
        yield flush()


def to_units(docs: Iterable[KnowledgeUnit], granularity: Granularity = "passage", *,
             passage_words: int = 100, cluster_size: int = 3) -> Iterator[KnowledgeUnit]:
    """Turn documents into knowledge units at the chosen granularity."""
    if granularity == "document":
        for d in docs:
            yield KnowledgeUnit(id=d.id, text=normalize_space(d.text), title=d.title,
                                meta=dict(d.meta))
    elif granularity == "passage":
        for d in docs:
            yield from passages_of(d, passage_words)
    elif granularity == "cluster":
        yield from clusters_of((p for d in docs for p in passages_of(d, passage_words)),
                               cluster_size)
    else:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
