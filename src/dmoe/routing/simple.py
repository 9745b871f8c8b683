"""Ablation routers that ignore text relevance: ``random`` (seeded) and ``oracle`` (gold ids).

Both answer the ``Router`` protocol. Neither knows about indexes or models.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

from dmoe.routing.base import RouteHit


class RandomRouter:
    """k distinct experts drawn uniformly at random.

    Deterministic per (seed, query): the same query always gets the same experts, whatever order
    the queries come in, so runs are reproducible and resumable. Scores are all 0.0.
    """

    name = "random"

    def __init__(self, expert_ids: Iterable[str], seed: int = 0) -> None:
        self.expert_ids = sorted(set(expert_ids))  # sorted: independent of the bank's order
        self.seed = seed

    def route(self, query: str, k: int) -> list[RouteHit]:
        if k <= 0 or not self.expert_ids:
            return []
        text = query if isinstance(query, str) else ""
        key = f"{self.seed}\0{text}".encode("utf-8", errors="replace")
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        chosen = rng.sample(self.expert_ids, min(k, len(self.expert_ids)))
        return [RouteHit(expert_id=i, score=0.0) for i in chosen]


class OracleRouter:
    """Returns the gold unit ids of the current example (evaluation only: it cheats by design).

    The evaluator calls ``set_gold(ids)`` before decoding each example; every trigger during that
    example then routes to those ids, best (first given) first, with scores 1.0. With no gold set
    it returns ``[]`` (the model decodes without experts).
    """

    name = "oracle"

    def __init__(self, gold: Sequence[str] = ()) -> None:
        self.gold: list[str] = list(gold)

    def set_gold(self, ids: Sequence[str]) -> None:
        self.gold = list(dict.fromkeys(ids))  # de-duplicated, order kept

    def route(self, query: str, k: int) -> list[RouteHit]:
        return [RouteHit(expert_id=i, score=1.0) for i in self.gold[: max(k, 0)]]
