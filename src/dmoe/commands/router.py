"""``dmoe router``: build, inspect and query BM25 router indexes.

The expert bank keeps its own index in sync (``dmoe bank check``); these commands are for passage
corpora (the RAG baselines' retriever) and debugging routing. The benchmark is
``dmoe bench router``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dmoe.routing.factory import DEFAULT_TOP_K


def _read_jsonl(path: Path, id_field: str, text_field: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                yield str(rec[id_field]), str(rec[text_field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{n}: need a JSON object with {id_field!r} and {text_field!r} ({e})"
                ) from e


def cmd_index(args: argparse.Namespace) -> int:
    """Add/replace documents from a JSONL file; with --sync also delete ids not in the file."""
    from dmoe.routing.bm25 import BM25Index
    from dmoe.routing.consistency import reconcile

    docs = dict(_read_jsonl(Path(args.jsonl), args.id_field, args.text_field))
    with BM25Index.open_or_create(args.index, store_text=args.store_text) as index:
        if args.sync or args.dry_run:
            report = reconcile(index, docs, dry_run=args.dry_run)
            out: dict[str, Any] = report.to_dict()
        else:
            out = {"written": index.add_many(docs.items())}
        out["n_docs"] = len(index)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Print the top-k documents for a query."""
    from dmoe.routing.bm25 import BM25Index

    index = BM25Index.open(args.index, readonly=True)
    hits = index.search(args.query, args.k)
    if args.json:
        print(json.dumps([{"id": h.expert_id, "score": h.score} for h in hits]))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank}. {h.expert_id}\t{h.score:.4f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print an index's manifest and size."""
    from dmoe.routing.bm25 import BM25Index

    index = BM25Index.open(args.index, readonly=True)
    info = {**index.manifest, **index.stats()}
    print(json.dumps(info, indent=None if args.json else 2))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "router",
        help="BM25 router indexes: build, query, inspect, benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="router_command", metavar="SUBCOMMAND", required=True)

    ix = sub.add_parser(
        "index",
        help=cmd_index.__doc__,
        description=cmd_index.__doc__,
        epilog="example: dmoe router index ./passages.idx passages.jsonl --store-text",
    )
    ix.add_argument("index", help="index directory (created if missing)")
    ix.add_argument("jsonl", help="one JSON object per line with an id and a text")
    ix.add_argument("--id-field", default="id")
    ix.add_argument("--text-field", default="text")
    ix.add_argument("--store-text", action="store_true", help="also store texts (RAG passages)")
    ix.add_argument("--sync", action="store_true", help="make the index hold exactly the file")
    ix.add_argument("--dry-run", action="store_true", help="only report drift against the file")
    ix.add_argument("--json", action="store_true")
    ix.set_defaults(func=cmd_index)

    q = sub.add_parser(
        "query",
        help=cmd_query.__doc__,
        description=cmd_query.__doc__,
        epilog='example: dmoe router query ./passages.idx "who wrote Hamlet?" -k 3',
    )
    q.add_argument("index")
    q.add_argument("query")
    q.add_argument("-k", type=int, default=DEFAULT_TOP_K)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_query)

    info = sub.add_parser(
        "info",
        help=cmd_info.__doc__,
        description=cmd_info.__doc__,
        epilog="example: dmoe router info ./passages.idx --json",
    )
    info.add_argument("index")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

