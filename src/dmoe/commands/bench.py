"""``dmoe bench``: measurement commands that print what they measured (JSON with --json)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dmoe.commands.common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (decode speed, …); --json for machine output",
                       description="Benchmarks on the real base model. Each prints its numbers "
                                   "and how it measured them.\n\nexample:\n  dmoe bench decode --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    d = bsub.add_parser("decode", help="engine vs HF generate; dmoe triggers vs no experts",
                        description="Decode tokens/s of the engine without experts, with DMoE "
                                    "triggers (random stored experts), and HF generate.\n\n"
                                    "example:\n  dmoe bench decode --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(d)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--repeats", type=int, default=3, help="measured rounds over the prompts")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_decode)
    r = bsub.add_parser("router", help="BM25 index query/add/delete latency at N experts",
                        description="Router latency on an index of N synthetic surrogates.\n\n"
                                    "example:\n  dmoe bench router --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--n-experts", type=int, default=30_000)
    r.add_argument("--n-queries", type=int, default=1000)
    r.add_argument("--compare-bm25s", action="store_true", help="also time bm25s queries")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=run_router)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


def run_router(args: argparse.Namespace) -> int:
    from dmoe.bench.router import bench_router

    result = bench_router(args.n_experts, n_queries=args.n_queries,
                          compare_bm25s=args.compare_bm25s)
    _emit(result, args.json)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from dmoe.bench.decode import bench_decode

    _emit(bench_decode(args.model, args.device, args.max_new_tokens, args.repeats), args.json)
    return 0
