"""The expert bank: many experts on disk, each added, replaced or deleted on its own.

Layout of a bank directory (inspectable with ``sqlite3`` and any safetensors reader)::

    BANK/
      bank.json                 {"format": "dmoe-bank", "version": 1, "base_fingerprint": ...,
                                 "base_model": ..., "spec": {"rank", "alpha", "n_layers"},
                                 "dtype": "float32" | "float16" | "bfloat16", "created": ISO-8601}
      bank.sqlite               table ``experts`` (WAL journal), one row per expert:
                                  id TEXT PRIMARY KEY, unit_id, content_hash, settings_hash,
                                  surrogate (routing text: passage + paraphrase + QA pairs),
                                  title, meta (JSON), dtype, bytes, file, created, updated
      experts/<file>            one ``save_expert`` safetensors file per expert, named
                                ``sha256(id)[:24]-<8 random hex>.safetensors`` (ids may hold any
                                character; file names never derive from them directly)

Writes are crash-safe in this order: the tensor file is written under a fresh name (temporary file +
atomic rename), then the row is committed pointing at it, then a replaced file is deleted. A crash
can therefore leave only *orphan files* (no row points at them) and temporary files, never a row
pointing at a half-written file. ``check()`` reports orphans and rows whose file is missing (e.g.
deleted by hand); ``repair()`` deletes orphan/temporary files and the rows without files (their units
are retrained on the next build). ``has(content_hash, settings_hash)`` lets a rebuild skip units
that are already trained.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.errors import BankError, WrongBaseModelError
from dmoe.experts.format import STORAGE_DTYPES, load_expert, save_expert
from dmoe.experts.lora import Expert, LoraSpec

FORMAT = "dmoe-bank"
VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    id TEXT PRIMARY KEY, unit_id TEXT NOT NULL, content_hash TEXT NOT NULL,
    settings_hash TEXT NOT NULL, surrogate TEXT NOT NULL, title TEXT NOT NULL, meta TEXT NOT NULL,
    dtype TEXT NOT NULL, bytes INTEGER NOT NULL, file TEXT NOT NULL,
    created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS experts_by_content ON experts (content_hash, settings_hash);
"""
_COLUMNS = ("id", "unit_id", "content_hash", "settings_hash", "title", "meta", "dtype", "bytes",
            "file", "created", "updated")


@dataclass(frozen=True)
class ExpertInfo:
    """One row of the bank (without the surrogate text; see ``surrogates()``)."""

    id: str
    unit_id: str
    content_hash: str
    settings_hash: str
    title: str
    meta: dict[str, Any]
    dtype: str
    bytes: int
    file: str
    created: str
    updated: str


@dataclass
class BankReport:
    """What ``check()`` found (or ``repair()`` fixed)."""

    orphan_files: list[str] = field(default_factory=list)  # files in experts/ with no row
    missing_files: list[str] = field(default_factory=list)  # expert ids whose file is gone
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes

    @property
    def ok(self) -> bool:
        return not (self.orphan_files or self.missing_files or self.temp_files)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def safe_file_name(expert_id: str) -> str:
    """A fresh file name for ``expert_id``: a hash prefix (never the id) plus a random suffix."""
    digest = hashlib.sha256(expert_id.encode("utf-8")).hexdigest()[:24]
    return f"{digest}-{secrets.token_hex(4)}.safetensors"


class ExpertBank:
    """A directory of experts for one base model; see the module docstring for the layout."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = header
        self.fingerprint: str = header["base_fingerprint"]
        self.model_name: str = header["base_model"]
        self.spec = LoraSpec(**header["spec"])
        self.dtype: str = header["dtype"]
        self.experts_dir = path / "experts"
        # autocommit; usable from the server's worker threads (sqlite serialises access)
        self._db = sqlite3.connect(path / "bank.sqlite", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
               dtype: str = "float32") -> ExpertBank:
        """Make a new, empty bank (refuses a directory that already holds one)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        root = Path(path)
        if (root / "bank.json").exists():
            raise BankError(f"{root} already holds an expert bank; open it instead")
        (root / "experts").mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "base_fingerprint": fingerprint,
                  "base_model": model_name,
                  "spec": {"rank": spec.rank, "alpha": spec.alpha, "n_layers": spec.n_layers},
                  "dtype": dtype, "created": _now()}
        bank = cls(root, header)  # creates the database before bank.json marks the bank valid
        tmp = root / ".bank.json.tmp"
        tmp.write_text(json.dumps(header, indent=1) + "\n")
        os.replace(tmp, root / "bank.json")
        return bank

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: str | None = None) -> ExpertBank:
        """Open a bank; refuse one built for another base model when a fingerprint is given."""
        root = Path(path)
        try:
            header = json.loads((root / "bank.json").read_text())
        except FileNotFoundError:
            raise BankError(f"{root} is not an expert bank (no bank.json)") from None
        except json.JSONDecodeError as e:
            raise BankError(f"{root / 'bank.json'} is not valid JSON ({e})") from e
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise BankError(f"{root}: bank format {header.get('format')!r} version "
                            f"{header.get('version')!r}; this dmoe reads {FORMAT!r} {VERSION}")
        if expected_fingerprint is not None and header["base_fingerprint"] != expected_fingerprint:
            raise WrongBaseModelError(
                f"{root} was built for base model {header['base_model']!r} (fingerprint "
                f"{header['base_fingerprint']}), but the loaded model has fingerprint "
                f"{expected_fingerprint}; load that model or build a new bank")
        return cls(root, header)

    @classmethod
    def open_or_create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
                       dtype: str = "float32") -> ExpertBank:
        if (Path(path) / "bank.json").exists():
            bank = cls.open(path, expected_fingerprint=fingerprint)
            if bank.spec != spec:
                raise BankError(f"{path} holds experts of shape {bank.spec}, not {spec}")
            return bank
        return cls.create(path, fingerprint, model_name, spec, dtype)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ExpertBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------------

    def _write_file(self, expert: Expert) -> tuple[str, int]:
        if expert.spec != self.spec:
            raise BankError(f"expert {expert.id!r} has shape {expert.spec}, the bank holds {self.spec}")
        name = safe_file_name(expert.id)
        size = save_expert(self.experts_dir / name, expert, self.fingerprint, self.dtype)
        return name, size

    def add(self, expert: Expert, unit_id: str, content_hash: str, settings_hash: str,
            surrogate: str, title: str = "", meta: dict[str, Any] | None = None) -> ExpertInfo:
        """Store a new expert; an existing id is an error (use ``update``)."""
        if self.exists(expert.id):
            raise BankError(f"expert {expert.id!r} is already in the bank; use update()")
        name, size = self._write_file(expert)
        now = _now()
        try:
            self._db.execute(
                "INSERT INTO experts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (expert.id, unit_id, content_hash, settings_hash, surrogate, title,
                 json.dumps(meta or {}), self.dtype, size, name, now, now))
        except BaseException:
            (self.experts_dir / name).unlink(missing_ok=True)
            raise
        return self.info(expert.id)

    def update(self, expert: Expert, unit_id: str, content_hash: str, settings_hash: str,
               surrogate: str, title: str = "", meta: dict[str, Any] | None = None) -> ExpertInfo:
        """Replace an expert: new file, then the row switches to it in one commit, then the old
        file is removed. Readers see either the old or the new expert, never a mix."""
        old = self.info(expert.id)
        name, size = self._write_file(expert)
        try:
            self._db.execute(
                "UPDATE experts SET unit_id=?, content_hash=?, settings_hash=?, surrogate=?, "
                "title=?, meta=?, dtype=?, bytes=?, file=?, updated=? WHERE id=?",
                (unit_id, content_hash, settings_hash, surrogate, title, json.dumps(meta or {}),
                 self.dtype, size, name, _now(), expert.id))
        except BaseException:
            (self.experts_dir / name).unlink(missing_ok=True)
            raise
        (self.experts_dir / old.file).unlink(missing_ok=True)
        return self.info(expert.id)

    def delete(self, expert_id: str) -> None:
        """Remove one expert (row first, so a crash leaves only an orphan file)."""
        old = self.info(expert_id)
        self._db.execute("DELETE FROM experts WHERE id=?", (expert_id,))
        (self.experts_dir / old.file).unlink(missing_ok=True)

    # -- reads -----------------------------------------------------------------------------------

    def exists(self, expert_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM experts WHERE id=?", (expert_id,)).fetchone() is not None

    def info(self, expert_id: str) -> ExpertInfo:
        row = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM experts WHERE id=?",
                               (expert_id,)).fetchone()
        if row is None:
            raise KeyError(f"no expert {expert_id!r} in {self.path}")
        return self._info(row)

    @staticmethod
    def _info(row: tuple[Any, ...]) -> ExpertInfo:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["meta"] = json.loads(values["meta"])
        return ExpertInfo(**values)

    def get(self, expert_id: str) -> Expert:
        """Load one expert's weights (one file read; pair with ``ExpertCache`` for reuse)."""
        path = self.experts_dir / self.info(expert_id).file
        if not path.is_file():
            raise BankError(f"expert {expert_id!r}: file {path} is missing; run repair()")
        return load_expert(path, expected_fingerprint=self.fingerprint)

    def list(self) -> list[ExpertInfo]:
        rows = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM experts ORDER BY id").fetchall()
        return [self._info(r) for r in rows]

    def ids(self) -> builtins.list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM experts ORDER BY id")]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM experts").fetchone()[0])

    def has(self, content_hash: str, settings_hash: str) -> str | None:
        """Id of an expert trained on this content with these settings, if any (rebuild skip)."""
        row = self._db.execute("SELECT id FROM experts WHERE content_hash=? AND settings_hash=? "
                               "ORDER BY id LIMIT 1", (content_hash, settings_hash)).fetchone()
        return None if row is None else str(row[0])

    def surrogates(self) -> dict[str, str]:
        """``{expert id: routing text}`` for building the router's index."""
        return dict(self._db.execute("SELECT id, surrogate FROM experts ORDER BY id").fetchall())

    def surrogate(self, expert_id: str) -> str:
        """The routing text of one expert."""
        row = self._db.execute("SELECT surrogate FROM experts WHERE id=?", (expert_id,)).fetchone()
        if row is None:
            raise KeyError(f"no expert {expert_id!r} in {self.path}")
        return str(row[0])

    def loader(self) -> Any:
        """``id -> Expert`` for ``ExpertCache(bank.loader(), capacity)``."""
        return self.get

    # -- consistency -----------------------------------------------------------------------------

    def check(self) -> BankReport:
        """Compare rows and files; changes nothing."""
        files = {p.name for p in self.experts_dir.iterdir() if p.is_file()}
        rows = dict(self._db.execute("SELECT file, id FROM experts").fetchall())
        temps = sorted(f for f in files if f.startswith(".tmp-"))
        return BankReport(orphan_files=sorted(files - set(rows) - set(temps)),
                          missing_files=sorted(i for f, i in rows.items() if f not in files),
                          temp_files=temps)

    def repair(self) -> BankReport:
        """Delete orphan and temporary files and the rows whose file is missing; return what was
        fixed. Run it when no other process is writing to the bank."""
        report = self.check()
        for name in report.orphan_files + report.temp_files:
            (self.experts_dir / name).unlink(missing_ok=True)
        for expert_id in report.missing_files:
            self._db.execute("DELETE FROM experts WHERE id=?", (expert_id,))
        return report
