"""``dmoe bench``: measurement commands that print what they measured (JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dmoe.commands.common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    from dmoe.experts.format import STORAGE_DTYPES

    p = sub.add_parser("bench", help="benchmarks (decode speed, …); --json for machine output",
                       description="Benchmarks on the real base model. Each prints its numbers "
                                   "and how it measured them.\n\nexample:\n  dmoe bench decode --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    d = bsub.add_parser("decode", help="engine vs HF generate; dmoe triggers vs no experts",
                        description="Decode tokens/s of the engine without experts, with DMoE "
                                    "triggers (random stored experts), and HF generate.\n\n"
                                    "example:\n  dmoe bench decode --json\n"
                                    "  dmoe bench decode --weights fp32,int8 --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(d, several_weights=True)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--repeats", type=int, default=3, help="measured rounds over the prompts")
    d.add_argument("--batch-sizes", default="1,4,8,16", type=_positive_ints,
                   help="batched arms (comma-separated sizes; '' = none)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=run_decode)
    r = bsub.add_parser("router", help="BM25 index query/add/delete latency at N experts",
                        description="Router latency on an index of N synthetic surrogates.\n\n"
                                    "example:\n  dmoe bench router --json\n"
                                    "  dmoe bench router --n 1000000 --json   # ~10 min, 3 GB RAM",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--n-experts", "--n", type=int, default=30_000, help="index size")
    r.add_argument("--n-queries", type=int, default=1000)
    r.add_argument("--n-writes", type=int, default=100, help="timed adds and deletes")
    r.add_argument("-k", type=int, default=3, help="experts per query")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--path", help="build the index here instead of a temporary directory")
    r.add_argument("--compare-bm25s", action="store_true", help="also time bm25s queries")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=run_router)
    k = bsub.add_parser("bank", help="bank open time, expert load latency and RSS at N experts",
                        description="A bank of N synthetic experts (SmolLM2-135M's shape) and one "
                                    "of --n-small, each opened and read by a fresh process the way "
                                    "`dmoe serve` does: open time, cold/warm expert load p50/p99, "
                                    "resident memory and its ratio between the two sizes. With "
                                    "--path the banks are kept and an interrupted build resumes."
                                    "\n\nexample:\n  dmoe bench bank --json\n"
                                    "  dmoe bench bank --n 100000 --path /data/bench-bank --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--n", type=int, default=100_000, help="experts in the big bank")
    k.add_argument("--n-small", type=int, default=1_000, help="experts in the small bank")
    k.add_argument("--n-loads", type=int, default=1_000, help="random experts loaded per probe")
    k.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES))
    k.add_argument("--doc-size", type=int, default=10, help="experts committed per document")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--path", help="keep the banks here (resumable) instead of a temporary dir")
    k.add_argument("--with-model", nargs="?", const="", default=None, metavar="SPEC",
                   help="each probe also loads the base model (default: the packaged one), as "
                        "a `dmoe serve` process does, and reports its RSS too")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=run_bank)
    rc = bsub.add_parser("recompute", help="experts on N layers: partial recompute vs re-prefill",
                         description="A trigger with experts on the last N layers: re-running only "
                                     "those layers from the stored residual stream (kv_policy "
                                     "partial) against a full re-prefill, on the real model.\n\n"
                                     "example:\n  dmoe bench recompute --json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rc.add_argument("--n-layers", default="2,4,8", type=_positive_ints,
                    help="expert layer counts (comma-separated)")
    rc.add_argument("--prompt-tokens", type=int, default=256)
    rc.add_argument("--repeats", type=int, default=5)
    rc.add_argument("--model", default=None)
    rc.add_argument("--json", action="store_true", help="print one JSON object")
    rc.set_defaults(func=run_recompute)
    b = bsub.add_parser("build", help="expert training fast vs reference; augmentation cost",
                        description="Training stage: fast batched path vs the PEFT reference on "
                                    "the same SQuAD units (s/expert, speedup, max weight diff, "
                                    "bytes/expert per dtype); augmentation: s/unit and QA JSON "
                                    "parse rate of the base model ('self' augmenter).\n\n"
                                    "example:\n  dmoe bench build --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--n-units", type=int, default=8, help="units trained by the fast path")
    b.add_argument("--n-reference", type=int, default=2, help="of which also by the reference")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--layers", type=int, default=1, metavar="N",
                   help="experts on the last N layers (N > 1: the multi-layer fast path)")
    b.add_argument("--augment-units", type=int, default=4,
                   help="units augmented by the base model (0 = skip the augmentation part)")
    b.add_argument("--model", default=None)
    b.add_argument("--mix", default="qa", choices=["qa", "passage+qa"],
                   help="examples per unit: PRAG's QA pairs, or the passage text first as well")
    b.add_argument("--head-vocab", type=int, default=0, metavar="K",
                   help="also time the candidate output head at this K against the full one, "
                        "with the experts' fit (0: not timed; dmoe.training.candidates)")
    b.add_argument("--executor", default=None, choices=["ray"],
                   help="instead: time `dmoe build` locally and on Ray over the same --n-units "
                        "paragraphs and compare their experts")
    b.add_argument("--address", default=None, help="ray: a running cluster (default: start one)")
    b.add_argument("--workers", type=int, default=None, help="ray: actors per stage")
    b.add_argument("--chunk-size", type=int, default=4, help="ray: experts per chunk (default 4)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=run_build)
    i = bsub.add_parser(
        "injection", help="do experts state their passage's (counterfactual) fact? vs base/RAG",
        description="Trains one expert per counterfactual passage (knowledge_conflicts dev items "
                    "300-399 by default) and answers their questions with base, RAG, DMoE (real "
                    "trigger and BM25 router, the shipped defaults) and DMoE with random experts; "
                    "plus unrelated questions for locality. See dmoe.bench.injection.\n\n"
                    "examples:\n  dmoe bench injection --json\n"
                    "  dmoe bench injection --n 40 --grid 'recipe=prag;recipe=recite_qa,lr=1e-2'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(i)
    i.add_argument("--n", type=int, default=100, help="counterfactual questions (default 100)")
    i.add_argument("--offset", type=int, default=300, help="first item (default 300: a dev slice)")
    i.add_argument("--n-unrelated", type=int, default=100, help="unrelated questions (locality)")
    i.add_argument("--unrelated-offset", type=int, default=400)
    i.add_argument("--max-new-tokens", type=int, default=32)
    i.add_argument("--grid", default="", help="settings separated by ';', each 'key=value,...' "
                   "over the shipped defaults (InjectionSetting fields)")
    i.add_argument("--out", help="also write the full result (with example answers) here")
    i.add_argument("--cache-dir", default=None,
                   help="keep the base and RAG answers here, keyed by model, slice and decoding, so a "
                        "rerun with other settings answers only the dmoe arms (default: none)")
    i.add_argument("--batch-size", type=int, default=8,
                   help="questions decoded together (the answers do not depend on it; default 8)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_injection)
    v = bsub.add_parser("serve", help="a real dmoe serve: serial vs concurrent throughput, "
                                      "latency idle and during a build",
                        description="Starts `dmoe serve` on loopback with a fresh bank and drives "
                                    "it with the OpenAI client: tokens/s serial vs concurrent, "
                                    "p50/p99 of short requests idle and while a build of SQuAD "
                                    "paragraphs runs, errors. Takes minutes (the build trains "
                                    "real experts).\n\nexample:\n  dmoe bench serve --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--model", default=None, help="model to serve (default: the packaged one)")
    v.add_argument("--requests", type=int, default=16, help="requests per throughput phase")
    v.add_argument("--max-tokens", type=int, default=32, help="max_tokens of those requests")
    v.add_argument("--concurrency", type=int, default=8, help="client threads, concurrent phase")
    v.add_argument("--probes", type=int, default=40, help="short requests per latency phase")
    v.add_argument("--build-docs", type=int, default=20, help="documents built during the "
                                                              "last phase")
    v.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_serve)
    f = bsub.add_parser("faults", help="kill -9 at every crash point, corrupt every file, fuzz "
                                       "the API; count what was lost",
                        description="On a tiny random model (no download): a build and a server "
                                    "knowledge job SIGKILLed at each seeded crash point, then "
                                    "restarted, checked (bank check --deep) and rerun; every "
                                    "kind of file corruption checked and repaired; N requests "
                                    "fuzzed from the OpenAPI schema. experts_lost must be 0, "
                                    "corruptions_detected = corruptions_tried, fuzz_5xx = 0.\n\n"
                                    "example:\n  dmoe bench faults --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--fuzz-cases", type=int, default=500, help="fuzzed requests (0 = none)")
    f.add_argument("--work", default=None, help="keep the banks here (default: a temporary dir)")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=run_faults)
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

    result = bench_router(args.n_experts, n_queries=args.n_queries, n_writes=args.n_writes,
                          k=args.k, seed=args.seed, path=args.path,
                          compare_bm25s=args.compare_bm25s, progress=True)
    _emit(result, args.json)
    return 0


def run_recompute(args: argparse.Namespace) -> int:
    from dmoe.bench.recompute import bench_recompute

    _emit(bench_recompute(args.model, args.n_layers, args.prompt_tokens, args.repeats), args.json)
    return 0


def run_bank(args: argparse.Namespace) -> int:
    from dmoe.bench.bank import bench_bank

    _emit(bench_bank(args.n, n_small=args.n_small, n_loads=args.n_loads, dtype=args.dtype,
                     doc_size=args.doc_size, seed=args.seed, path=args.path,
                     model=args.with_model), args.json)
    return 0


def run_build(args: argparse.Namespace) -> int:
    from dmoe.bench.build import bench_executors, bench_training

    if args.executor == "ray":
        _emit(bench_executors(args.n_units, args.chunk_size, args.workers, address=args.address,
                              model=args.model), args.json)
        return 0

    result = bench_training(args.n_units, epochs=args.epochs, mix=args.mix,
                            n_reference=args.n_reference, model=args.model, n_layers=args.layers,
                            head_vocab=args.head_vocab)
    if args.augment_units > 0:
        result.update(_bench_augment(args.augment_units, args.model))
    _emit(result, args.json)
    return 0


def _bench_augment(n_units: int, model: str | None) -> dict[str, Any]:
    """Augment the first ``n_units`` SQuAD paragraphs with the base model itself."""
    import json as _json

    from dmoe.augment import make_augmenter, measure_augmentation
    from dmoe.base_model import load_base_model
    from dmoe.corpus.units import KnowledgeUnit
    from dmoe.eval.datasets import data_dir

    squad = _json.loads((data_dir() / "squad/squad_dev_v1.1.json").read_text())
    units = [KnowledgeUnit(id=f"{a['title']}/0", text=a["paragraphs"][0]["context"],
                           title=a["title"]) for a in squad["data"][:n_units]]
    lm = load_base_model(model, training=True)  # augmentation is build work: float weights
    return measure_augmentation(units, make_augmenter("self", loaded=lm, batch_size=n_units))


def run_injection(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dmoe.base_model import load_base_model, training_weights
    from dmoe.bench.injection import InjectionSetting, run

    grid = [InjectionSetting().with_overrides(g) for g in args.grid.split(";")] if args.grid \
        else [InjectionSetting()]
    lm = load_base_model(args.model, args.device, args.weights)
    train_lm = lm if lm.can_train else load_base_model(
        args.model, args.device, training_weights(lm.weights, lm.device), training=True)
    result = run(lm, grid, train_lm=train_lm, n=args.n, offset=args.offset,
                 n_unrelated=args.n_unrelated, unrelated_offset=args.unrelated_offset,
                 max_new_tokens=args.max_new_tokens,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True),
                 cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                 batch_size=args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if len(grid) == 1:  # one setting: its numbers at the top level
        row = {k: v for k, v in result.pop("settings")[0].items()
               if k not in ("examples", "seconds")}  # top-level seconds: the whole run
        result = {**result, **row}
    _emit(result, args.json)
    return 0


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return sizes


def run_decode(args: argparse.Namespace) -> int:
    from dmoe.bench.decode import bench_decode

    _emit(bench_decode(args.model, args.device, args.max_new_tokens, args.repeats,
                       batch_sizes=args.batch_sizes, weights=args.weights), args.json)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from dmoe.bench.serve import bench_serve

    result = bench_serve(args.model, n_requests=args.requests, max_tokens=args.max_tokens,
                         concurrency=args.concurrency, n_probes=args.probes,
                         build_docs=args.build_docs, max_batch=args.max_batch)
    _emit(result, args.json)
    return 0 if result["errors"] == 0 else 1


def run_faults(args: argparse.Namespace) -> int:
    import logging
    import tempfile
    import warnings
    from pathlib import Path

    from dmoe.bench.faults import bench_faults

    warnings.filterwarnings("ignore")
    logging.getLogger("dmoe").setLevel(logging.CRITICAL)
    if args.work:
        result = bench_faults(Path(args.work), args.fuzz_cases)
    else:
        with tempfile.TemporaryDirectory(prefix="dmoe-faults-") as tmp:
            result = bench_faults(Path(tmp), args.fuzz_cases)
    _emit(result, args.json)
    return 0 if not result["failures"] and not result["fuzz_5xx"] else 1
