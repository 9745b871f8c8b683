"""``dmoe eval``: every method on real benchmarks; resumable per-sample results and tables."""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from dmoe.commands.common import add_model_args

EXAMPLE = """example:
  dmoe eval --methods base,rag,flare --datasets squad,strategyqa --limit 300 --out results/run1
  dmoe eval --methods dmoe,prag --experts BANK_DIR --datasets knowledge_conflicts --out results/run1
  dmoe eval --methods sft_lora,poly_prag --sft-lora SFT.safetensors --poly POLY_DIR --out run2
  dmoe eval --report-only --out results/run1      # rebuild summary.json / tables.md / plot
  dmoe eval --merge OUT-0 OUT-1 --out results/run1  # put --shard workers' answers together

Re-running the same command resumes: finished samples (by id) are not recomputed."""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _shard(value: str) -> tuple[int, int]:
    from dmoe.eval.runner import parse_shard

    try:
        return parse_shard(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def register(sub: argparse._SubParsersAction) -> None:
    from dmoe.baselines.protocol import METHOD_NAMES
    from dmoe.eval.datasets import DEFAULT_LIMIT, LOADERS

    p = sub.add_parser("eval", help="evaluate methods on benchmarks (quality + efficiency tables)",
                       description=__doc__ + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=_csv, default=["base", "rag"],
                   help=f"comma-separated, from {','.join(METHOD_NAMES)} (default base,rag)")
    p.add_argument("--datasets", type=_csv, default=["squad"],
                   help=f"comma-separated, from {','.join(LOADERS)} (default squad)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"questions per dataset (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    p.add_argument("--corpus-scope", default="full", choices=["full", "gold"],
                   help="full: each dataset's corpus (default); gold: only the units holding the "
                        "selected questions' answers (cheap dev banks, no distractors; say so)")
    p.add_argument("--shard", default=None, type=_shard, metavar="K/N",
                   help="answer only samples K, K+N, K+2N, ... of the selection (0 <= K < N), with "
                        "the whole selection's corpus; for parallel workers, each with its own "
                        "--out (then --merge them into one)")
    p.add_argument("--batch-size", type=_positive, default=1, metavar="B",
                   help="answer B questions per batch with every method that decodes one greedy "
                        "generation (all but flare); same answers as B = 1 (except with --weights "
                        "int8, whose rows share an activation scale), latency_s = batch time / B "
                        "(default: 1)")
    p.add_argument("--out", required=True, type=Path, help="results directory (created/resumed)")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder (default $DMOE_DATA_DIR or ../shared/data)")
    p.add_argument("--bank", default=None, type=Path, metavar="DIR",
                   help="expert bank (dmoe.experts.bank) for dmoe, prag, prag_combine; dmoe routes "
                        "with BM25 over its surrogates, prag maps retrieved units to their experts")
    p.add_argument("--experts", default=None, type=Path, metavar="DIR",
                   help="folder of {unit_id}.safetensors experts (dmoe, prag, prag_combine)")
    p.add_argument("--router-index", default=None, type=Path, metavar="PATH",
                   help="BM25 index over expert surrogates for dmoe (default: BM25 over the "
                        "task corpus)")
    p.add_argument("--sft-lora", default=None, type=Path, metavar="FILE",
                   help="one corpus-wide LoRA expert file (sft_lora); train it with "
                        "scripts/build_eval_bank.py --sft-lora FILE")
    p.add_argument("--poly", default=None, type=Path, metavar="DIR",
                   help="Poly-PRAG folder: latent LoRA pool + per-unit routing (poly_prag); train "
                        "it with scripts/build_eval_bank.py --poly DIR")
    p.add_argument("--poly-top-k", default=None, type=int, metavar="K",
                   help="keep each passage's K largest pool weights, renormalised (default: all, "
                        "the dense mix it was trained with)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="method knob, repeatable (e.g. --set tau=1.5 --set flare_threshold=0.4); "
                        "see MethodConfig")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary files")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="append these results directories (e.g. --shard workers' --out) to --out, "
                        "records not already there, then rebuild the summary files (no model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmoe.baselines.protocol import METHOD_NAMES, MethodConfig
    from dmoe.eval.datasets import LOADERS
    from dmoe.eval.report import quality_table, write_report

    for m in args.methods:
        if m not in METHOD_NAMES:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}")
    for d in args.datasets:
        if d not in LOADERS:
            raise ValueError(f"unknown dataset {d!r}; choose from {', '.join(LOADERS)}")
    config = MethodConfig().with_overrides(args.overrides)
    if args.merge:
        from dmoe.eval.runner import merge_results

        added = merge_results(args.merge, args.out)
        print(f"merged into {args.out}: " + (", ".join(f"{k} +{n}" for k, n in added.items())
                                               or "nothing new"))
    elif not args.report_only:
        _evaluate(args, config)
    summary = write_report(args.out)
    print(quality_table(summary))
    print(f"wrote {args.out}/summary.json, tables.md, quality_vs_latency.png")
    return 0


def load_resources(args: argparse.Namespace, config: object) -> tuple[Any, Any]:
    """The base model and every artefact the arguments name (``--bank``, ``--experts``, ...), as
    ``(LoadedModel, Resources)``; shared by ``dmoe eval`` and ``dmoe ablate``."""
    from dmoe.base_model import load_base_model
    from dmoe.baselines.protocol import MethodConfig
    from dmoe.baselines.registry import Resources
    from dmoe.eval.runner import check_weights
    from dmoe.experts.bank import expert_layers
    from dmoe.experts.lora import ExpertAdapter, LoraSpec

    assert isinstance(config, MethodConfig)
    layers = expert_layers(args.bank)  # the bank's experts sit on this many top MLPs
    lm = load_base_model(args.model, args.device, args.weights,
                         float_mlps=max(layers, getattr(args, "float_mlps", 1)))
    check_weights(args.out, lm.weights)
    res = Resources(lm.model, lm.tokenizer, ExpertAdapter(lm.model, LoraSpec(n_layers=layers)),
                    config)
    if args.experts is not None:
        from dmoe.experts.cache import ExpertCache, directory_loader

        if not args.experts.is_dir():
            raise FileNotFoundError(f"expert folder not found: {args.experts}")
        res.load_experts = ExpertCache(directory_loader(args.experts, lm.fingerprint), capacity=64)
    if args.bank is not None:
        _attach_bank(res, args.bank, lm.fingerprint)
    if args.router_index is not None:
        from dmoe.routing.factory import make_router

        res.router = make_router("bm25", index_path=args.router_index)
    if args.sft_lora is not None:
        from dmoe.experts.format import load_expert

        res.sft_lora = load_expert(args.sft_lora, expected_fingerprint=lm.fingerprint)
    if args.poly is not None:
        from dmoe.experts.poly_format import load_poly

        res.poly_pool, res.poly_routing = load_poly(args.poly, lm.fingerprint, args.poly_top_k)
    _warm_up(res)
    return lm, res


def _evaluate(args: argparse.Namespace, config: object) -> None:
    from dataclasses import asdict

    from dmoe.baselines.registry import build_method
    from dmoe.baselines.retrieval import PassageRetriever
    from dmoe.eval.datasets import load_task
    from dmoe.eval.runner import log_invocation, run_task, shard

    lm, res = load_resources(args, config)
    log_invocation(args.out, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
        "methods": args.methods, "datasets": args.datasets, "limit": args.limit,
        "offset": args.offset, "shard": args.shard, "batch_size": args.batch_size, "config": asdict(res.config), "model": str(lm.source.path),
        "weights": lm.weights,
        "device": str(lm.device), "platform": platform.platform()})
    for name in args.datasets:
        task = load_task(name, args.data_dir, offset=args.offset, limit=args.limit or None,
                         corpus_scope=args.corpus_scope)
        if args.shard is not None:
            task.samples = shard(task.samples, *args.shard)
        retriever = PassageRetriever(task.corpus)
        try:
            build = functools.partial(build_method, res=res, retriever=retriever)
            ran = run_task(task, args.methods, build, args.out, progress=not args.no_progress,
                           batch_size=args.batch_size)
        finally:
            retriever.close()
        print(json.dumps({"dataset": name, "computed": ran}), file=sys.stderr)


def _attach_bank(res: object, path: Path, fingerprint: str) -> None:
    from dmoe.baselines.registry import Resources, attach_bank
    from dmoe.experts.bank import ExpertBank

    assert isinstance(res, Resources)
    attach_bank(res, ExpertBank.open(path, expected_fingerprint=fingerprint, readonly=True))

def _warm_up(res: object) -> None:
    """One untimed generation so the first recorded sample does not pay one-time start-up costs."""
    from dmoe.baselines.methods import BaseMethod
    from dmoe.baselines.registry import Resources
    from dmoe.eval.datasets import Sample

    assert isinstance(res, Resources)
    method = BaseMethod(res.model, res.tokenizer, res.adapter, res.config)
    try:
        method.answer(Sample("warm-up", "What is the capital of France?", ("Paris",)))
    finally:
        method.close()
