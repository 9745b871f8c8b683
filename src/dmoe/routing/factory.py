"""``make_router(name, ...)``: one entry point for the paper's routing ablations.

==========  ===============================================================  ====================
name        what it ranks with                                               needs
==========  ===============================================================  ====================
``bm25``    BM25 over expert surrogates (default; the paper's Elasticsearch)  ``index`` or ``index_path``
``dense``   cosine of all-MiniLM-L6-v2 embeddings (the paper's SGPT arm)      ``surrogates``
``random``  k distinct experts, seeded per query                              ``expert_ids`` or ``surrogates``
``oracle``  the gold unit ids of the current example (evaluation only)        ``gold`` / ``set_gold``
==========  ===============================================================  ====================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dmoe.routing.base import Router

ROUTER_NAMES = ("bm25", "dense", "random", "oracle")
DEFAULT_ROUTER = "bm25"
DEFAULT_TOP_K = 3  # the paper's top-k


def make_router(
    name: str = DEFAULT_ROUTER,
    *,
    index: object | None = None,
    index_path: str | Path | None = None,
    surrogates: Mapping[str, str] | None = None,
    expert_ids: Sequence[str] | None = None,
    gold: Sequence[str] = (),
    seed: int = 0,
) -> Router:
    """Build the router called ``name``; see the module docstring for what each one needs.

    ``index`` is an already open ``BM25Index`` (or ``DenseIndex`` for ``dense``); ``index_path``
    opens a BM25 index read-only; ``surrogates`` is ``{expert_id: surrogate text}`` from the bank.
    """
    if name == "bm25":
        from dmoe.routing.bm25 import BM25Index, BM25Router

        if index is None:
            if index_path is None:
                raise ValueError("router 'bm25' needs index= (a BM25Index) or index_path=")
            index = BM25Index.open(index_path, readonly=True)
        if not isinstance(index, BM25Index):
            raise TypeError(f"router 'bm25' needs a BM25Index, got {type(index).__name__}")
        return BM25Router(index)
    if name == "dense":
        from dmoe.routing.dense import DenseEncoder, DenseIndex, DenseRouter

        if index is None:
            if surrogates is None:
                raise ValueError("router 'dense' needs index= (a DenseIndex) or surrogates=")
            index = DenseIndex(DenseEncoder())
            index.add_many(surrogates.items())
        if not isinstance(index, DenseIndex):
            raise TypeError(f"router 'dense' needs a DenseIndex, got {type(index).__name__}")
        return DenseRouter(index)
    if name == "random":
        from dmoe.routing.simple import RandomRouter

        ids = list(expert_ids) if expert_ids is not None else list(surrogates or {})
        if not ids:
            raise ValueError("router 'random' needs expert_ids= or surrogates= (got none)")
        return RandomRouter(ids, seed=seed)
    if name == "oracle":
        from dmoe.routing.simple import OracleRouter

        return OracleRouter(gold)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTER_NAMES)}")
