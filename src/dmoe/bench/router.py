"""Router benchmark: build a BM25 index of N synthetic expert surrogates, time queries and writes.

    python -m dmoe.bench.router --n-experts 30000 --json

What is measured (printed under ``"method"`` in the JSON):

- surrogates: synthetic English-like text, one per expert: 200 background words drawn from a Zipf
  law (exponent 1.0) over 33 English stop words + 100,000 pseudo-words, plus 50 draws from 8
  "topic" words of that expert (the entities a passage + paraphrase + QA pairs repeat): ~250 words,
  about the length of a passage + its paraphrase + 3 QA pairs;
- a query: 4 topic words of a random target expert + 86 background words (~90 words, roughly the
  128 base-model tokens of question + generated prefix that the engine sends); one query =
  ``BM25Router.route(text, k=3)`` end to end (analysis, query build, search, id lookup);
- add: ``index.add(id, text)`` of a new expert *including* commit, fsync and reader reload, so it
  is searchable when the call returns; delete: ``index.delete(id)`` the same way;
- ``index_bytes``: every file under the index directory after the run.

Write latencies are wall-clock; ``add_cpu_p50_ms`` / ``delete_cpu_p50_ms`` give the CPU time of
the same calls (all threads of this process), which is what they cost on an idle machine: on a
loaded machine a commit's hand-offs between tantivy's threads wait for CPU, and
``load_avg_1m_at_start`` says how loaded it was.

``query_p50_ms`` is measured on the freshly built index; ``query_after_writes_p50_ms`` again after
the single-document commits (more, smaller segments until tantivy merges them). A query scores at
most ``max_query_postings`` postings (``BM25Index.search``); ``query_exact_p50_ms`` times the same
queries with every term scored, and ``top1_same_as_exact`` / ``topk_same_as_exact`` say how often
the budget changed the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dmoe.routing.bm25 import MAX_QUERY_POSTINGS, BM25Index, BM25Router

STOP_WORDS = [
    "a",
    "an",
    "and",
    "are",
    "as",
    "at",
    "be",
    "but",
    "by",
    "for",
    "if",
    "in",
    "into",
    "is",
    "it",
    "no",
    "not",
    "of",
    "on",
    "or",
    "such",
    "that",
    "the",
    "their",
    "then",
    "there",
    "these",
    "they",
    "this",
    "to",
    "was",
    "will",
    "with",
]
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "to",
    "vi",
    "ze",
    "bo",
    "da",
    "fe",
    "gu",
    "hi",
    "jo",
    "ku",
    "la",
    "me",
    "no",
    "pa",
    "qui",
    "re",
    "si",
    "tu",
    "ve",
    "wa",
    "xe",
    "yo",
    "zu",
    "bra",
    "cre",
    "dri",
    "fro",
    "glu",
    "pla",
    "stri",
    "tha",
]


def _vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        n = int(rng.integers(2, 5))
        words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n)))
    return STOP_WORDS + sorted(words)


def expert_id(i: int) -> str:
    """The id of synthetic expert ``i``."""
    return f"exp-{i:06d}"


class SyntheticCorpus:
    """Zipf background text + per-expert topic words (see the module docstring)."""

    def __init__(self, n_experts: int, seed: int = 0, vocab_size: int = 100_000) -> None:
        self.rng = np.random.default_rng(seed)
        self.vocab = np.array(_vocabulary(vocab_size, self.rng))
        weights = 1.0 / np.arange(1, len(self.vocab) + 1)
        self.cdf = np.cumsum(weights) / weights.sum()
        tail = np.arange(len(self.vocab) // 10, len(self.vocab))  # topic words: rarer 90%
        self.topics = self.rng.choice(tail, size=(n_experts, 8))  # (n, 8) word ids
        self.ids = [expert_id(i) for i in range(n_experts)]

    def background(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.random(n))

    def surrogate(self, i: int) -> str:
        words = np.concatenate([self.background(200), self.rng.choice(self.topics[i], 50)])
        self.rng.shuffle(words)
        return " ".join(self.vocab[words])

    def query(self) -> tuple[str, str]:
        """(query text, id of the expert it was drawn from)."""
        i = int(self.rng.integers(len(self.ids)))
        words = np.concatenate(
            [self.rng.choice(self.topics[i], 4, replace=False), self.background(86)]
        )
        return " ".join(self.vocab[words]), self.ids[i]


def _ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(samples) * 1000.0, q)), 3)


def _time_queries(route: Any, queries: list[tuple[str, str]], k: int) -> tuple[list[float], float]:
    times, hits = [], 0
    for text, target in queries:
        t0 = time.perf_counter()
        result = route(text, k)
        times.append(time.perf_counter() - t0)
        hits += bool(result) and result[0].expert_id == target
    return times, hits / max(len(queries), 1)


def _budget_effect(index: BM25Index, queries: list[tuple[str, str]], k: int) -> dict[str, Any]:
    """The query budget against exact BM25 on the same queries: latency of both, how often the
    budget dropped terms, and whether the top-1 / top-k came out the same."""
    exact_times, same_top1, same_topk, pruned = [], 0, 0, 0
    for text, _ in queries:
        fast = [h.expert_id for h in index.search(text, k)]
        t0 = time.perf_counter()
        exact = [h.expert_id for h in index.search(text, k, max_postings=None)]
        exact_times.append(time.perf_counter() - t0)
        same_top1 += fast[:1] == exact[:1]
        same_topk += fast == exact
        pruned += index.scored_terms(text) != index.scored_terms(text, max_postings=None)
    n = max(len(queries), 1)
    return {
        "query_exact_p50_ms": _ms(exact_times, 50),
        "query_exact_p99_ms": _ms(exact_times, 99),
        "budget_binds_fraction": round(pruned / n, 4),
        "top1_same_as_exact": round(same_top1 / n, 4),
        "topk_same_as_exact": round(same_topk / n, 4),
    }


def _bm25s_query_ms(texts: list[str], queries: list[tuple[str, str]], k: int) -> dict[str, Any]:
    """bm25s (static, in-memory, rebuild on change) on the same corpus: query latency only."""
    try:
        import bm25s
    except ImportError:
        return {"error": "bm25s not installed"}
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    build_s = time.perf_counter() - t0
    times = []
    for text, _ in queries:
        t0 = time.perf_counter()
        tokens = bm25s.tokenize([text], stopwords="en", show_progress=False)
        retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        times.append(time.perf_counter() - t0)
    return {
        "query_p50_ms": _ms(times, 50),
        "query_p99_ms": _ms(times, 99),
        "build_s": round(build_s, 2),
    }


def _surrogates(
    corpus: SyntheticCorpus, keep: list[str] | None, progress: bool
) -> Iterator[tuple[str, str]]:
    """(id, surrogate) of every expert, generated as the index takes them (a million surrogates
    are ~1.7 GB of text); ``keep`` collects them when bm25s needs them too."""
    ids = tqdm(corpus.ids, desc="index", unit="doc", disable=not progress, mininterval=2)
    for i, expert_id in enumerate(ids):
        text = corpus.surrogate(i)
        if keep is not None:
            keep.append(text)
        yield expert_id, text


def bench_router(
    n_experts: int = 30_000,
    *,
    n_queries: int = 1000,
    n_writes: int = 100,
    k: int = 3,
    seed: int = 0,
    path: str | Path | None = None,
    compare_bm25s: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build an index of ``n_experts`` synthetic surrogates and time queries, adds and deletes.

    ``path``: where to build the index (default: a temporary directory, removed afterwards).
    Returns one JSON-friendly dict; the keys the issue asks for are at the top level.
    """
    if n_experts <= 0 or n_queries <= 0 or n_writes <= 0:
        raise ValueError(f"counts must be > 0, got {n_experts=}, {n_queries=}, {n_writes=}")
    tmp = None if path is not None else tempfile.mkdtemp(prefix="dmoe-bench-router-")
    root = Path(path if path is not None else tmp)  # type: ignore[arg-type]
    load_1m = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    try:
        corpus = SyntheticCorpus(n_experts, seed=seed)
        texts: list[str] | None = [] if compare_bm25s else None
        index = BM25Index.create(root / "index")
        t0 = time.perf_counter()
        index.add_many(_surrogates(corpus, texts, progress))
        build_s = time.perf_counter() - t0
        router = BM25Router(index)
        queries = [corpus.query() for _ in range(n_queries)]
        _time_queries(router.route, queries[:50], k)  # warm-up
        q_times, hit_at_1 = _time_queries(router.route, queries, k)
        budget = _budget_effect(index, queries[: min(300, n_queries)], k)

        new = [
            (f"new-{i:05d}", corpus.surrogate(int(corpus.rng.integers(n_experts))))
            for i in range(n_writes)
        ]
        add_times, del_times, add_cpu, del_cpu = [], [], [], []
        for expert_id, text in new:
            t0, c0 = time.perf_counter(), time.process_time()
            index.add(expert_id, text)
            add_times.append(time.perf_counter() - t0)
            add_cpu.append(time.process_time() - c0)
        assert len(index) == n_experts + n_writes, "adds not visible"
        q2_times, _ = _time_queries(router.route, queries[: min(300, n_queries)], k)
        for expert_id, _ in new:
            t0, c0 = time.perf_counter(), time.process_time()
            index.delete(expert_id)
            del_times.append(time.perf_counter() - t0)
            del_cpu.append(time.process_time() - c0)
        assert len(index) == n_experts, "deletes not visible"
        stats = index.stats()
        index.close()
        result: dict[str, Any] = {
            "n_experts": n_experts,
            "query_p50_ms": _ms(q_times, 50),
            "query_p99_ms": _ms(q_times, 99),
            "add_p50_ms": _ms(add_times, 50),
            "delete_p50_ms": _ms(del_times, 50),
            "index_bytes": sum(
                p.stat().st_size for p in (root / "index").rglob("*") if p.is_file()
            ),
            "add_p99_ms": _ms(add_times, 99),
            "add_cpu_p50_ms": _ms(add_cpu, 50),
            "delete_cpu_p50_ms": _ms(del_cpu, 50),
            "delete_p99_ms": _ms(del_times, 99),
            "query_after_writes_p50_ms": _ms(q2_times, 50),
            "max_query_postings": MAX_QUERY_POSTINGS,
            **budget,
            "build_s": round(build_s, 2),
            "hit_at_1": round(hit_at_1, 4),
            "n_segments": stats["n_segments"],
            "engine": "tantivy",
            "load_avg_1m_at_start": load_1m,
            "method": {
                "n_queries": n_queries,
                "n_writes": n_writes,
                "k": k,
                "seed": seed,
                "query": "4 topic words of a target expert + 86 Zipf words (~90 words); route() end to end",
                "query_exact": "the same queries with no postings budget (every term scored), "
                "on the first 300; budget_binds_fraction: how often the budget dropped terms",
                "surrogate": "200 Zipf words (33 stop words + 100k pseudo-words) + 50 draws of 8 topic words",
                "add": "add one new expert + commit + reader reload (durable and searchable on return)",
                "delete": "delete one expert + commit + reader reload",
            },
        }
        if texts is not None:
            result["bm25s"] = _bm25s_query_ms(texts, queries, k)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmoe.bench.router",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n-experts", "--n", type=int, default=30_000)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--n-writes", type=int, default=100)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", help="build the index here instead of a temporary directory")
    parser.add_argument("--compare-bm25s", action="store_true", help="also time bm25s queries")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = bench_router(
        args.n_experts,
        n_queries=args.n_queries,
        n_writes=args.n_writes,
        k=args.k,
        seed=args.seed,
        path=args.path,
        compare_bm25s=args.compare_bm25s,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
