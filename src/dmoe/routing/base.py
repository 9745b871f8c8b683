"""The router interface the engine asks on a trigger, and how its query is formed.

A router maps a text query to the top-k expert ids with scores. It knows nothing about models or
tensors; the engine knows nothing about how a router ranks (BM25, dense, random, oracle).

Relevance gate. A router always returns its best k, relevant or not; ``gate_hits`` drops hits below
a minimum raw ``score`` and/or a minimum ``relevance`` (the score on a scale that is comparable
across queries, where the router has one: BM25 gives score / the query's maximum attainable score,
dense gives the cosine). Raw BM25 scores grow with query length (generated text makes queries
longer), the relative one does not, so ``min_relevance`` is the knob that transfers; see
``scripts/calibrate_router.py``. An empty result means "no relevant expert": the engine then runs
the base model (empty active set) until the next trigger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class RouteHit:
    """One routed expert."""

    expert_id: str
    score: float  # the router's raw score (BM25, cosine, ...), higher is better
    relevance: float | None = None  # score on a scale comparable across queries (<= 1), if any


@runtime_checkable
class Router(Protocol):
    """Anything with ``route(query, k) -> list[RouteHit]`` (best first, at most k)."""

    def route(self, query: str, k: int) -> list[RouteHit]: ...


def gate_hits(hits: Sequence[RouteHit], min_score: float = 0.0,
              min_relevance: float = 0.0) -> list[RouteHit]:
    """The hits with ``score >= min_score`` and ``relevance >= min_relevance`` (a hit without a
    relevance passes the second test); both thresholds 0 keep every hit of a BM25 router."""
    return [h for h in hits if h.score >= min_score
            and (h.relevance is None or h.relevance >= min_relevance)]


def build_query(task_input: str, generated: str, tokenizer: Any, max_tokens: int = 128) -> str:
    """Task input + text generated so far, truncated to its last ``max_tokens`` tokens."""
    text = f"{task_input} {generated}".strip() if generated else task_input.strip()
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return str(tokenizer.decode(ids[-max_tokens:], skip_special_tokens=True))


class FunctionRouter:
    """Adapts a plain callable ``(query, k) -> sequence of expert ids`` (tests, quick scripts)."""

    def __init__(self, fn: Callable[[str, int], Sequence[str]]) -> None:
        self.fn = fn
        self.queries: list[str] = []  # every query seen, for inspection in tests

    def route(self, query: str, k: int) -> list[RouteHit]:
        self.queries.append(query)
        ids = list(self.fn(query, k))[:k]
        return [RouteHit(expert_id=i, score=float(len(ids) - n)) for n, i in enumerate(ids)]
