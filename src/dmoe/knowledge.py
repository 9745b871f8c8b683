"""A knowledge base = an expert bank + the BM25 index over its surrogates, kept consistent.

Layout: the bank directory (see ``dmoe.experts.bank``) with the router index inside it::

    BANK/
      bank.json  bank.sqlite  experts/      # the expert bank
      index/     router.json  tantivy/      # BM25 over each expert's surrogate text

The bank is the source of truth. Write order keeps the router from ever naming a missing expert:
add = bank first, then index; delete = index first, then bank. A crash between the two leaves drift
that ``sync()`` repairs (run on every open: ~0.1 s at 30k experts) and ``check()`` reports.

This module knows nothing about training or decoding; ``dmoe.training.build`` fills it, the engine reads it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.engine.decode import Engine
from dmoe.engine.triggers import TriggerPolicy
from dmoe.errors import BankError
from dmoe.experts.bank import BankReport, ExpertBank, ExpertInfo
from dmoe.experts.cache import ExpertCache
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.routing.bm25 import BM25Index, BM25Router
from dmoe.routing.consistency import ReconcileReport, reconcile

INDEX_DIR = "index"


@dataclass
class CheckReport:
    """Drift between files, rows and the index (what ``check`` found or ``repair`` fixed)."""

    bank: BankReport = field(default_factory=BankReport)
    index: ReconcileReport | None = None
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return self.bank.ok and (self.index is None or self.index.in_sync)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "repaired": self.repaired,
                "bank": {"orphan_files": self.bank.orphan_files,
                         "missing_files": self.bank.missing_files,
                         "temp_files": self.bank.temp_files},
                "index": self.index.to_dict() if self.index is not None else None}


class KnowledgeBase:
    """Expert bank + router index. Thread-safe for one writer and many readers in one process."""

    def __init__(self, bank: ExpertBank, index: BM25Index, cache_capacity: int = 64) -> None:
        self.bank = bank
        self.index = index
        self.experts = ExpertCache(bank.get, capacity=cache_capacity)  # ids -> [Expert], bounded
        self.lock = threading.RLock()  # serialises writes; readers go through bank/index directly

    @classmethod
    def open(cls, path: str | Path, expected_fingerprint: str | None = None,
             cache_capacity: int = 64, sync: bool = True) -> KnowledgeBase:
        """Open an existing knowledge base, repairing bank/index drift from an interrupted write
        (``sync=False`` leaves the drift in place, for ``check`` to report it)."""
        path = Path(path)
        if not (path / "bank.json").is_file():
            raise BankError(f"{path} is not an expert bank (no bank.json); build one with "
                            f"`dmoe build CORPUS --bank {path}`")
        bank = ExpertBank.open(path, expected_fingerprint)
        kb = cls(bank, BM25Index.open_or_create(path / INDEX_DIR), cache_capacity)
        if sync:
            kb.sync()
        return kb

    @classmethod
    def open_or_create(cls, path: str | Path, fingerprint: str, model_name: str, spec: LoraSpec,
                       dtype: str = "float32", cache_capacity: int = 64) -> KnowledgeBase:
        bank = ExpertBank.open_or_create(path, fingerprint, model_name, spec, dtype)
        kb = cls(bank, BM25Index.open_or_create(Path(path) / INDEX_DIR), cache_capacity)
        kb.sync()
        return kb

    def close(self) -> None:
        self.index.close()
        self.bank.close()

    # -- consistency ---------------------------------------------------------------------------

    def sync(self) -> ReconcileReport:
        """Make the index hold exactly the bank's experts with their current surrogates."""
        with self.lock:
            return reconcile(self.index, self.bank.surrogates())

    def check(self, repair: bool = False) -> CheckReport:
        """Report (and with ``repair`` fix) orphan files, missing files and index drift."""
        with self.lock:
            bank_report = self.bank.repair() if repair else self.bank.check()
            index_report = reconcile(self.index, self.bank.surrogates(), dry_run=not repair)
            if repair:
                self.experts.invalidate()
            return CheckReport(bank=bank_report, index=index_report, repaired=repair)

    # -- reads and single-expert writes ----------------------------------------------------------

    def router(self) -> BM25Router:
        return BM25Router(self.index)

    def list(self) -> list[ExpertInfo]:
        return self.bank.list()

    def info(self, expert_id: str) -> ExpertInfo:
        if not self.bank.exists(expert_id):
            raise BankError(f"no expert {expert_id!r} in {self.bank.path}")
        return self.bank.info(expert_id)

    def surrogate(self, expert_id: str) -> str:
        self.info(expert_id)
        return self.bank.surrogate(expert_id)

    def delete(self, expert_id: str) -> None:
        """Remove one expert: from the index first, then from the bank."""
        with self.lock:
            self.info(expert_id)
            self.index.delete(expert_id)
            self.bank.delete(expert_id)
            self.experts.invalidate(expert_id)

    def __len__(self) -> int:
        return len(self.bank)

    def engine(self, lm: Any, trigger: TriggerPolicy) -> Engine:
        """A decode engine on ``lm`` whose router and experts come from this knowledge base."""
        adapter = ExpertAdapter(lm.model, self.bank.spec)
        return Engine(lm.model, lm.tokenizer, adapter, self.experts, self.router(), trigger)
