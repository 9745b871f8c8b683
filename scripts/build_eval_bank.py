r"""Build an expert bank for one benchmark's corpus, for `dmoe eval --bank` (experiment script).

Reads top to bottom: load the task's corpus (same selection as the eval run, since some corpora
follow --limit), augment each unit (``--augmenter``, default extractive: no LLM), turn that into
training examples by ``--recipe`` (default: ``BuildConfig``'s, the shipped one), train one
final-layer expert per unit with the fast trainer (``TrainConfig`` defaults unless overridden) and
store it in a bank with its routing surrogate (``surrogate_text``, as ``dmoe build`` does). From the
same examples it can also (or, with --no-bank, only) train the comparison methods' corpus-wide
LoRAs: one sft_lora (`dmoe eval --sft-lora FILE`) and a Poly-PRAG pool (`dmoe eval --poly DIR`).

    PYTHONPATH=src python scripts/build_eval_bank.py --dataset knowledge_conflicts --limit 25 \
        --bank /tmp/banks/kc25 --sft-lora /tmp/banks/kc25-sft.safetensors --poly /tmp/banks/kc25-poly
    PYTHONPATH=src python scripts/build_eval_bank.py --dataset knowledge_conflicts --limit 25 \
        --no-bank --poly /tmp/banks/kc25-poly --poly-pool-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from tqdm import tqdm

from dmoe.augment.training import RECIPES
from dmoe.base_model import load_base_model
from dmoe.eval.datasets import load_task
from dmoe.experts.format import STORAGE_DTYPES, save_expert
from dmoe.experts.lora import LoraSpec
from dmoe.experts.poly_format import save_poly
from dmoe.training.build import BuildConfig
from dmoe.training.corpus import (
    POLY_SPEC,
    SFT_SPEC,
    CorpusStates,
    CorpusTrainConfig,
    PolyTrainConfig,
    train_poly_prag,
    train_sft_lora,
)
from dmoe.training.experts import OBJECTIVES, PRECISIONS, TrainConfig
from dmoe.training.task_bank import CHUNK, expert_jobs, train_task_bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--corpus-scope", default="full", choices=["full", "gold"],
                    help="as dmoe eval --corpus-scope")
    ap.add_argument("--recipe", default=BuildConfig.recipe, choices=RECIPES,
                    help=f"training examples per unit (default {BuildConfig.recipe})")
    ap.add_argument("--objective", default=TrainConfig.objective, choices=OBJECTIVES)
    ap.add_argument("--augmenter", default="extractive", choices=["extractive", "spans"])
    ap.add_argument("--bank", help="expert bank folder (per-passage experts, for dmoe / prag)")
    ap.add_argument("--no-bank", action="store_true", help="skip the per-passage experts")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr, help="per-passage expert lr")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                    help="per-passage expert epochs")
    ap.add_argument("--precision", default=TrainConfig.precision, choices=PRECISIONS,
                    help="expert training compute: fp32 (default), or bf16 (frozen weights in "
                         "bfloat16, each expert fp32; 1.8x faster on a CPU with AMX/AVX512-bf16, "
                         "efficacy within noise but not shown equal; one-layer experts only; see "
                         "results/dev/README.md 8b)")
    ap.add_argument("--head-vocab", type=int, default=TrainConfig.head_vocab, metavar="K",
                    help="expert training's output head: 0 = the full vocabulary (default, exact); K > 0 = "
                         "each expert's targets plus the frozen model's top-K tokens at its "
                         "positions, the rest held at the frozen log-mass (dmoe.training.candidates; "
                         "~6x faster on Gemma 3's 262k vocabulary at K = 64; one-layer experts)")
    ap.add_argument("--model", default=None, metavar="SPEC",
                    help="base model, as dmoe's --model (default: the packaged smollm2; also "
                         "gemma3-270m, an HF model directory or a .gguf file)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    ap.add_argument("--chunk-size", type=int, default=CHUNK,
                    help=f"experts trained side by side and committed together (default {CHUNK}; "
                         "larger keeps a GPU busier, the same experts either way)")
    ap.add_argument("--dtype", default="float32", choices=STORAGE_DTYPES,
                    help="storage dtype of the bank's expert files (default float32)")
    corpus = ap.add_argument_group("corpus-wide LoRAs (sft_lora, poly_prag)")
    corpus.add_argument("--sft-lora", metavar="FILE", help="also train one corpus-wide LoRA here")
    corpus.add_argument("--sft-rank", type=int, default=SFT_SPEC.rank,
                        help=f"its rank (default {SFT_SPEC.rank}, alpha = 2 x rank)")
    corpus.add_argument("--poly", metavar="DIR", help="also train a Poly-PRAG pool + routing here")
    corpus.add_argument("--poly-pool-size", type=int, default=PolyTrainConfig.pool_size,
                        help=f"latent LoRAs in the pool (default {PolyTrainConfig.pool_size})")
    corpus.add_argument("--poly-rank", type=int, default=POLY_SPEC.rank,
                        help=f"rank of each pool LoRA (default {POLY_SPEC.rank}, alpha "
                             f"{POLY_SPEC.alpha:g})")
    corpus.add_argument("--corpus-lr", type=float, default=CorpusTrainConfig.lr,
                        help=f"lr of both (default {CorpusTrainConfig.lr})")
    corpus.add_argument("--corpus-epochs", type=int, default=CorpusTrainConfig.epochs,
                        help=f"epochs of both (default {CorpusTrainConfig.epochs})")
    corpus.add_argument("--batch-size", type=int, default=CorpusTrainConfig.batch_size,
                        help=f"examples per step (default {CorpusTrainConfig.batch_size})")
    args = ap.parse_args()
    if args.no_bank == bool(args.bank):
        ap.error("give --bank DIR, or --no-bank (then --sft-lora and/or --poly)")
    if args.no_bank and not (args.sft_lora or args.poly):
        ap.error("--no-bank with nothing to train: add --sft-lora FILE and/or --poly DIR")

    lm = load_base_model(args.model, args.device, training=True)  # experts train on float weights
    task = load_task(args.dataset, offset=args.offset, limit=args.limit or None,
                     corpus_scope=args.corpus_scope)
    jobs = expert_jobs(lm, task.corpus, args.recipe, args.augmenter)
    if args.bank:
        config = TrainConfig(spec=LoraSpec(), lr=args.lr, epochs=args.epochs,
                             objective=args.objective, precision=args.precision,
                             head_vocab=args.head_vocab)
        train_task_bank(lm, jobs, args.bank, config, args.dtype, desc=f"train {args.dataset}",
                        settings={"recipe": args.recipe, "augmenter": args.augmenter},
                        chunk_size=args.chunk_size)

    corpus_jobs = [(job.unit_id, job.examples) for job in jobs]
    n_examples = sum(len(job.examples) for job in jobs)
    common = dict(lr=args.corpus_lr, epochs=args.corpus_epochs, batch_size=args.batch_size,
                  head_vocab=args.head_vocab)
    sft_cfg = CorpusTrainConfig(spec=LoraSpec(rank=args.sft_rank, alpha=2.0 * args.sft_rank),
                                **common)
    poly_cfg = PolyTrainConfig(spec=dataclasses.replace(POLY_SPEC, rank=args.poly_rank),
                               pool_size=args.poly_pool_size, **common)
    states = None
    if args.sft_lora or args.poly:  # the frozen trunk runs over the corpus once, for both
        phases = "trunk states + candidate sets" if args.head_vocab else "trunk states"
        bar = tqdm(total=n_examples * (2 if args.head_vocab else 1),
                   desc=f"{phases} ({len(jobs)} units)", unit="example")
        t0 = time.perf_counter()
        states = CorpusStates(lm.model, lm.tokenizer, corpus_jobs, sft_cfg, progress=bar.update)
        bar.close()
        print(f"{phases} in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.sft_lora:
        bar = tqdm(total=sft_cfg.epochs * n_examples, desc="train sft_lora", unit="example")
        t0 = time.perf_counter()
        lora = train_sft_lora(lm.model, lm.tokenizer, corpus_jobs, sft_cfg, progress=bar.update,
                              states=states)
        bar.close()
        save_expert(args.sft_lora, lora, lm.fingerprint)
        print(f"sft_lora (rank {args.sft_rank}, {n_examples} examples x {sft_cfg.epochs} epochs) "
              f"in {time.perf_counter() - t0:.1f}s -> {args.sft_lora}")
    if args.poly:
        bar = tqdm(total=poly_cfg.epochs * n_examples, desc="train poly_prag", unit="example")
        t0 = time.perf_counter()
        poly = train_poly_prag(lm.model, lm.tokenizer, corpus_jobs, poly_cfg, progress=bar.update,
                               states=states)
        bar.close()
        save_poly(args.poly, poly, lm.fingerprint, config=dataclasses.asdict(poly_cfg))
        print(f"poly_prag (pool {poly_cfg.pool_size} x rank {args.poly_rank}, {len(jobs)} units) "
              f"in {time.perf_counter() - t0:.1f}s -> {args.poly}")


if __name__ == "__main__":
    main()
