"""Control and ablation routers: ``random`` (seeded), ``shuffled`` (a real router's hits sent to
the wrong experts) and ``oracle`` (gold ids).

Both answer the ``Router`` protocol. Neither knows about indexes or models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any

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


class ShuffledRouter:
    """Another router's hits, each expert id replaced by its image under a seeded derangement.

    The control for "is it the knowledge or just any expert?": the same triggers, the same number
    of experts, the same scores (so the same relevance gate and composition weights) as the real
    router, but every routed expert is some *other* unit's. Ids the derangement does not know
    pass through unchanged.
    """

    name = "shuffled"

    def __init__(self, inner: Any, expert_ids: Iterable[str], seed: int = 0) -> None:
        ids = sorted(set(expert_ids))
        rng = random.Random(seed)
        shift = list(range(len(ids)))
        rng.shuffle(shift)  # a random cycle through all ids: nobody maps to itself (n >= 2)
        self.mapping = {ids[shift[i]]: ids[shift[(i + 1) % len(ids)]] for i in range(len(ids))}
        self.inner = inner

    def route(self, query: str, k: int) -> list[RouteHit]:
        return [dataclasses.replace(h, expert_id=self.mapping.get(h.expert_id, h.expert_id))
                for h in self.inner.route(query, k)]


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
