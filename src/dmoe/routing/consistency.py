"""Keeping a router index consistent with the expert bank: drift detection and repair.

The bank is the source of truth. Every indexed document records the sha256 of the surrogate text it
was built from, so comparing ``{expert_id: surrogate}`` from the bank with ``{expert_id: sha}`` from
the index finds every kind of drift an interrupted write can leave:

- ``missing``: in the bank, not in the index (crash after the bank wrote, before the index commit);
- ``extra``: in the index, not in the bank (crash after the index commit, before the bank deleted);
- ``stale``: in both, but the indexed text is not the bank's current surrogate (interrupted update).

``reconcile`` repairs all three in one index commit. It is cheap when nothing drifted (one dict
comparison), so the bank can run it every time it opens (``dmoe bank check`` prints the report).
A bank that already keeps each surrogate's ``text_hash`` can pass ``{id: hash}`` with
``hashed=True`` and a ``load_text`` callback, so only drifted surrogates are read.

How the bank should drive the index (write order chosen so the router never returns an id whose
expert file is gone; whatever a crash interrupts, the next ``reconcile`` repairs)::

    index = BM25Index.open_or_create(bank_dir / "router")
    reconcile(index, bank_surrogates)        # on open (and in `dmoe bank check`)
    # add / update:  write the expert file, then index.add(expert_id, surrogate)
    # delete:        index.delete(expert_id), then remove the expert file
    # bulk build:    with index.batch(): ... index.add(...) ...   (one commit)

This module knows nothing about BM25 or embeddings: it works on any ``ReconcilableIndex``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol


def text_hash(text: str) -> str:
    """sha256 (hex) of a surrogate text, as stored beside each indexed document."""
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


class ReconcilableIndex(Protocol):
    """What ``reconcile`` needs from an index (BM25 and dense indexes both provide it)."""

    def snapshot(self) -> dict[str, str]:
        """``{expert_id: text_hash}`` of every document currently indexed (committed)."""
        ...

    def add_many(self, items: Iterable[tuple[str, str]]) -> int:
        """Add or replace ``(expert_id, text)`` pairs; return how many were written."""
        ...

    def delete_many(self, expert_ids: Iterable[str]) -> int:
        """Remove these ids (unknown ids are ignored); return how many were requested."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """Group writes into one commit."""
        ...


@dataclass
class ReconcileReport:
    """What differed between the bank and the index, and whether it was repaired."""

    n_expected: int  # experts in the bank
    n_indexed: int  # documents in the index before repair
    missing: list[str] = field(default_factory=list)  # in bank, not indexed -> added
    extra: list[str] = field(default_factory=list)  # indexed, not in bank -> deleted
    stale: list[str] = field(default_factory=list)  # indexed text differs -> re-indexed
    repaired: bool = False  # False on a dry run or when nothing drifted

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.extra or self.stale)

    def to_dict(self, max_ids: int = 20) -> dict[str, object]:
        """JSON-friendly summary; id lists are cut to ``max_ids`` entries each."""
        return {
            "n_expected": self.n_expected,
            "n_indexed": self.n_indexed,
            "in_sync": self.in_sync,
            "repaired": self.repaired,
            "n_missing": len(self.missing),
            "n_extra": len(self.extra),
            "n_stale": len(self.stale),
            "missing": self.missing[:max_ids],
            "extra": self.extra[:max_ids],
            "stale": self.stale[:max_ids],
        }


def diff(
    index: ReconcilableIndex, expected: Mapping[str, str], *, hashed: bool = False
) -> ReconcileReport:
    """Compare the index with ``expected``; change nothing.

    ``expected`` is ``{expert_id: surrogate text}``, or ``{expert_id: text_hash(text)}`` when
    ``hashed`` is true.
    """
    indexed = index.snapshot()
    report = ReconcileReport(n_expected=len(expected), n_indexed=len(indexed))
    for expert_id, value in expected.items():
        sha = indexed.get(expert_id)
        if sha is None:
            report.missing.append(expert_id)
        elif sha != (value if hashed else text_hash(value)):
            report.stale.append(expert_id)
    report.extra = [i for i in indexed if i not in expected]
    report.missing.sort()
    report.stale.sort()
    report.extra.sort()
    return report


def reconcile(
    index: ReconcilableIndex,
    expected: Mapping[str, str],
    *,
    dry_run: bool = False,
    hashed: bool = False,
    load_text: Callable[[str], str] | None = None,
) -> ReconcileReport:
    """Make the index hold exactly ``expected``: add missing, delete extra, re-index stale.

    With ``hashed=True`` the values of ``expected`` are ``text_hash`` values and ``load_text(id)``
    supplies the surrogate of each id that must be (re-)indexed. All repairs go into one commit,
    so an interrupted reconcile leaves the index at its previous state and the next reconcile
    simply repeats the work.
    """
    if hashed and load_text is None and not dry_run:
        raise ValueError("reconcile(hashed=True) needs load_text= to fetch the texts to index")
    report = diff(index, expected, hashed=hashed)
    if dry_run or report.in_sync:
        return report
    get = load_text if hashed and load_text is not None else expected.__getitem__
    with index.batch():
        index.delete_many(report.extra)
        index.add_many((i, get(i)) for i in [*report.missing, *report.stale])
    report.repaired = True
    return report
