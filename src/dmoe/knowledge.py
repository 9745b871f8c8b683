"""A knowledge base = an expert bank + the BM25 index over its surrogates, kept consistent.

Layout: the bank directory (see ``dmoe.experts.bank``) with the router index inside it::

    BANK/
      bank.json  bank.sqlite  bank.lock  experts/  quarantine/   # the expert bank
      index/     router.json  tantivy/                           # BM25 over each surrogate

The bank is the source of truth; the index is derived data. Write order keeps the router from ever
naming a missing expert: a document's experts are committed to the bank, then indexed; a delete
removes them from the index, then from the bank. A crash between the two leaves drift that
``sync()`` repairs (run on every writable open) and ``check_knowledge`` reports.

Opening writable takes the bank lock and recovers from a crash: files no row points at are moved to
``quarantine/`` (reported in the log) and the index is synced. ``readonly=True`` changes nothing on
disk. An expert that cannot be loaded (corrupt file, non-finite weights) is dropped from the step
that asked for it, logged, and counted in ``unusable`` / ``dropped``; the generation goes on.

This module knows nothing about training or decoding; ``dmoe.training.build`` fills it, the engine reads it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.engine.decode import Engine
from dmoe.engine.triggers import TriggerPolicy
from dmoe.errors import BankError, ExpertUnavailableError, RouterIndexError
from dmoe.experts.bank import DocumentChange, ExpertBank, ExpertInfo, Staged
from dmoe.experts.cache import ExpertCache
from dmoe.experts.integrity import QUARANTINE, BankReport, check_bank, quarantine_leftovers
from dmoe.experts.lock import BankLock
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.routing.bm25 import BM25Index, BM25Router
from dmoe.routing.consistency import ReconcileReport, reconcile, text_hash

INDEX_DIR = "index"
log = logging.getLogger("dmoe.knowledge")


@dataclass
class CheckReport:
    """The bank's report, the index's drift, and whether anything was repaired."""

    bank: BankReport = field(default_factory=BankReport)
    index: ReconcileReport | None = None
    index_error: str | None = None  # the index could not be opened (missing, garbage)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return (self.bank.ok and self.index_error is None
                and (self.index is None or self.index.in_sync))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "repaired": self.repaired, "bank": self.bank.to_dict(),
                "index_error": self.index_error,
                "index": self.index.to_dict() if self.index is not None else None}


def _quarantine_index(root: Path) -> str:
    folder = root / QUARANTINE
    folder.mkdir(exist_ok=True)
    target = folder / f"index.{time.time_ns()}"
    os.replace(root / INDEX_DIR, target)
    return target.name


def check_knowledge(path: str | Path, *, deep: bool = False, repair: bool = False) -> CheckReport:
    """``dmoe bank check``: the bank (``check_bank``) and its index. Without ``repair`` nothing is
    written; with it, a missing or unreadable index is quarantined and rebuilt from the bank."""
    root = Path(path)
    lock = BankLock(root).acquire() if repair else None
    try:
        report = CheckReport(bank=check_bank(root, deep=deep, repair=repair), repaired=repair)
        if report.bank.database != "ok" and not repair:
            return report
        try:
            index = BM25Index.open(root / INDEX_DIR, readonly=not repair)
        except RouterIndexError as e:
            report.index_error = str(e)
            if not repair:
                return report
            if (root / INDEX_DIR).exists():
                report.bank.quarantined.append(_quarantine_index(root))
            index = BM25Index.create(root / INDEX_DIR)
        with index, ExpertBank.open(root, readonly=True) as bank:
            report.index = reconcile_with_bank(index, bank, dry_run=not repair)
        if repair:
            report.index_error = None
        return report
    finally:
        if lock is not None:
            lock.release()


def reconcile_with_bank(index: BM25Index, bank: ExpertBank, dry_run: bool = False
                        ) -> ReconcileReport:
    """``reconcile`` the index with the bank by surrogate hashes: the routing texts are streamed
    and hashed, and only those of drifted experts are read again, so memory grows by an id and a
    hash per expert, not by the bank's text."""
    hashes = {expert_id: text_hash(text) for expert_id, text in bank.iter_surrogates()}
    return reconcile(index, hashes, dry_run=dry_run, hashed=True, load_text=bank.surrogate)


class KnowledgeBase:
    """Expert bank + router index. Thread-safe for one writer and many readers in one process."""

    def __init__(self, bank: ExpertBank, index: BM25Index, cache_capacity: int = 64) -> None:
        self.bank = bank
        self.index = index
        self.unusable: dict[str, str] = {}  # expert id -> why it was dropped (since last change)
        self.dropped = 0  # expert loads refused (each drop of an expert from a step)
        self.experts = ExpertCache(self._load, capacity=cache_capacity, on_error=self._drop,
                                   skip=(ExpertUnavailableError, KeyError))
        self.lock = threading.RLock()  # serialises writes; readers go through bank/index directly

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: str | None = None,
             cache_capacity: int = 64, sync: bool = True, readonly: bool = False) -> KnowledgeBase:
        """Open an existing knowledge base. Writable: take the lock, quarantine what a crash left
        behind and (``sync``) repair index drift. ``readonly``: change nothing."""
        path = Path(path)
        if not (path / "bank.json").is_file():
            raise BankError(f"{path.name!r} is not an expert bank (no bank.json); build one with "
                            f"`dmoe build CORPUS --bank {path.name}`")
        bank = ExpertBank.open(path, expected_fingerprint, readonly=readonly)
        try:
            index = cls._open_index(path, readonly)
            if not readonly:
                moved = quarantine_leftovers(bank)
                if moved:
                    log.warning("moved %d file(s) an interrupted write left behind to %s/: %s",
                                len(moved), QUARANTINE, ", ".join(moved[:5]))
        except BaseException:
            bank.close()
            raise
        kb = cls(bank, index, cache_capacity)
        if sync and not readonly:
            kb.sync()
        return kb

    @staticmethod
    def _open_index(path: Path, readonly: bool) -> BM25Index:
        try:
            if readonly:
                return BM25Index.open(path / INDEX_DIR, readonly=True)
            return BM25Index.open_or_create(path / INDEX_DIR)
        except RouterIndexError as e:
            raise RouterIndexError(f"{e}; run `dmoe bank check --repair --bank {path.name}` to "
                                   f"rebuild the index from the bank") from e

    @classmethod
    def open_or_create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
                       dtype: str = "float32", cache_capacity: int = 64) -> KnowledgeBase:
        if (Path(path) / "bank.json").is_file():
            kb = cls.open(path, fingerprint, cache_capacity)
            if kb.bank.spec != spec:
                kb.close()
                raise BankError(f"{Path(path).name!r} holds experts of shape {kb.bank.spec}, "
                                f"not {spec}")
            return kb
        bank = ExpertBank.create(path, fingerprint, model_name, spec, dtype)
        kb = cls(bank, cls._open_index(Path(path), False), cache_capacity)
        kb.sync()
        return kb

    def close(self) -> None:
        self.index.close()
        self.bank.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consistency ---------------------------------------------------------------------------

    def sync(self) -> ReconcileReport:
        """Make the index hold exactly the bank's experts with their current surrogates."""
        with self.lock:
            return reconcile_with_bank(self.index, self.bank)

    def check(self, repair: bool = False, deep: bool = False) -> CheckReport:
        """Report (and with ``repair`` fix) the bank and this open index."""
        with self.lock:
            bank_report = check_bank(self.bank.path, deep=deep, repair=repair)
            index_report = reconcile_with_bank(self.index, self.bank, dry_run=not repair)
            if repair:
                self.invalidate()
            return CheckReport(bank=bank_report, index=index_report, repaired=repair)

    @property
    def degraded(self) -> bool:
        return bool(self.unusable)

    def _load(self, expert_id: str) -> Any:
        return self.bank.get(expert_id)

    def _drop(self, expert_id: str, error: Exception) -> None:
        self.dropped += 1
        reason = str(error).strip("'\"")
        if expert_id not in self.unusable:
            log.error("expert %r dropped from generation: %s", expert_id, reason)
        self.unusable[expert_id] = reason

    def invalidate(self, expert_ids: Sequence[str] | None = None) -> None:
        """Forget cached experts (all of them with ``None``) and their unusable marks."""
        if expert_ids is None:
            self.experts.invalidate()
            self.unusable.clear()
            return
        for expert_id in expert_ids:
            self.experts.invalidate(expert_id)
            self.unusable.pop(expert_id, None)

    # -- reads and writes ------------------------------------------------------------------------

    def router(self) -> BM25Router:
        return BM25Router(self.index)

    def list(self, after: str | None = None, limit: int | None = None) -> list[ExpertInfo]:
        """Every expert in id order, or (``limit``) one page of them after id ``after``."""
        if limit is None:
            return self.bank.list() if after is None else self.bank.page(after, len(self.bank))
        return self.bank.page(after, limit)

    def info(self, expert_id: str) -> ExpertInfo:
        try:
            return self.bank.info(expert_id)
        except KeyError:
            raise BankError(f"no expert {expert_id!r} in the bank") from None

    def surrogate(self, expert_id: str) -> str:
        self.info(expert_id)
        return self.bank.surrogate(expert_id)

    def delete(self, expert_id: str) -> None:
        """Remove one expert: from the index first, then from the bank."""
        with self.lock:
            self.info(expert_id)
            self.index.delete(expert_id)
            self.bank.delete(expert_id)
            self.invalidate([expert_id])

    def delete_document(self, doc_id: str) -> DocumentChange:
        """Remove every expert of a document: from the index first, then (one transaction) the bank."""
        with self.lock:
            ids = self.bank.document_ids(doc_id)
            if not ids:
                raise BankError(f"no document {doc_id!r} in the bank")
            self.index.delete_many(ids)
            change = self.bank.delete_document(doc_id)
            self.invalidate(ids)
            return change

    def indexed(self, change: DocumentChange, staged: Sequence[Staged]) -> None:
        """Bring the index up to a document the bank just committed (one index commit)."""
        with self.lock, self.index.batch():
            self.index.delete_many(change.removed)
            self.index.add_many((s.id, str(s.row["surrogate"])) for s in staged)
        self.invalidate([*change.written, *change.removed])

    def __len__(self) -> int:
        return len(self.bank)

    def engine(self, lm: Any, trigger: TriggerPolicy) -> Engine:
        """A decode engine on ``lm`` whose router and experts come from this knowledge base."""
        adapter = ExpertAdapter(lm.model, self.bank.spec)
        return Engine(lm.model, lm.tokenizer, adapter, self.experts, self.router(), trigger)
