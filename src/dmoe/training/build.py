"""``dmoe build``: corpus -> knowledge units -> augmentation -> one expert per unit -> bank + index.

Every stage is resumable: augmentations are cached by content hash + augmenter settings
(``BANK/augment-cache.jsonl``), experts already in the bank for the same content and training
settings are skipped, and experts are stored a chunk at a time, so an interrupted build (Ctrl-C,
``kill -9``) loses at most the chunk in flight and the rerun finishes it. The router index is synced
after every stored chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dmoe.augment import augment_cached, make_augmenter, training_examples
from dmoe.augment.types import Augmentation
from dmoe.corpus import read_corpus
from dmoe.corpus.units import KnowledgeUnit
from dmoe.knowledge import KnowledgeBase
from dmoe.training.builder import ExpertJob, train_into_bank
from dmoe.training.experts import TrainConfig

AUGMENT_CACHE = "augment-cache.jsonl"


@dataclass(frozen=True)
class BuildConfig:
    """What ``dmoe build`` does besides training (training knobs live in ``TrainConfig``)."""

    granularity: str = "passage"  # passage | document | cluster
    passage_words: int = 100  # target words per passage unit
    cluster_size: int = 3  # passages per cluster unit
    augmenter: str = "extractive"  # extractive | none | self | openai
    augment_batch: int = 8  # units per augmentation batch
    target: str = "answer"  # QA target style: answer | full_answer
    include_passage_lm: bool = True  # prag recipe: also train on the passage/paraphrase text
    recipe: str = "prag"  # training examples per unit: prag | recite | recite_qa (augment.training)
    chunk_size: int = 32  # experts trained and stored together
    storage_dtype: str = "float32"  # float32 | float16 | bfloat16
    limit: int | None = None  # only the first N units (quick tries)


@dataclass
class BuildSummary:
    units: int = 0
    skipped_records: list[str] = field(default_factory=list)  # "file:line: reason"
    experts_trained: int = 0
    experts_reused: int = 0
    failed: list[str] = field(default_factory=list)  # "unit id: reason"
    bytes_per_expert: float = 0.0
    bank_size: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)
    expert_ids: list[str] = field(default_factory=list)  # every unit's expert (trained or reused)

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "skipped_records": len(self.skipped_records),
                "skips": self.skipped_records[:50], "experts_trained": self.experts_trained,
                "experts_reused": self.experts_reused, "failed": self.failed,
                "bytes_per_expert": round(self.bytes_per_expert), "bank_size": self.bank_size,
                "stage_s": {k: round(v, 2) for k, v in self.stage_s.items()}}


def examples_settings(config: BuildConfig) -> dict[str, Any]:
    """What shapes a unit's training examples besides its text and augmentation (settings hash)."""
    return {"recipe": config.recipe, "target": config.target,
            "include_passage_lm": config.include_passage_lm}


def surrogate_text(unit: KnowledgeUnit, aug: Augmentation) -> str:
    """The routing text of an expert: title, passage, paraphrase, and its QA pairs."""
    qa = "\n".join(f"Q: {p.question} A: {p.answer}" for p in aug.qa)
    return "\n".join(x for x in (unit.title, unit.text, aug.paraphrase, qa) if x)


def build(corpus: str | Path, bank_dir: str | Path, lm: Any, config: BuildConfig,
          train_config: TrainConfig, progress: bool = True,
          log: Callable[[str], None] = print,
          on_progress: Callable[[str, int, int], None] | None = None) -> BuildSummary:
    """Run the whole pipeline into ``bank_dir`` (created if missing) and return a summary.

    ``on_progress(stage, done, total)`` is called as units are augmented (stage ``"augment"``) and
    as experts are stored (``"train"``, counting the experts that needed training).
    """
    report_progress = on_progress or (lambda stage, done, total: None)
    summary = BuildSummary()
    clock = time.perf_counter()

    # 1) corpus -> units (bad records reported, never silently dropped)
    report = read_corpus(corpus, granularity=config.granularity,  # type: ignore[arg-type]
                         passage_words=config.passage_words, cluster_size=config.cluster_size)
    units = report.units[: config.limit] if config.limit else report.units
    summary.units = len(units)
    summary.skipped_records = [str(s) for s in report.skips]
    summary.stage_s["ingest"] = time.perf_counter() - clock
    log(f"corpus: {report.summary()}" + (f" (using the first {len(units)})" if config.limit else ""))
    if not units:
        raise ValueError(f"no usable knowledge units in {corpus}")

    kb = KnowledgeBase.open_or_create(bank_dir, lm.fingerprint, lm.source.name,
                                      train_config.spec, config.storage_dtype)
    try:
        # 2) augmentation (cached in the bank directory)
        clock = time.perf_counter()
        augmenter = make_augmenter(config.augmenter, loaded=lm, batch_size=config.augment_batch)
        bar = tqdm(total=len(units), desc="augment", unit="unit", disable=not progress)

        def augmented(done: int, total: int) -> None:
            bar.update(done - bar.n)
            report_progress("augment", done, total)

        augs = augment_cached(units, augmenter, Path(bank_dir) / AUGMENT_CACHE,
                              chunk_size=config.augment_batch, on_progress=augmented)
        bar.close()
        summary.stage_s["augment"] = time.perf_counter() - clock

        # 3) training examples and jobs (a unit without examples is a reported failure)
        jobs = []
        for unit, aug in zip(units, augs, strict=True):
            examples = training_examples(unit, aug, lm.tokenizer, target=config.target,  # type: ignore[arg-type]
                                         include_passage_lm=config.include_passage_lm,
                                         recipe=config.recipe)  # type: ignore[arg-type]
            if not examples:
                summary.failed.append(f"{unit.id}: no training examples")
                continue
            jobs.append(ExpertJob(expert_id=unit.id, examples=tuple(examples), unit_id=unit.id,
                                  content_hash=unit.content_hash, surrogate=surrogate_text(unit, aug),
                                  title=unit.title, meta={"augmenter": aug.source}))

        # 4) train a chunk at a time into the bank; index each stored chunk
        clock = time.perf_counter()
        bar = tqdm(total=len(jobs), desc="train", unit="expert", disable=not progress)

        def stored(done: int, total: int, chunk: Sequence[ExpertJob]) -> None:
            # bank first, then index (knowledge.py); only this chunk, not a full reconcile
            kb.index.add_many((job.expert_id, job.surrogate) for job in chunk)
            bar.total = total
            bar.update(done - bar.n)
            report_progress("train", done, total)

        result = train_into_bank(lm.model, lm.tokenizer, jobs, kb.bank, train_config,
                                 chunk_size=config.chunk_size, on_chunk=stored,
                                 examples_settings=examples_settings(config))
        bar.close()
        kb.sync()  # safety net: one full reconcile at the end of the build
        kb.experts.invalidate()
        summary.stage_s["train"] = time.perf_counter() - clock
        summary.experts_trained = len(result.trained)
        summary.experts_reused = len(result.skipped)
        summary.expert_ids = [job.expert_id for job in jobs]
        infos = kb.list()
        summary.bank_size = len(infos)
        summary.bytes_per_expert = sum(i.bytes for i in infos) / max(len(infos), 1)
    finally:
        kb.close()
    return summary
