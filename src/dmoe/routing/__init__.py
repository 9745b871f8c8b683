"""Routing: which experts a query activates (BM25 by default), and keeping the index in sync."""

from dmoe.routing.base import FunctionRouter, RouteHit, Router, build_query
from dmoe.routing.consistency import ReconcileReport, diff, reconcile, text_hash
from dmoe.routing.factory import DEFAULT_ROUTER, DEFAULT_TOP_K, ROUTER_NAMES, make_router

__all__ = [
    "DEFAULT_ROUTER",
    "DEFAULT_TOP_K",
    "ROUTER_NAMES",
    "FunctionRouter",
    "ReconcileReport",
    "RouteHit",
    "Router",
    "build_query",
    "diff",
    "make_router",
    "reconcile",
    "text_hash",
]
