"""Corpus readers: JSONL, TSV and folders of text files -> documents -> knowledge units.

Formats (``fmt="auto"`` picks by path: a directory, ``.jsonl``, ``.tsv``, ``.txt``/``.md``):

- ``jsonl``: one JSON object per line with ``id`` and ``text``, optional ``title``; every other field
  is kept in ``meta``. A record without ``id`` gets ``{file name}:{line}``. Blank lines are ignored.
- ``tsv``: DPR's ``id<TAB>text<TAB>title`` (``psgs_w100.tsv``); a header line whose first field is
  ``id`` is optional and, when present, names the columns (extra columns go to ``meta``). Fields may
  be quoted CSV-style, as DPR's are.
- ``text``: a folder of ``.txt``/``.md`` files, read recursively in sorted order (hidden files
  ignored), or a single such file. id = path relative to the folder; title = the first markdown
  heading of a ``.md`` file (that line leaves the text), else the file stem.

Bad input never disappears silently: each bad record becomes a ``Skip(source, line, reason)`` in the
report — malformed JSON, a record that is not an object, missing/empty/non-string text, invalid
UTF-8, a duplicate id (the first one wins), text longer than ``max_chars``, a file of another type in
a folder. With ``strict=True`` the first one raises ``CorpusError`` instead. A file that cannot be
opened at all always raises. Records are read line by line, so one bad line costs only that line.

This module knows nothing about augmentation or experts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmoe.corpus.split import Granularity, to_units
from dmoe.corpus.units import KnowledgeUnit
from dmoe.errors import CorpusError

Format = Literal["auto", "jsonl", "tsv", "text"]
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_MAX_CHARS = 200_000


@dataclass(frozen=True)
class Skip:
    """One input record that did not become a document, and why."""

    source: str  # file path
    line: int  # 1-based line number in ``source`` (for a whole text file: the offending line, or 0)
    reason: str  # human-readable, e.g. "malformed JSON: Expecting value (col 1)"

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class CorpusReport:
    """What ``read_corpus`` produced: the units, the skipped records, and input counts."""

    units: list[KnowledgeUnit]
    skips: list[Skip] = field(default_factory=list)
    documents: int = 0  # documents read successfully (before splitting into units)

    def summary(self) -> str:
        return (f"{self.documents} documents -> {len(self.units)} units; "
                f"{len(self.skips)} skipped")


class _Collector:
    """Records skips (or raises in strict mode) and enforces id uniqueness and size limits."""

    def __init__(self, strict: bool, max_chars: int) -> None:
        self.strict = strict
        self.max_chars = max_chars
        self.skips: list[Skip] = []
        self.seen: dict[str, str] = {}  # id -> "file:line" of its first occurrence

    def skip(self, source: Path | str, line: int, reason: str) -> None:
        s = Skip(str(source), line, reason)
        if self.strict:
            raise CorpusError(str(s))
        self.skips.append(s)

    def accept(self, doc: KnowledgeUnit, source: Path, line: int) -> bool:
        """Check one parsed document; record a skip and return False when it is bad."""
        if not doc.text.strip():
            self.skip(source, line, "empty text")
        elif len(doc.text) > self.max_chars:
            self.skip(source, line, f"text too long: {len(doc.text)} chars > max_chars "
                                    f"{self.max_chars}")
        elif doc.id in self.seen:
            self.skip(source, line, f"duplicate id {doc.id!r} (first at {self.seen[doc.id]})")
        else:
            self.seen[doc.id] = f"{source}:{line}"
            return True
        return False


def _decode(raw: bytes, source: Path, line: int, c: _Collector) -> str | None:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a BOM is not data
    except UnicodeDecodeError as e:
        c.skip(source, line, f"invalid UTF-8 at byte {e.start}")
        return None


def _open_binary(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e.strerror or e}") from e


def _read_jsonl(path: Path, c: _Collector) -> Iterator[KnowledgeUnit]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno, c)
            if line is None or not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                c.skip(path, lineno, f"malformed JSON: {e.msg} (col {e.colno})")
                continue
            if not isinstance(rec, dict):
                c.skip(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
                continue
            if "text" not in rec:
                c.skip(path, lineno, "missing 'text' field")
                continue
            text, title = rec.pop("text"), rec.pop("title", "")
            if not isinstance(text, str):
                c.skip(path, lineno, f"'text' is {type(text).__name__}, not a string")
                continue
            doc_id = rec.pop("id", None)
            doc_id = f"{path.name}:{lineno}" if doc_id is None else str(doc_id)
            doc = KnowledgeUnit(id=doc_id, text=text, title="" if title is None else str(title),
                                meta=rec)
            if c.accept(doc, path, lineno):
                yield doc


def _read_tsv(path: Path, c: _Collector) -> Iterator[KnowledgeUnit]:
    columns = ["id", "text", "title"]
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno, c)
            if line is None or not line.strip():
                continue
            fields = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"))
            if lineno == 1 and fields and fields[0].strip().lower() == "id":
                columns = [h.strip().lower() for h in fields]
                if "text" not in columns:
                    raise CorpusError(f"{path}:1: TSV header has no 'text' column: {fields}")
                continue
            if len(fields) < 2:
                c.skip(path, lineno, f"expected id<TAB>text[<TAB>title], got {len(fields)} field")
                continue
            names = columns + [f"col{i}" for i in range(len(columns), len(fields))]
            rec = dict(zip(names, fields, strict=False))
            if "text" not in rec:
                c.skip(path, lineno, "missing text column")
                continue
            text, title = rec.pop("text"), rec.pop("title", "")
            doc_id = rec.pop("id", "") or f"{path.name}:{lineno}"
            doc = KnowledgeUnit(id=doc_id, text=text, title=title, meta=rec)
            if c.accept(doc, path, lineno):
                yield doc


def _split_markdown_title(text: str) -> tuple[str, str]:
    """(first ``#`` heading, text without that line), or ("", text) when there is none."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            title = line.strip().lstrip("#").strip()
            if title:
                return title, "\n".join(lines[:i] + lines[i + 1:])
    return "", text


def _read_text_file(path: Path, doc_id: str, c: _Collector) -> KnowledgeUnit | None:
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        c.skip(path, raw.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}")
        return None
    title = ""
    if path.suffix.lower() == ".md":
        title, text = _split_markdown_title(text)
    doc = KnowledgeUnit(id=doc_id, text=text, title=title or path.stem,
                        meta={"path": str(path)})
    return doc if c.accept(doc, path, 0) else None


def _read_text_folder(root: Path, c: _Collector) -> Iterator[KnowledgeUnit]:
    if root.is_file():
        doc = _read_text_file(root, root.name, c)
        if doc is not None:
            yield doc
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in TEXT_SUFFIXES:
            c.skip(path, 0, f"not a corpus file (expected {'/'.join(TEXT_SUFFIXES)})")
            continue
        doc = _read_text_file(path, rel.as_posix(), c)
        if doc is not None:
            yield doc


def detect_format(path: Path) -> Format:
    """The reader for ``path`` from its kind and suffix; raises ``CorpusError`` if unknown."""
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise CorpusError(f"cannot tell the format of {path}: expected a folder, .jsonl, .tsv, .txt "
                      f"or .md (or pass fmt=)")


def read_documents(path: str | Path, *, fmt: Format = "auto", strict: bool = False,
                   max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[KnowledgeUnit], list[Skip]]:
    """Read the corpus at ``path`` as documents (one per record/file) plus the skipped records."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    c = _Collector(strict=strict, max_chars=max_chars)
    readers = {"jsonl": _read_jsonl, "tsv": _read_tsv, "text": _read_text_folder}
    if fmt not in readers:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {sorted(readers)}")
    docs = list(readers[fmt](path, c))
    return docs, c.skips


def read_corpus(path: str | Path, *, fmt: Format = "auto", granularity: Granularity = "passage",
                passage_words: int = 100, cluster_size: int = 3, strict: bool = False,
                max_chars: int = DEFAULT_MAX_CHARS) -> CorpusReport:
    """Read a corpus and cut it into knowledge units; bad records are reported, not dropped.

    >>> report = read_corpus("psgs.tsv", granularity="passage")   # doctest: +SKIP
    >>> print(report.summary()); [print(s) for s in report.skips]  # doctest: +SKIP
    """
    docs, skips = read_documents(path, fmt=fmt, strict=strict, max_chars=max_chars)
    units: list[KnowledgeUnit] = []
    seen: set[str] = set()
    for unit in to_units(docs, granularity, passage_words=passage_words,
                         cluster_size=cluster_size):
        if unit.id in seen:  # e.g. a document "a#0" next to document "a" split into "a#0"
            skip = Skip(str(path), 0, f"duplicate unit id {unit.id!r} after splitting")
            if strict:
                raise CorpusError(str(skip))
            skips.append(skip)
            continue
        seen.add(unit.id)
        units.append(unit)
    return CorpusReport(units=units, skips=skips, documents=len(docs))
