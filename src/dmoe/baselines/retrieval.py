"""Passage retrieval for the non-parametric methods: the project's BM25 over a task's corpus.

The same ``BM25Index`` the DMoE router uses, built in memory over ``title + text`` of each unit, so
RAG, FLARE and PRAG retrieve exactly what a BM25 router over the same corpus would route to.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmoe.corpus.units import KnowledgeUnit
from dmoe.routing.base import RouteHit
from dmoe.routing.bm25 import BM25Index


def unit_search_text(unit: KnowledgeUnit) -> str:
    """What BM25 indexes for a unit (title + passage)."""
    return f"{unit.title}\n{unit.text}" if unit.title else unit.text


def passage_text(unit: KnowledgeUnit) -> str:
    """How a unit reads inside a prompt (title, colon, passage)."""
    return f"{unit.title}: {unit.text}" if unit.title else unit.text


class PassageRetriever:
    """BM25 top-k units for a query; also a ``Router`` (``route``) over unit ids."""

    def __init__(self, units: Sequence[KnowledgeUnit], index: BM25Index | None = None) -> None:
        self.units = {u.id: u for u in units}
        if index is None:
            index = BM25Index.in_memory()
            index.add_many((u.id, unit_search_text(u)) for u in self.units.values())
        self.index = index

    def route(self, query: str, k: int) -> list[RouteHit]:
        return self.index.search(query, k)

    def retrieve(self, query: str, k: int) -> list[KnowledgeUnit]:
        return [self.units[h.expert_id] for h in self.index.search(query, k) if h.expert_id in self.units]

    def close(self) -> None:
        self.index.close()
