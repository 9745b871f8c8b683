"""An embedded, persistent, incrementally updatable BM25 index (tantivy) and the router on it.

One document per expert (or per passage, for the RAG baselines): ``id`` (exact string), ``sha``
(sha256 of the text, for drift detection) and ``text`` (the surrogate, analysed, optionally stored).
Adding, replacing or deleting one document is one small tantivy commit; nothing is rebuilt.

On disk (all inspectable without this code)::

    INDEX_DIR/
      router.json     # {"format": "dmoe-bm25-index", "format_version": 1, "analyzer": ..., ...}
      tantivy/        # a plain tantivy index (meta.json + segment files)

Scoring is tantivy's BM25 (k1 = 1.2, b = 0.75, the Elasticsearch/Lucene defaults). Text is
analysed like Elasticsearch's ``english`` analyzer (the paper's retriever): split on
non-alphanumerics, drop tokens > 40 bytes, lowercase, drop English stop words, Snowball English
stemming. Queries go through the *same* tantivy analyzer and become an OR of term queries (a term
repeated n times is boosted n times, as an Elasticsearch ``match`` query scores it); the tantivy
query parser is never used, so quotes, colons, parentheses, ``AND``/``NOT`` etc. are plain text.

Durability and visibility. Outside a ``batch()`` every write (``add``/``upsert``/``delete``) is
committed (fsync'd, atomic meta.json swap) and the reader reloaded before it returns: when the call
returns the change is durable and visible to ``search``. Inside ``with index.batch():`` writes are
buffered and committed together at the end (bulk builds, ``reconcile``); a crash inside a batch
loses the whole batch, never part of a document, and ``reconcile`` against the bank re-adds it.
A tantivy commit is all-or-nothing, so after ``kill -9`` the index is exactly its last commit;
what the bank wrote since is detected and repaired by ``dmoe.routing.consistency.reconcile``.
Writes inside a batch are not visible to ``search`` until the batch ends.

One process may write an index at a time (tantivy's writer lock, released if the process dies),
and within it writes are serialised by a lock (a ``batch()`` holds it until it ends); searches
never wait for writes. Any number of processes may read an index (``open(path, readonly=True)``;
``refresh()`` to see newer commits at once; they also arrive by themselves within ~0.5 s).

Cost (``python -m dmoe.bench.router``, 30k experts): a query ~0.7 ms (the cost of a query is capped
by ``MAX_QUERY_POSTINGS``, see ``search``); an ``add`` is one commit of a
one-document segment, ~10 ms of CPU, more wall time when the CPU is contended; a ``delete`` ~2 ms
of CPU. Segments from single-document commits are merged by tantivy in the background.

This module knows nothing about experts, models or tokenizers of the base model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tantivy

from dmoe.errors import RouterIndexError
from dmoe.routing.base import RouteHit
from dmoe.routing.consistency import text_hash

FORMAT = "dmoe-bm25-index"
FORMAT_VERSION = 1
MANIFEST = "router.json"
TANTIVY_DIR = "tantivy"
ANALYZER_NAME = "dmoe_en_v1"  # bump the suffix whenever make_analyzer() changes
MAX_QUERY_CHARS = 16_384  # longer queries keep their tail (the most recent generated text)
MAX_QUERY_TERMS = 256  # distinct terms per query; the most frequent are kept
MAX_QUERY_POSTINGS = 50_000  # postings one query may score; see BM25Index.search
MAX_ID_CHARS = 512
WRITER_HEAP_BYTES = 64_000_000


def make_analyzer() -> tantivy.TextAnalyzer:
    """Elasticsearch-``english``-like analysis, shared by indexing and querying."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stopword("english"))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


_ANALYZER = make_analyzer()


def clean_text(text: str | None) -> str:
    """Make any str safe for the Rust side: lone surrogates become U+FFFD, None becomes ''."""
    if not text:
        return ""
    return text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")


def analyze(text: str | None) -> list[str]:
    """The index terms of ``text`` (what BM25 sees), e.g. ``"The cats ran"`` -> ``["cat", "ran"]``."""
    return list(_ANALYZER.analyze(clean_text(text)))


def _check_id(expert_id: str) -> str:
    if not isinstance(expert_id, str) or not expert_id or len(expert_id) > MAX_ID_CHARS:
        raise ValueError(
            f"expert id must be a non-empty str of <= {MAX_ID_CHARS} chars, got {expert_id!r}"
        )
    if clean_text(expert_id) != expert_id:
        raise ValueError(f"expert id is not valid unicode: {expert_id!r}")
    return expert_id


def _build_schema(store_text: bool) -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("sha", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("text", stored=store_text, tokenizer_name=ANALYZER_NAME, index_option="freq")
    return sb.build()


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write-to-temp, fsync, rename: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_manifest(store_text: bool) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine": "tantivy",
        "tantivy_version": str(getattr(tantivy, "__version__", "unknown")),
        "analyzer": ANALYZER_NAME,
        "bm25": {"k1": 1.2, "b": 0.75},
        "store_text": store_text,
        "fields": {"id": "raw, stored", "sha": "sha256 of text, stored", "text": "analyzed"},
    }


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise RouterIndexError(f"no BM25 index at {root.name} (missing {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterIndexError(f"unreadable index manifest {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict):
        raise RouterIndexError(f"unreadable index manifest {MANIFEST}: not an object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise RouterIndexError(
            f"{path} is format {manifest.get('format')!r} v{manifest.get('format_version')!r}; "
            f"this dmoe reads {FORMAT!r} v{FORMAT_VERSION} (rebuild the index: it is derived data)"
        )
    if manifest.get("analyzer") != ANALYZER_NAME:
        raise RouterIndexError(
            f"{path} was analysed with {manifest.get('analyzer')!r}, this dmoe uses "
            f"{ANALYZER_NAME!r}; rebuild the index"
        )
    return manifest


class BM25Index:
    """A persistent (or in-memory) BM25 index of ``id -> text`` documents, updated in place.

    Use ``BM25Index.create(path)``, ``BM25Index.open(path)``, ``BM25Index.open_or_create(path)`` or
    ``BM25Index.in_memory()``; close it (or use it as a context manager) to release the writer lock.
    """

    def __init__(self, path: Path | None, manifest: dict[str, Any], readonly: bool) -> None:
        self.path = path  # index directory, None when in memory
        self.manifest = manifest
        self.readonly = readonly
        self.schema = _build_schema(bool(manifest["store_text"]))
        try:
            if path is None:
                self._index = tantivy.Index(self.schema)
            else:
                if readonly and not (path / TANTIVY_DIR / "meta.json").is_file():
                    raise RouterIndexError(f"no tantivy index under {path.name}/{TANTIVY_DIR}")
                (path / TANTIVY_DIR).mkdir(exist_ok=True)
                self._index = tantivy.Index(self.schema, path=str(path / TANTIVY_DIR), reuse=True)
        except Exception as e:  # tantivy reports a damaged index with assorted exception types
            raise RouterIndexError(f"cannot open the tantivy index ({e})") from e
        self._index.register_tokenizer(ANALYZER_NAME, make_analyzer())
        self._writer: Any = None
        self._batch_depth = 0
        self._dirty = False
        self._lock = threading.RLock()  # one writer thread at a time; readers never wait
        self._index.reload()

    @property
    def _searcher(self) -> Any:
        # a fresh searcher per call (~0.2 us): it sees the latest reload, including other
        # processes' commits, which tantivy's reader picks up on its own within ~0.5 s
        return self._index.searcher()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, store_text: bool = False) -> BM25Index:
        """A new empty index in ``path`` (created; must not already hold an index)."""
        root = Path(path)
        if (root / MANIFEST).exists():
            raise RouterIndexError(f"an index already exists at {root}")
        root.mkdir(parents=True, exist_ok=True)
        manifest = _new_manifest(store_text)
        _write_json_atomic(root / MANIFEST, manifest)  # first: a crash leaves an openable index
        return cls(root, manifest, readonly=False)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> BM25Index:
        """An existing index; ``readonly`` never takes the writer lock."""
        root = Path(path)
        return cls(root, _read_manifest(root), readonly=readonly)

    @classmethod
    def open_or_create(cls, path: str | Path, *, store_text: bool = False) -> BM25Index:
        root = Path(path)
        if (root / MANIFEST).exists():
            return cls.open(root)
        return cls.create(root, store_text=store_text)

    @classmethod
    def in_memory(cls, *, store_text: bool = False) -> BM25Index:
        """A throwaway index (tests, small RAG corpora)."""
        return cls(None, _new_manifest(store_text), readonly=False)

    def close(self) -> None:
        """Commit pending writes and release the writer lock."""
        if self._writer is not None:
            self.commit()
            writer, self._writer = self._writer, None
            writer.wait_merging_threads()  # consumes the writer and drops the lock

    def __enter__(self) -> BM25Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------

    def _get_writer(self) -> Any:
        if self.readonly:
            raise RouterIndexError(f"index {self.path} was opened read-only")
        if self._writer is None:
            try:
                self._writer = self._index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
            except ValueError as e:
                if "lock" not in str(e).lower():
                    raise
                raise RouterIndexError(
                    f"index {self.path} is being written by another process: {e}"
                ) from e
        return self._writer

    def _maybe_commit(self) -> None:
        self._dirty = True
        if self._batch_depth == 0:
            self.commit()

    def commit(self) -> None:
        """Make pending writes durable and visible (called for you outside ``batch()``)."""
        with self._lock:
            if self._writer is None or not self._dirty:
                return
            self._writer.commit()
            self._dirty = False
            self.refresh()

    def refresh(self) -> None:
        """See the latest commit now (other processes' commits also arrive by themselves, ~0.5 s)."""
        self._index.reload()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Buffer writes and commit once at the end (also if the block raises)."""
        with self._lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    self.commit()

    def _stage_add(self, expert_id: str, text: str) -> None:
        writer = self._get_writer()
        expert_id = _check_id(expert_id)
        if not isinstance(text, str):
            raise TypeError(f"text for {expert_id!r} must be str, got {type(text).__name__}")
        clean = clean_text(text)
        writer.delete_documents_by_term("id", expert_id)  # same commit: replace is atomic
        writer.add_document(tantivy.Document(id=expert_id, sha=text_hash(text), text=clean))
        self._dirty = True

    def add(self, expert_id: str, text: str) -> None:
        """Index ``text`` under ``expert_id``, replacing any previous version (idempotent)."""
        with self._lock:
            self._stage_add(expert_id, text)
            self._maybe_commit()

    upsert = add  # add already replaces; the bank may call either

    def add_many(self, items: Iterable[tuple[str, str]]) -> int:
        """Add or replace many ``(expert_id, text)`` pairs in one commit; return the count."""
        n = 0
        with self.batch():
            for expert_id, text in items:
                self._stage_add(expert_id, text)
                n += 1
        return n

    def delete(self, expert_id: str) -> bool:
        """Remove ``expert_id``; return whether it was indexed (as of the last commit)."""
        with self._lock:
            existed = expert_id in self
            self._get_writer().delete_documents_by_term("id", _check_id(expert_id))
            self._maybe_commit()
        return existed

    def delete_many(self, expert_ids: Iterable[str]) -> int:
        """Remove many ids in one commit (unknown ids are ignored); return how many were given."""
        n = 0
        with self.batch():
            writer = self._get_writer()
            for expert_id in expert_ids:
                writer.delete_documents_by_term("id", _check_id(expert_id))
                self._dirty = True
                n += 1
        return n

    # -- reads --------------------------------------------------------------------------------

    def _term_query(self, field: str, value: str, index_option: str) -> tantivy.Query:
        return tantivy.Query.term_query(self.schema, field, value, index_option=index_option)

    @staticmethod
    def _query_terms(query: str) -> Counter[str]:
        """Analysed query terms with their counts: the last ``MAX_QUERY_CHARS`` characters, at most
        ``MAX_QUERY_TERMS`` distinct terms (the most frequent)."""
        if len(query) > MAX_QUERY_CHARS:
            query = query[-MAX_QUERY_CHARS:]
        counts = Counter(analyze(query))
        if len(counts) > MAX_QUERY_TERMS:
            counts = Counter(dict(counts.most_common(MAX_QUERY_TERMS)))
        return counts

    def _bm25_query(self, counts: Counter[str]) -> tantivy.Query:
        clauses = []
        for term, n in counts.items():
            q = self._term_query("text", term, "freq")
            clauses.append(
                (tantivy.Occur.Should, q if n == 1 else tantivy.Query.boost_query(q, float(n)))
            )
        return tantivy.Query.boolean_query(clauses)

    @staticmethod
    def _idf(n_docs: int, df: int) -> float:
        return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))

    @staticmethod
    def _doc_freqs(searcher: tantivy.Searcher, counts: Counter[str]) -> dict[str, int]:
        return {t: int(searcher.doc_freq("text", t)) for t in counts}

    def _within_budget(
        self, searcher: tantivy.Searcher, counts: Counter[str], df: dict[str, int],
        max_postings: int | None,
    ) -> Counter[str]:
        """The query terms that fit ``max_postings`` (see ``search``): all of them when their
        document frequencies ``df`` add up to at most the budget, else the highest
        ``n_t * idf_t`` terms that fit (the first always)."""
        if max_postings is None or sum(df.values()) <= max_postings:
            return counts
        n_docs = int(searcher.num_docs)
        order = sorted(counts, key=lambda t: (-counts[t] * self._idf(n_docs, df[t]), t))
        kept: Counter[str] = Counter()
        total = 0
        for term in order:
            if kept and total + df[term] > max_postings:
                continue
            kept[term] = counts[term]
            total += df[term]
        return kept

    def search(
        self, query: str, k: int = 3, *, max_postings: int | None = MAX_QUERY_POSTINGS
    ) -> list[RouteHit]:
        """Top-``k`` documents for free text ``query``, best first. Never raises on odd text:
        empty, stop-words-only, huge or malformed-unicode queries give ``[]`` or a normal result.

        ``max_postings`` caps the work of one query. A term costs its document frequency (the
        postings scored), so a long query of common words on a large index is slow: a 90-word
        synthetic query has ~2.9 M postings on 10^6 experts and takes 22-33 ms exact. When the
        query's terms have more postings than the budget, only the terms with the highest
        ``n_t * idf_t`` that fit are scored (Lucene's MoreLikeThis picks long-query terms by the
        same weight); the dropped terms are the most common ones, which add little to any score.
        Below the budget, and with ``max_postings=None`` (the reference), the result is exact BM25
        over every term. Real questions, and questions followed by 60 words of text, on the
        10,033-passage Wikipedia pool have at most ~27,000 postings, so they are scored exactly
        there. ``dmoe bench router`` measures how often the budget binds and how often it changes
        the top hit. ``relevance`` is relative to the terms that were scored."""
        if not isinstance(query, str) or k <= 0:
            return []
        counts = self._query_terms(query)
        if not counts:
            return []
        searcher = self._searcher
        df = self._doc_freqs(searcher, counts)
        counts = self._within_budget(searcher, counts, df, max_postings)
        result = searcher.search(self._bm25_query(counts), int(k), count=False)
        bound = self._max_score(searcher, counts, df) if result.hits else 0.0
        return [
            RouteHit(expert_id=searcher.doc(addr)["id"][0], score=float(score),
                     relevance=min(1.0, float(score) / bound) if bound > 0 else 0.0)
            for score, addr in result.hits
        ]

    def max_score(self, query: str) -> float:
        """The most any document could score for ``query`` (every term, no budget):
        Σ_t n_t · idf_t · (k1 + 1), the BM25 limit of every query term's frequency going to
        infinity (``relevance`` = score / this)."""
        searcher, counts = self._searcher, self._query_terms(query)
        return self._max_score(searcher, counts, self._doc_freqs(searcher, counts))

    def scored_terms(
        self, query: str, max_postings: int | None = MAX_QUERY_POSTINGS
    ) -> dict[str, int]:
        """``{term: count}`` that ``search(query, max_postings=...)`` scores (for inspection)."""
        searcher, counts = self._searcher, self._query_terms(query)
        df = self._doc_freqs(searcher, counts)
        return dict(self._within_budget(searcher, counts, df, max_postings))

    def _max_score(
        self, searcher: tantivy.Searcher, counts: Counter[str], df: dict[str, int]
    ) -> float:
        k1, n_docs = float(self.manifest["bm25"]["k1"]), int(searcher.num_docs)
        return sum(n * self._idf(n_docs, df[t]) * (k1 + 1) for t, n in counts.items())

    def __contains__(self, expert_id: object) -> bool:
        if not isinstance(expert_id, str) or not expert_id:
            return False
        q = self._term_query("id", clean_text(expert_id), "basic")
        return bool(self._searcher.search(q, 1, count=False).hits)

    def __len__(self) -> int:
        return int(self._searcher.num_docs)

    def snapshot(self) -> dict[str, str]:
        """``{id: sha256(text)}`` of every committed document (for ``reconcile``)."""
        searcher = self._searcher
        n = int(searcher.num_docs)
        if n == 0:
            return {}
        hits = searcher.search(tantivy.Query.all_query(), n, count=False).hits
        out: dict[str, str] = {}
        for _, addr in hits:
            doc = searcher.doc(addr)
            out[doc["id"][0]] = doc["sha"][0]
        return out

    def ids(self) -> list[str]:
        return sorted(self.snapshot())

    def text_of(self, expert_id: str) -> str | None:
        """The stored text (indexes created with ``store_text=True``), or None if absent."""
        if not self.manifest["store_text"]:
            raise RouterIndexError(
                "this index does not store texts (create it with store_text=True)"
            )
        q = self._term_query("id", clean_text(expert_id), "basic")
        hits = self._searcher.search(q, 1, count=False).hits
        if not hits:
            return None
        return str(self._searcher.doc(hits[0][1])["text"][0])

    def stats(self) -> dict[str, Any]:
        """Size facts: documents, segments, bytes on disk."""
        nbytes = 0
        if self.path is not None:
            nbytes = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "path": None if self.path is None else str(self.path),
            "n_docs": len(self),
            "n_segments": int(self._searcher.num_segments),
            "index_bytes": nbytes,
            "format_version": self.manifest["format_version"],
            "analyzer": self.manifest["analyzer"],
            "store_text": self.manifest["store_text"],
        }


class BM25Router:
    """The default router: BM25 over expert surrogates (``Router`` protocol)."""

    name = "bm25"

    def __init__(self, index: BM25Index) -> None:
        self.index = index

    def route(self, query: str, k: int) -> list[RouteHit]:
        return self.index.search(query, k)
