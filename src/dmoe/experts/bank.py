"""The expert bank: many experts on disk, updated a whole document at a time.

Layout of a bank directory (inspectable with ``sqlite3`` and any safetensors reader)::

    BANK/
      bank.json                 {"format": "dmoe-bank", "version": 2, "base_fingerprint": ...,
                                 "base_model": ..., "spec": {"rank", "alpha", "n_layers"},
                                 "dtype": "float32" | "float16" | "bfloat16", "created": ISO-8601}
      bank.sqlite               table ``experts`` (WAL journal), one row per expert:
                                  id TEXT PRIMARY KEY, doc_id, unit_id, content_hash, settings_hash,
                                  surrogate (routing text), title, meta (JSON), dtype, bytes,
                                  checksum (sha256 of the tensors), file, created, updated
      bank.lock                 the one-writer lock (``dmoe.experts.lock``), with the holder's PID
      experts/<file>            one safetensors file per expert (``dmoe.experts.format``), named
                                ``sha256(id)[:24]-<8 random hex>.safetensors``; its header carries
                                the expert's row, so the database can be rebuilt from the files
      quarantine/               files ``dmoe bank check --repair`` could not account for, with
                                ``log.jsonl`` saying why; nothing is ever deleted silently

A document is the unit of update. ``stage`` writes an expert's file under a fresh name (temporary
file + atomic rename) and makes no row; ``commit_document`` then, in ONE SQLite transaction, points
the document's rows at the staged files and deletes its rows that the new version no longer has;
only after the commit are the replaced files removed. A reader sees the old document or the new
one, never a mix; a crash leaves at most files no row points at, which ``check`` reports and
``repair`` quarantines (their units are retrained by the next build).

A missing or unreadable database is an error (``BankDatabaseError``), never an empty bank; opening
read-only never writes. Opening for writing takes the bank lock first.

This module knows nothing about training, routing or the model; only the base-model fingerprint.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoe.errors import (
    BankDatabaseError,
    BankError,
    ExpertFormatError,
    ExpertUnavailableError,
    WrongBaseModelError,
)
from dmoe.experts.format import STORAGE_DTYPES, load_expert, write_expert
from dmoe.experts.lock import BankLock
from dmoe.experts.lora import Expert, LoraSpec
from dmoe.faults import kill_point

FORMAT = "dmoe-bank"
VERSION = 2
DB_FILE = "bank.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, unit_id TEXT NOT NULL, content_hash TEXT NOT NULL,
    settings_hash TEXT NOT NULL, surrogate TEXT NOT NULL, title TEXT NOT NULL, meta TEXT NOT NULL,
    dtype TEXT NOT NULL, bytes INTEGER NOT NULL, checksum TEXT NOT NULL, file TEXT NOT NULL,
    created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS experts_by_content ON experts (content_hash, settings_hash);
CREATE INDEX IF NOT EXISTS experts_by_doc ON experts (doc_id);
"""
# finding the files no row points at; banks made before it get it from their next writer
FILE_INDEX = "CREATE INDEX IF NOT EXISTS experts_by_file ON experts (file)"
SCHEMA += FILE_INDEX + ";\n"
COLUMNS = ("id", "doc_id", "unit_id", "content_hash", "settings_hash", "title", "meta", "dtype",
           "bytes", "checksum", "file", "created", "updated")
ROW_COLUMNS = (*COLUMNS, "surrogate")  # what an expert file's header ``record`` holds


@dataclass(frozen=True)
class ExpertInfo:
    """One row of the bank (without the surrogate text; see ``surrogates()``)."""

    id: str
    doc_id: str
    unit_id: str
    content_hash: str
    settings_hash: str
    title: str
    meta: dict[str, Any]
    dtype: str
    bytes: int
    checksum: str
    file: str
    created: str
    updated: str


@dataclass(frozen=True)
class Staged:
    """An expert file written under a fresh name, not yet visible: ``row`` is what
    ``commit_document`` will insert."""

    row: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.row["id"])


@dataclass
class DocumentChange:
    """What one ``commit_document`` / ``delete_document`` did, by expert id."""

    doc_id: str
    written: list[str]  # rows inserted or replaced
    removed: list[str]  # rows of the old version the new one does not have


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def safe_file_name(expert_id: str) -> str:
    """A fresh file name for ``expert_id``: a hash prefix (never the id) plus a random suffix."""
    digest = hashlib.sha256(expert_id.encode("utf-8", errors="replace")).hexdigest()[:24]
    return f"{digest}-{secrets.token_hex(4)}.safetensors"


def doc_of(unit_id: str) -> str:
    """The document of a unit id: ``velmora#3`` -> ``velmora`` (a bare id is its own document)."""
    return unit_id.rsplit("#", 1)[0] if "#" in unit_id else unit_id


def connect(db_path: Path, readonly: bool) -> sqlite3.Connection:
    """The bank's database, or ``BankDatabaseError`` if it is missing, unreadable or not ours."""
    name = db_path.parent.name
    if not db_path.is_file():
        raise BankDatabaseError(
            f"bank {name!r}: {DB_FILE} is missing; the expert files are untouched. Run "
            f"`dmoe bank check --repair --bank {name}` to rebuild it from them")
    try:
        if readonly:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False)
        else:
            db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        cols = tuple(r[1] for r in db.execute("PRAGMA table_info(experts)"))
    except sqlite3.DatabaseError as e:
        raise BankDatabaseError(
            f"bank {name!r}: {DB_FILE} is unreadable ({e}); run `dmoe bank check --repair "
            f"--bank {name}` to rebuild it from the expert files") from e
    if set(cols) != set(ROW_COLUMNS):
        db.close()
        raise BankDatabaseError(f"bank {name!r}: {DB_FILE} has no experts table of this format; "
                                f"run `dmoe bank check --repair --bank {name}` to rebuild it")
    if not readonly:
        db.execute(FILE_INDEX)
    return db


def create_database(db_path: Path) -> None:
    """A new, empty bank database (refuses to overwrite one)."""
    if db_path.exists():
        raise BankError(f"{db_path.name} already exists")
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.close()


def read_header(root: Path) -> dict[str, Any]:
    """``bank.json``, checked for format and version (a version-1 bank gets the way forward)."""
    try:
        header = json.loads((root / "bank.json").read_text())
    except FileNotFoundError:
        raise BankError(f"{root.name!r} is not an expert bank (no bank.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{root.name}/bank.json is not valid JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BankError(f"{root.name!r}: bank.json is not a {FORMAT!r} header")
    if header.get("version") == 1:
        raise BankError(f"bank {root.name!r} was written by an older dmoe (bank format 1, no "
                        f"checksums or document ids); run `dmoe bank migrate --bank {root.name}` "
                        f"once to upgrade it in place (nothing is retrained)")
    if header.get("version") != VERSION:
        raise BankError(f"{root.name!r}: bank format version {header.get('version')!r}; this dmoe "
                        f"reads version {VERSION}")
    return header


class ExpertBank:
    """A directory of experts for one base model; see the module docstring for the layout."""

    def __init__(self, path: Path, header: dict[str, Any], readonly: bool = False) -> None:
        self.path = path
        self.header = header
        self.fingerprint: str = header["base_fingerprint"]
        self.model_name: str = header["base_model"]
        self.spec = LoraSpec(**header["spec"])
        self.dtype: str = header["dtype"]
        self.experts_dir = path / "experts"
        self.readonly = readonly
        self.lock = None if readonly else BankLock(path).acquire()
        try:
            self._db = connect(path / DB_FILE, readonly)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
               dtype: str = "float32") -> ExpertBank:
        """Make a new, empty bank (refuses a directory that already holds one)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        root = Path(path)
        if (root / "bank.json").exists():
            raise BankError(f"{root.name!r} already holds an expert bank; open it instead")
        (root / "experts").mkdir(parents=True, exist_ok=True)
        with BankLock(root):
            header = {"format": FORMAT, "version": VERSION, "base_fingerprint": fingerprint,
                      "base_model": model_name,
                      "spec": {"rank": spec.rank, "alpha": spec.alpha, "n_layers": spec.n_layers},
                      "dtype": dtype, "created": now()}
            (root / DB_FILE).unlink(missing_ok=True)  # a create interrupted before bank.json
            create_database(root / DB_FILE)
            tmp = root / ".bank.json.tmp"
            tmp.write_text(json.dumps(header, indent=1) + "\n")
            os.replace(tmp, root / "bank.json")
            return cls(root, header)

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: str | None = None,
             readonly: bool = False) -> ExpertBank:
        """Open a bank; refuse one built for another base model when a fingerprint is given."""
        root = Path(path)
        header = read_header(root)
        if expected_fingerprint is not None and header["base_fingerprint"] != expected_fingerprint:
            raise WrongBaseModelError(
                f"bank {root.name!r} was built for base model {header['base_model']!r} "
                f"(fingerprint {header['base_fingerprint']}), but the loaded model has "
                f"fingerprint {expected_fingerprint}; load that model or build a new bank")
        return cls(root, header, readonly)

    @classmethod
    def open_or_create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
                       dtype: str = "float32") -> ExpertBank:
        if (Path(path) / "bank.json").exists():
            bank = cls.open(path, expected_fingerprint=fingerprint)
            if bank.spec != spec:
                bank.close()
                raise BankError(f"{Path(path).name!r} holds experts of shape {bank.spec}, "
                                f"not {spec}")
            return bank
        return cls.create(path, fingerprint, model_name, spec, dtype)

    def close(self) -> None:
        self._db.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> ExpertBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise BankError(f"bank {self.path.name!r} was opened read-only")

    def _may_stage(self) -> None:
        self._writable()

    def stage(self, expert: Expert, *, unit_id: str, content_hash: str, settings_hash: str,
              surrogate: str, title: str = "", meta: dict[str, Any] | None = None,
              doc_id: str | None = None, doc_units: Sequence[str] = ()) -> Staged:
        """Write ``expert``'s file (not yet visible). ``doc_units``: every unit id of the document
        version it belongs to, recorded in the header for a rebuild from files."""
        self._may_stage()
        if expert.spec != self.spec:
            raise BankError(f"expert {expert.id!r} has shape {expert.spec}, the bank holds "
                            f"{self.spec}")
        stamp = now()
        # a replaced expert keeps its creation time, in its row and in its file's record alike
        # (a bank rebuilt from the files must give the same rows)
        old = self._db.execute("SELECT created FROM experts WHERE id=?", (expert.id,)).fetchone()
        row: dict[str, Any] = {
            "id": expert.id, "doc_id": doc_id if doc_id is not None else doc_of(unit_id),
            "unit_id": unit_id, "content_hash": content_hash, "settings_hash": settings_hash,
            "surrogate": surrogate, "title": title, "meta": json.dumps(meta or {}),
            "dtype": self.dtype, "created": old[0] if old else stamp, "updated": stamp,
            "file": safe_file_name(expert.id)}
        record = {**row, "doc_units": list(doc_units) or [expert.id], "written": time.time_ns()}
        written = write_expert(self.experts_dir / row["file"], expert, self.fingerprint,
                               self.dtype, record)
        row.update(bytes=written.size, checksum=written.checksum)
        kill_point("bank.staged")
        return Staged(row)

    def commit_document(self, doc_id: str, staged: Sequence[Staged],
                        keep: Iterable[str] = ()) -> DocumentChange:
        """Make ``staged`` the document's new experts in one transaction; rows of ``doc_id`` that
        are neither staged nor in ``keep`` (unchanged units) are removed. Replaced files go after
        the commit."""
        self._writable()
        new_ids = {s.id for s in staged}
        assert all(s.row["doc_id"] == doc_id for s in staged), f"staged rows outside {doc_id!r}"
        keep_ids = set(keep) | new_ids
        marks = ",".join("?" * len(new_ids))
        rows = self._db.execute(f"SELECT id, file FROM experts WHERE doc_id=? OR id IN "
                                f"({marks})", (doc_id, *new_ids)).fetchall()
        old = {r[0]: r[1] for r in rows}
        removed = sorted(i for i in old if i not in keep_ids)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM experts WHERE id=?", [(i,) for i in removed])
            kill_point("bank.in_transaction")
            for s in staged:  # a replaced expert's creation time was kept by ``stage``
                self._db.execute(f"INSERT OR REPLACE INTO experts ({','.join(ROW_COLUMNS)}) "
                                 f"VALUES ({','.join('?' * len(ROW_COLUMNS))})",
                                 tuple(s.row[c] for c in ROW_COLUMNS))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            for s in staged:
                (self.experts_dir / s.row["file"]).unlink(missing_ok=True)
            raise
        kill_point("bank.committed")
        for expert_id, name in old.items():
            if expert_id in removed or expert_id in new_ids:
                (self.experts_dir / name).unlink(missing_ok=True)
        return DocumentChange(doc_id, sorted(new_ids), removed)

    def quarantine_leftovers(self) -> list[str]:
        """Move the files an interrupted write left behind to ``quarantine/`` (see
        ``dmoe.experts.integrity.quarantine_leftovers``); the names moved."""
        from dmoe.experts.integrity import quarantine_leftovers

        return quarantine_leftovers(self)

    def add(self, expert: Expert, unit_id: str, content_hash: str, settings_hash: str,
            surrogate: str, title: str = "", meta: dict[str, Any] | None = None,
            doc_id: str | None = None) -> ExpertInfo:
        """Store one new expert; an existing id is an error (use ``update``). Other experts of its
        document are kept."""
        if self.exists(expert.id):
            raise BankError(f"expert {expert.id!r} is already in the bank; use update()")
        return self.update(expert, unit_id, content_hash, settings_hash, surrogate, title, meta,
                           doc_id)

    def update(self, expert: Expert, unit_id: str, content_hash: str, settings_hash: str,
               surrogate: str, title: str = "", meta: dict[str, Any] | None = None,
               doc_id: str | None = None) -> ExpertInfo:
        """Store or replace one expert, keeping the rest of its document."""
        s = self.stage(expert, unit_id=unit_id, content_hash=content_hash,
                       settings_hash=settings_hash, surrogate=surrogate, title=title, meta=meta,
                       doc_id=doc_id)
        doc = s.row["doc_id"]
        self.commit_document(doc, [s], keep=self.document_ids(doc))
        return self.info(expert.id)

    def delete(self, expert_id: str) -> None:
        """Remove one expert (row first, so a crash leaves only an orphan file)."""
        self._writable()
        old = self.info(expert_id)
        self._db.execute("DELETE FROM experts WHERE id=?", (expert_id,))
        (self.experts_dir / old.file).unlink(missing_ok=True)

    def delete_document(self, doc_id: str) -> DocumentChange:
        """Remove every expert of a document in one transaction."""
        if not self.document_ids(doc_id):
            raise KeyError(f"no document {doc_id!r} in the bank")
        return self.commit_document(doc_id, [])

    # -- reads -----------------------------------------------------------------------------------

    def exists(self, expert_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM experts WHERE id=?", (expert_id,)).fetchone() is not None

    def info(self, expert_id: str) -> ExpertInfo:
        row = self._db.execute(f"SELECT {','.join(COLUMNS)} FROM experts WHERE id=?",
                               (expert_id,)).fetchone()
        if row is None:
            raise KeyError(f"no expert {expert_id!r} in the bank")
        return self._info(row)

    @staticmethod
    def _info(row: tuple[Any, ...]) -> ExpertInfo:
        values = dict(zip(COLUMNS, row, strict=True))
        values["meta"] = json.loads(values["meta"])
        return ExpertInfo(**values)

    def get(self, expert_id: str) -> Expert:
        """Load one expert, verified against its row (size, checksum) and finite; a file that
        fails is ``ExpertUnavailableError`` (pair with ``ExpertCache`` for reuse)."""
        info = self.info(expert_id)
        path = self.experts_dir / info.file
        if not path.is_file():
            raise ExpertUnavailableError(f"expert {expert_id!r}: its file is missing; run "
                                         f"`dmoe bank check --repair`")
        try:
            expert = load_expert(path, self.fingerprint, info.bytes, info.checksum)
        except ExpertFormatError as e:
            raise ExpertUnavailableError(f"expert {expert_id!r} is corrupt: {e}") from e
        if expert.id != expert_id:
            raise ExpertUnavailableError(f"expert {expert_id!r}: its file holds {expert.id!r}")
        return expert

    def list(self) -> list[ExpertInfo]:
        rows = self._db.execute(f"SELECT {','.join(COLUMNS)} FROM experts ORDER BY id").fetchall()
        return [self._info(r) for r in rows]

    def page(self, after: str | None = None, limit: int = 1000) -> builtins.list[ExpertInfo]:
        """Up to ``limit`` experts in id order, starting after id ``after`` (keyset paging: each
        page costs ``limit`` rows, however large the bank)."""
        rows = self._db.execute(f"SELECT {','.join(COLUMNS)} FROM experts WHERE id > ? ORDER BY id "
                                f"LIMIT ?", (after or "", limit)).fetchall()
        return [self._info(r) for r in rows]

    def ids(self) -> builtins.list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM experts ORDER BY id")]

    def document_ids(self, doc_id: str) -> builtins.list[str]:
        """The expert ids of one document."""
        return [r[0] for r in self._db.execute("SELECT id FROM experts WHERE doc_id=? ORDER BY id",
                                               (doc_id,))]

    def unreferenced(self, names: Sequence[str]) -> builtins.list[str]:
        """The file names in ``names`` that no row points at (one indexed query)."""
        if not names:
            return []
        marks = ",".join("?" * len(names))
        known = {r[0] for r in self._db.execute(f"SELECT file FROM experts WHERE file IN ({marks})",
                                                tuple(names))}
        return [n for n in names if n not in known]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM experts").fetchone()[0])

    def has(self, content_hash: str, settings_hash: str) -> str | None:
        """Id of an expert trained on this content with these settings, if any (rebuild skip)."""
        row = self._db.execute("SELECT id FROM experts WHERE content_hash=? AND settings_hash=? "
                               "ORDER BY id LIMIT 1", (content_hash, settings_hash)).fetchone()
        return None if row is None else str(row[0])

    def surrogates(self) -> dict[str, str]:
        """``{expert id: routing text}`` for building the router's index."""
        return dict(self.iter_surrogates())

    def iter_surrogates(self) -> Iterator[tuple[str, str]]:
        """``(expert id, routing text)`` of every expert, streamed from the database (a bank of
        10^5 experts holds ~170 MB of routing text; this never holds more than a row of it)."""
        yield from self._db.execute("SELECT id, surrogate FROM experts ORDER BY id")

    def surrogate(self, expert_id: str) -> str:
        """The routing text of one expert."""
        row = self._db.execute("SELECT surrogate FROM experts WHERE id=?", (expert_id,)).fetchone()
        if row is None:
            raise KeyError(f"no expert {expert_id!r} in the bank")
        return str(row[0])

    def integrity_check(self) -> str:
        """SQLite's own ``PRAGMA integrity_check``: ``"ok"`` or its first complaint."""
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def loader(self) -> Any:
        """``id -> Expert`` for ``ExpertCache(bank.loader(), capacity)``."""
        return self.get


class StagingBank(ExpertBank):
    """The bank as a build worker sees it (another process, or another machine on a shared
    filesystem): rows are read-only, and ``stage`` writes expert files that no row points at,
    hence invisible, until the bank's one writer commits them (``commit_document``). A worker
    that dies leaves only such files, which the writer's next ``quarantine_leftovers`` moves away.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(Path(path), read_header(Path(path)), readonly=True)

    def _may_stage(self) -> None:
        """Staging writes only a file nobody points at."""


def convert_bank(src: str | Path, dst: str | Path, dtype: str,
                 progress: Callable[[int], None] | None = None) -> int:
    """Copy bank ``src`` into bank ``dst`` with every expert stored in ``dtype``: the same ids,
    documents, hashes, routing texts and records; only the expert files are re-encoded (int8:
    absmax per rank channel, see ``dmoe.experts.format``). Converting up (fp16 -> fp32) restores
    nothing. Resumable, as ``merge_banks``; returns how many experts were written."""
    return merge_banks([src], dst, dtype, progress)


def merge_banks(sources: Sequence[str | Path], dst: str | Path, dtype: str | None = None,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy every expert of the banks ``sources`` into bank ``dst`` (created, or opened when it
    exists), stored in ``dtype`` (default: the first source's). All must share one base model
    and expert shape. Each expert keeps its id, document, hashes, routing text and record.

    An id ``dst`` already holds with the same content and settings hashes is skipped, so a shared
    passage is stored once and an interrupted merge resumes; the same id trained from other text
    or settings is a ``BankError`` (nothing of that source is written past it). Returns how many
    experts were written; ``progress(1)`` after each expert seen."""
    if not sources:
        raise ValueError("merge_banks needs at least one source bank")
    written = 0
    first = read_header(Path(sources[0]))
    target = ExpertBank.open_or_create(dst, first["base_fingerprint"], first["base_model"],
                                       LoraSpec(**first["spec"]), dtype or first["dtype"])
    try:
        if dtype is not None and target.dtype != dtype:
            raise BankError(f"{Path(dst).name!r} already holds a {target.dtype} bank, not {dtype}")
        for src in sources:
            with ExpertBank.open(src, expected_fingerprint=target.fingerprint,
                                 readonly=True) as source:
                if source.spec != target.spec:
                    raise BankError(f"{Path(src).name!r} holds experts of shape {source.spec}, "
                                    f"{Path(dst).name!r} holds {target.spec}")
                after = None
                while page := source.page(after):
                    for info in page:
                        written += _copy_expert(source, target, info)
                        if progress is not None:
                            progress(1)
                    after = page[-1].id
    finally:
        target.close()
    return written


def _copy_expert(source: ExpertBank, target: ExpertBank, info: ExpertInfo) -> int:
    """Add ``info``'s expert to ``target`` (1), or skip the identical one it holds (0)."""
    if target.exists(info.id):
        have = target.info(info.id)
        if (have.content_hash, have.settings_hash) != (info.content_hash, info.settings_hash):
            raise BankError(f"expert {info.id!r} of {source.path.name!r} differs from the one "
                            f"{target.path.name!r} holds (other text or training settings); "
                            f"remove one of them first")
        return 0
    target.add(source.get(info.id), info.unit_id, info.content_hash, info.settings_hash,
               source.surrogate(info.id), info.title, info.meta, info.doc_id)
    return 1


def expert_layers(path: str | Path | None) -> int:
    """How many top layers the bank at ``path`` puts experts on (1 when there is no bank yet):
    the MLPs a packed model must keep float (``load_base_model(float_mlps=...)``)."""
    if path is None or not (Path(path) / "bank.json").is_file():
        return 1
    return int(read_header(Path(path))["spec"]["n_layers"])
