"""``dmoe build``: turn a corpus into an expert bank (+ router index)."""

from __future__ import annotations

import argparse
import json
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from dmoe.commands.common import add_model_args

if TYPE_CHECKING:
    from dmoe.training.experts import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    from dmoe.experts.format import STORAGE_DTYPES

    p = sub.add_parser(
        "build", help="corpus -> augmentation -> one expert per unit -> bank + router index",
        description="Build (or extend, resumably) an expert bank from a corpus: JSONL (id, text, "
                    "title), DPR TSV (id, text, title) or a folder of .txt/.md files.\n"
                    "Rerunning skips units already trained with the same settings.\n\n"
                    "example:\n  dmoe build examples/demo_corpus.jsonl --bank runs/demo-bank",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="corpus file or folder")
    p.add_argument("--bank", required=True, help="bank directory (created if missing)")
    add_model_args(p)
    u = p.add_argument_group("knowledge units and augmentation")
    u.add_argument("--granularity", default="passage", choices=["passage", "document", "cluster"])
    u.add_argument("--passage-words", type=int, default=100, help="words per passage unit")
    u.add_argument("--cluster-size", type=int, default=3, help="passages per cluster unit")
    u.add_argument("--augmenter", default="extractive",
                   choices=["extractive", "none", "spans", "self", "openai"],
                   help="paraphrase + QA source (default extractive: no LLM; self: the base model;"
                        " openai: DMOE_OPENAI_BASE_URL / DMOE_OPENAI_MODEL / OPENAI_API_KEY)")
    u.add_argument("--limit", type=int, default=None, help="only the first N units")
    t = p.add_argument_group("expert training")
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--lr", type=float, default=None, help="default: TrainConfig's measured default")
    t.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's default")
    t.add_argument("--loss-on", choices=["answer", "all"], default=None)
    t.add_argument("--recipe", default=None, choices=["prag", "recite", "recite_qa", "recite_lead"],
                   help="training examples per unit (default: BuildConfig's measured default; "
                        "see dmoe.augment.training)")
    t.add_argument("--objective", default=None, choices=["ntp", "distill"],
                   help="ntp: cross-entropy; distill: KL to the model reading the passage")
    t.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="expert training compute: fp32 (default), or bf16 (frozen weights in "
                        "bfloat16, each expert fp32; 1.8x faster on a CPU with AMX/AVX512-bf16, "
                        "efficacy within noise but not shown equal; one-layer experts only; see "
                        "results/dev/README.md 8b)")
    t.add_argument("--head-vocab", type=int, default=None, metavar="K",
                   help="expert training's output head: 0 = the full vocabulary (default, exact); K > 0 = "
                        "each expert's targets plus the frozen model's top-K tokens at its "
                        "positions, the rest held at the frozen log-mass (dmoe.training.candidates; "
                        "~6x faster on Gemma 3's 262k vocabulary at K = 64; one-layer experts)")
    t.add_argument("--no-passage-lm", action="store_true",
                   help="prag recipe: train on the QA pairs only, not on the passage text")
    t.add_argument("--storage-dtype", default="float32", choices=list(STORAGE_DTYPES))
    t.add_argument("--chunk-size", type=int, default=32, help="experts trained/stored together")
    x = p.add_argument_group("where it runs")
    x.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process (default); ray: augmentation and training on a Ray "
                        "cluster (pip install 'dmoe[ray]'), this process committing")
    x.add_argument("--address", default=None,
                   help="ray: a running cluster (auto | HOST:PORT); default: start one here")
    x.add_argument("--workers", type=int, default=None,
                   help="ray: actors per stage (default: one per GPU, else CPUs / threads)")
    x.add_argument("--threads-per-worker", type=int, default=1,
                   help="ray: CPUs (torch threads) per actor (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    from dmoe.experts.lora import LoraSpec
    from dmoe.training.experts import TrainConfig

    overrides = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs),
                                   ("loss_on", args.loss_on), ("objective", args.objective),
                                   ("precision", args.precision),
                                   ("head_vocab", args.head_vocab))
                 if v is not None}
    return TrainConfig(spec=LoraSpec(rank=args.rank, alpha=args.alpha), **overrides)


def run(args: argparse.Namespace) -> int:
    from dmoe.base_model import load_base_model
    from dmoe.training.build import BuildConfig, build

    config = BuildConfig(granularity=args.granularity, passage_words=args.passage_words,
                         cluster_size=args.cluster_size, augmenter=args.augmenter,
                         include_passage_lm=not args.no_passage_lm, chunk_size=args.chunk_size,
                         storage_dtype=args.storage_dtype, limit=args.limit,
                         **({"recipe": args.recipe} if args.recipe else {}))
    train_config = train_config_from(args)
    if args.executor == "local" and (args.address or args.workers is not None):
        raise ValueError("--address and --workers are for --executor ray")
    if args.workers is not None and args.workers < 1 or args.threads_per_worker < 1:
        raise ValueError("--workers and --threads-per-worker must be >= 1")
    if args.executor == "ray":
        from dmoe.training.ray_build import require_ray

        require_ray()
    lm = load_base_model(args.model, args.device, args.weights, training=True)
    log = (lambda s: None) if args.json else print
    where: AbstractContextManager[Any] = nullcontext()
    if args.executor == "ray":
        from dmoe.training.ray_build import RayExecutor, worker_model

        where = RayExecutor(worker_model(args.model, args.weights), args.bank, config,
                            train_config, address=args.address, workers=args.workers,
                            threads_per_worker=args.threads_per_worker)
    with where as executor:
        summary = build(args.corpus, args.bank, lm, config, train_config,
                        progress=not (args.quiet or args.json), log=log, executor=executor)
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    d = summary.to_dict()
    print(f"units {d['units']} | skipped records {d['skipped_records']} | failed {len(d['failed'])}"
          f" | experts trained {d['experts_trained']}, reused {d['experts_reused']}"
          f" | bank size {d['bank_size']} | {d['bytes_per_expert']} bytes/expert")
    print("time per stage (s): " + ", ".join(f"{k} {v}" for k, v in d["stage_s"].items()))
    for line in summary.failed[:20]:
        print(f"  failed: {line}")
    if summary.experts_removed:
        print(f"  removed {len(summary.experts_removed)} stale passage(s) of updated documents")
    if summary.quarantined:
        print(f"  moved {len(summary.quarantined)} leftover file(s) of an interrupted run to "
              f"quarantine/")
    return 0
