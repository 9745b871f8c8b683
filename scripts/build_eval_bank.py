"""Build an expert bank for one benchmark's corpus, for `dmoe eval --bank` (experiment script).

Reads top to bottom: load the task's corpus (same selection as the eval run, since some corpora
follow --limit), augment each unit without an LLM (extractive paraphrase + cloze QA), turn that into
PRAG training examples (+ the passage as a language-modelling example), train one final-layer
expert per unit with the fast trainer and store it in a bank with its routing surrogate.

    PYTHONPATH=src python scripts/build_eval_bank.py --dataset knowledge_conflicts --limit 25 \
        --bank /tmp/banks/kc25
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from dmoe.augment.extractive import ExtractiveAugmenter
from dmoe.augment.training import training_examples
from dmoe.base_model import load_base_model
from dmoe.eval.datasets import load_task
from dmoe.experts.bank import ExpertBank
from dmoe.experts.builder import ExpertJob, train_into_bank
from dmoe.experts.lora import LoraSpec
from dmoe.experts.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--bank", required=True)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="storage dtype of the expert files (default float32)")
    args = ap.parse_args()

    lm = load_base_model()
    task = load_task(args.dataset, offset=args.offset, limit=args.limit or None)
    units = task.corpus
    augs = ExtractiveAugmenter().augment(units)
    jobs = []
    for unit, aug in zip(units, augs, strict=True):
        examples = training_examples(unit, aug, lm.tokenizer)
        surrogate = "\n".join([unit.title, unit.text, aug.paraphrase]
                              + [f"{qa.question} {qa.answer}" for qa in aug.qa])
        jobs.append(ExpertJob(expert_id=unit.id, examples=tuple(examples), unit_id=unit.id,
                              content_hash=unit.content_hash, surrogate=surrogate, title=unit.title))
    config = TrainConfig(spec=LoraSpec(), lr=args.lr, epochs=args.epochs)
    bank = ExpertBank.open_or_create(args.bank, lm.fingerprint, lm.source.name, config.spec,
                                      dtype=args.dtype)
    bar = tqdm(total=len(jobs), desc=f"train {args.dataset}", unit="expert")
    t0 = time.perf_counter()
    report = train_into_bank(lm.model, lm.tokenizer, jobs, bank, config, chunk_size=32,
                             on_chunk=lambda done, total, _chunk: bar.update(done - bar.n))
    bar.close()
    print(f"{len(report.trained)} trained, {len(report.skipped)} skipped in "
          f"{time.perf_counter() - t0:.1f}s; bank {args.bank} holds {len(bank)} experts")


if __name__ == "__main__":
    main()
