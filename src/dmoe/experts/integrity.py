"""Checking and repairing a bank's files and database, and upgrading an old bank.

``check_bank(path)`` never writes (the database is opened read-only). It reports:

- the database: ``ok``, ``missing`` or ``unreadable: <why>`` (SQLite's ``integrity_check``);
- rows whose file is missing, and files whose size, header or checksum do not match their row
  (``deep=True`` also loads every expert and refuses non-finite weights and wrong shapes);
- orphan files (no row points at them) and temporary files of interrupted writes.

``check_bank(path, repair=True)`` takes the bank lock and fixes what it found, deleting nothing it
cannot account for: a lost database is moved to ``quarantine/`` and *rebuilt from the expert files'
headers*; orphan, temporary and corrupt files are moved to ``quarantine/`` (``log.jsonl`` says
why); rows without a usable file are removed, so the next build retrains their units.

Rebuilding picks, per document, the newest file of each unit and the unit set recorded by the
document's newest file, so a document updated just before the database was lost comes back whole,
without its stale passages; a document whose newest version is incomplete is reported.

This module knows nothing about the router index (``dmoe.knowledge`` checks that).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.errors import BankDatabaseError, BankError, ExpertFormatError
from dmoe.experts.bank import (
    DB_FILE,
    ROW_COLUMNS,
    VERSION,
    ExpertBank,
    connect,
    create_database,
    doc_of,
    now,
)
from dmoe.experts.format import load_expert, verify_expert_file, write_expert
from dmoe.experts.lock import BankLock
from dmoe.experts.lora import LoraSpec

QUARANTINE = "quarantine"


@dataclass
class BankReport:
    """What ``check_bank`` found (and, with ``repair``, what it did about it)."""

    database: str = "ok"  # ok | missing | unreadable: ...
    experts: int = 0  # rows checked
    deep: bool = False
    missing_files: list[str] = field(default_factory=list)  # expert ids whose file is gone
    corrupt: dict[str, str] = field(default_factory=dict)  # expert id -> why its file is unusable
    orphan_files: list[str] = field(default_factory=list)  # files in experts/ with no row
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes
    rebuilt: int | None = None  # rows recreated from expert files (lost database)
    incomplete_documents: dict[str, list[str]] = field(default_factory=dict)  # doc -> lost units
    quarantined: list[str] = field(default_factory=list)  # names moved to quarantine/
    removed_rows: list[str] = field(default_factory=list)  # ids to be retrained by a build

    @property
    def ok(self) -> bool:
        return self.database == "ok" and not (self.missing_files or self.corrupt
                                              or self.orphan_files or self.temp_files)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"ok": self.ok}


def _quarantine(root: Path, path: Path, reason: str, report: BankReport) -> None:
    folder = root / QUARANTINE
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    while target.exists():
        target = folder / f"{path.stem}.{time.time_ns()}{path.suffix}"
    os.replace(path, target)
    with (folder / "log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"time": now(), "file": target.name, "from": path.parent.name,
                            "reason": reason}) + "\n")
    report.quarantined.append(target.name)


def _open_database(root: Path, readonly: bool, report: BankReport) -> sqlite3.Connection | None:
    try:
        db = connect(root / DB_FILE, readonly)
        verdict = str(db.execute("PRAGMA integrity_check").fetchone()[0])
    except BankDatabaseError as e:
        missing = not (root / DB_FILE).is_file()
        report.database = "missing" if missing else f"unreadable: {e.__cause__ or 'not a bank database'}"
        return None
    except sqlite3.DatabaseError as e:
        report.database = f"unreadable: {e}"
        return None
    if verdict != "ok":
        db.close()
        report.database = f"unreadable: {verdict}"
        return None
    return db


def _verify(path: Path, header: dict[str, Any], deep: bool, size: int | None = None,
            checksum: str | None = None) -> dict[str, Any]:
    """The file's header record, after checking it (``ExpertFormatError`` when unusable)."""
    if deep:
        expert = load_expert(path, header["base_fingerprint"], size, checksum)
        spec = LoraSpec(**header["spec"])
        if expert.spec != spec:
            raise ExpertFormatError(f"{path.name}: shape {expert.spec}, the bank holds {spec}")
        for key, t in expert.weights.items():
            if spec.rank not in t.shape:
                raise ExpertFormatError(f"{path.name}: {key} has shape {tuple(t.shape)}")
    parsed = verify_expert_file(path, size, checksum)
    if parsed.meta.get("base_fingerprint") != header["base_fingerprint"]:
        raise ExpertFormatError(f"{path.name}: trained for another base model")
    return parsed.record | {"id": parsed.meta["id"], "bytes": parsed.size,
                            "checksum": parsed.checksum}


def _rebuild(root: Path, header: dict[str, Any], db: sqlite3.Connection,
             report: BankReport) -> None:
    """Fill an empty database from the expert files' headers (see the module docstring)."""
    by_doc: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}
    newest: dict[str, tuple[int, list[str]]] = {}
    for path in sorted((root / "experts").iterdir()):
        if not path.is_file() or path.name.startswith(".tmp-"):
            continue
        try:
            rec = _verify(path, header, deep=True)
            if not all(c in rec for c in ROW_COLUMNS if c not in ("bytes", "checksum")):
                raise ExpertFormatError(f"{path.name}: no bank record in its header (format 1?)")
        except ExpertFormatError as e:
            _quarantine(root, path, f"rebuild: {e}", report)
            continue
        rec["file"], written = path.name, int(rec.get("written", 0))
        units = by_doc.setdefault(rec["doc_id"], {})
        if rec["id"] in units and units[rec["id"]][0] >= written:
            _quarantine(root, path, f"rebuild: an older copy of {rec['id']!r}", report)
            continue
        if rec["id"] in units:
            _quarantine(root, root / "experts" / units[rec["id"]][1]["file"],
                        f"rebuild: an older copy of {rec['id']!r}", report)
        units[rec["id"]] = (written, rec)
        if written >= newest.get(rec["doc_id"], (-1, []))[0]:
            newest[rec["doc_id"]] = (written, list(rec.get("doc_units") or [rec["id"]]))
    rows = []
    for doc_id, units in by_doc.items():
        wanted = set(newest[doc_id][1])
        for expert_id, (_, rec) in units.items():
            if expert_id in wanted:
                rows.append(tuple(rec[c] for c in ROW_COLUMNS))
            else:
                _quarantine(root, root / "experts" / rec["file"],
                            f"rebuild: {expert_id!r} is not in the newest version of {doc_id!r}",
                            report)
        lost = sorted(wanted - set(units))
        if lost:
            report.incomplete_documents[doc_id] = lost
    db.execute("BEGIN IMMEDIATE")
    db.executemany(f"INSERT INTO experts ({','.join(ROW_COLUMNS)}) VALUES "
                   f"({','.join('?' * len(ROW_COLUMNS))})", rows)
    db.execute("COMMIT")
    report.rebuilt = len(rows)


def check_bank(path: str | Path, *, deep: bool = False, repair: bool = False) -> BankReport:
    """Check (and with ``repair`` fix) a bank's database and files; see the module docstring."""
    from dmoe.experts.bank import read_header

    root = Path(path)
    header = read_header(root)
    lock = BankLock(root).acquire() if repair else None
    report = BankReport(deep=deep)
    try:
        db = _open_database(root, readonly=not repair, report=report)
        if db is None and repair:
            for suffix in ("", "-wal", "-shm"):
                if (root / (DB_FILE + suffix)).exists():
                    _quarantine(root, root / (DB_FILE + suffix), report.database, report)
            create_database(root / DB_FILE)
            db = connect(root / DB_FILE, readonly=False)
            _rebuild(root, header, db, report)
        if db is None:  # report only: the files are all we can look at
            return report
        rows = {r[0]: r[1:] for r in db.execute("SELECT file, id, bytes, checksum FROM experts")}
        report.experts = len(rows)
        names = {p.name for p in (root / "experts").iterdir() if p.is_file()}
        report.temp_files = sorted(n for n in names if n.startswith(".tmp-"))
        report.orphan_files = sorted(names - set(rows) - set(report.temp_files))
        for name, (expert_id, size, checksum) in sorted(rows.items(), key=lambda kv: kv[1][0]):
            if name not in names:
                report.missing_files.append(expert_id)
                continue
            try:
                _verify(root / "experts" / name, header, deep, size, checksum)
            except ExpertFormatError as e:
                report.corrupt[expert_id] = str(e)
        if repair:
            for name in report.orphan_files + report.temp_files:
                _quarantine(root, root / "experts" / name, "no row points at it", report)
            files = {i: n for n, (i, _, _) in rows.items()}
            for expert_id, why in report.corrupt.items():
                _quarantine(root, root / "experts" / files[expert_id], why, report)
            report.removed_rows = sorted([*report.missing_files, *report.corrupt])
            db.executemany("DELETE FROM experts WHERE id=?", [(i,) for i in report.removed_rows])
        db.close()
        return report
    finally:
        if lock is not None:
            lock.release()


def migrate_bank(path: str | Path) -> int:
    """Upgrade a format-1 bank in place: every expert file is rewritten with a checksum and its
    row in the header, rows get ``doc_id`` and ``checksum``; nothing is retrained. Rerunnable;
    returns the number of experts rewritten."""
    root = Path(path)
    header = json.loads((root / "bank.json").read_text())
    if header.get("version") == VERSION:
        return 0
    if header.get("version") != 1:
        raise BankError(f"bank {root.name!r}: cannot migrate format version "
                        f"{header.get('version')!r}")
    with BankLock(root):
        db = sqlite3.connect(root / DB_FILE, isolation_level=None)
        cols = {r[1] for r in db.execute("PRAGMA table_info(experts)")}
        for col in ("doc_id", "checksum"):
            if col not in cols:
                db.execute(f"ALTER TABLE experts ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")
        db.execute("CREATE INDEX IF NOT EXISTS experts_by_doc ON experts (doc_id)")
        todo = db.execute(f"SELECT {','.join(ROW_COLUMNS)} FROM experts WHERE checksum=''")
        n = 0
        for values in todo.fetchall():
            row = dict(zip(ROW_COLUMNS, values, strict=True))
            row["doc_id"] = doc_of(row["unit_id"])
            old = root / "experts" / row["file"]
            expert = load_expert(old, header["base_fingerprint"])
            row["file"] = old.name.rsplit("-", 1)[0] + f"-m{time.time_ns() % 10**7:07d}.safetensors"
            written = write_expert(root / "experts" / row["file"], expert,
                                   header["base_fingerprint"], header["dtype"],
                                   {**row, "doc_units": [row["id"]], "written": time.time_ns()})
            db.execute("UPDATE experts SET doc_id=?, checksum=?, bytes=?, file=? WHERE id=?",
                       (row["doc_id"], written.checksum, written.size, row["file"], row["id"]))
            old.unlink()
            n += 1
        db.close()
        tmp = root / ".bank.json.tmp"
        tmp.write_text(json.dumps({**header, "version": VERSION}, indent=1) + "\n")
        os.replace(tmp, root / "bank.json")
    return n


LISTING_CHUNK = 500  # file names looked up per query when listing experts/


def quarantine_leftovers(bank: ExpertBank) -> list[str]:
    """Move the files an interrupted write left behind (temporary files, files no row points at)
    to ``quarantine/``; cheap (a directory listing), run by every writer when it opens a bank."""
    assert not bank.readonly and bank.lock is not None, "needs the bank open for writing"
    leftovers: list[str] = []
    with os.scandir(bank.experts_dir) as entries:  # streamed: memory is one chunk of names
        chunk: list[str] = []
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                chunk.append(entry.name)
            if len(chunk) == LISTING_CHUNK:
                leftovers += bank.unreferenced(chunk)
                chunk = []
        leftovers += bank.unreferenced(chunk)
    report = BankReport()
    for name in sorted(leftovers):
        why = "interrupted write" if name.startswith(".tmp-") else "no row points at it"
        _quarantine(bank.path, bank.experts_dir / name, why, report)
    return report.quarantined
