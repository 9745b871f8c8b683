"""``dmoe build``: corpus -> knowledge units -> augmentation -> one expert per unit -> bank + index.

Every stage is resumable: augmentations are cached by content hash + augmenter settings
(``BANK/augment-cache.jsonl``), experts already in the bank for the same content and training
settings are skipped, and each document is committed (and indexed) as soon as its units are trained,
so an interrupted build (Ctrl-C, ``kill -9``) loses at most the documents in flight and the rerun
finishes them. A document is the unit of update: rebuilding one replaces all of its passages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from dmoe.augment import augment_cached, make_augmenter, training_examples
from dmoe.augment.training import Recipe
from dmoe.augment.types import Augmentation
from dmoe.corpus import read_corpus
from dmoe.corpus.units import KnowledgeUnit
from dmoe.experts.bank import DocumentChange, ExpertBank, Staged, doc_of
from dmoe.faults import kill_point
from dmoe.knowledge import KnowledgeBase
from dmoe.training.builder import ChunkWork, ExpertJob, Outcome, train_into_bank
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
    target: str = "answer"  # prag recipe's QA target style: answer | full_answer | lead
    include_passage_lm: bool = True  # prag recipe: also train on the passage/paraphrase text
    # training examples per unit: prag | recite | recite_qa | recite_lead (dmoe.augment.training).
    # recite_qa won the dev sweep (results/dev/README.md): the expert learns to say its passage in
    # the answer frame
    recipe: Recipe = "recite_qa"
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
    experts_removed: list[str] = field(default_factory=list)  # stale units of updated documents
    quarantined: list[str] = field(default_factory=list)  # leftovers of an interrupted run

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "skipped_records": len(self.skipped_records),
                "skips": self.skipped_records[:50], "experts_trained": self.experts_trained,
                "experts_reused": self.experts_reused, "failed": self.failed,
                "experts_removed": self.experts_removed, "quarantined": self.quarantined,
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
          on_progress: Callable[[str, int, int], None] | None = None,
          executor: Executor | None = None) -> BuildSummary:
    """Run the whole pipeline into ``bank_dir`` (created if missing) and return a summary.

    The bank is opened for writing (its lock is taken) before any work starts, so a second writer
    fails at once. ``on_progress(stage, done, total)``: see ``build_into``.
    """
    kb = KnowledgeBase.open_or_create(bank_dir, lm.fingerprint, lm.source.name,
                                      train_config.spec, config.storage_dtype)
    try:
        return build_into(kb, corpus, lm, config, train_config, progress, log, on_progress,
                          executor)
    finally:
        kb.close()


class Executor(Protocol):
    """Where ``build_into``'s two heavy stages run; ``None`` means here, one chunk after another.
    Each yields ``(chunk index, results)`` as chunks finish, in any order
    (``dmoe.training.ray_build.RayExecutor`` runs them on a Ray cluster)."""

    def augment_chunks(self, chunks: Sequence[Sequence[KnowledgeUnit]]
                       ) -> Iterator[tuple[int, list[Augmentation]]]: ...

    def train_chunks(self, works: Sequence[ChunkWork]
                     ) -> Iterator[tuple[int, Iterable[Outcome]]]: ...


class BuildTarget(Protocol):
    """What ``build_into`` needs of a knowledge base: ``KnowledgeBase``, or the server's build
    worker's view of one (``dmoe.server.build_worker``)."""

    @property
    def bank(self) -> ExpertBank: ...

    def indexed(self, change: DocumentChange, staged: Sequence[Staged]) -> None: ...

    def delete_document(self, doc_id: str) -> DocumentChange: ...

    def sync(self) -> Any: ...

    def invalidate(self, expert_ids: Sequence[str] | None = None) -> None: ...


def build_into(kb: BuildTarget, corpus: str | Path, lm: Any, config: BuildConfig,
               train_config: TrainConfig, progress: bool = True,
               log: Callable[[str], None] = print,
               on_progress: Callable[[str, int, int], None] | None = None,
               executor: Executor | None = None) -> BuildSummary:
    """The pipeline into an open knowledge base (the server's job runner uses its own).

    Every document of the corpus replaces its previous version whole: new experts are trained
    first, then (one transaction per document) they become visible and the units the new version
    no longer has are removed. ``on_progress(stage, done, total)`` is called as units are augmented
    (stage ``"augment"``) and as experts are trained (``"train"``, counting those that needed it).
    ``executor``: where augmentation and training run (default: here); whatever runs them, this
    process stays the only writer of the cache, the rows and the index.
    """
    report_progress = on_progress or (lambda stage, done, total: None)
    summary = BuildSummary()
    clock = time.perf_counter()
    if kb.bank.spec != train_config.spec:
        raise ValueError(f"the bank holds experts of shape {kb.bank.spec}, the training config "
                         f"makes {train_config.spec}")

    # 1) corpus -> units (bad records reported, never silently dropped)
    report = read_corpus(corpus, granularity=config.granularity,  # type: ignore[arg-type]
                         passage_words=config.passage_words, cluster_size=config.cluster_size)
    units = report.units[: config.limit] if config.limit else report.units
    summary.units = len(units)
    summary.skipped_records = [str(s) for s in report.skips]
    summary.stage_s["ingest"] = time.perf_counter() - clock
    log(f"corpus: {report.summary()}" + (f" (using the first {len(units)})" if config.limit else ""))
    for skip in summary.skipped_records[:10]:
        log(f"  skipped {skip}")
    if len(summary.skipped_records) > 10:
        log(f"  ... and {len(summary.skipped_records) - 10} more (the first 50: --json)")
    if not units:
        reasons = "; ".join(summary.skipped_records[:5])
        raise ValueError(f"no usable knowledge units in {Path(corpus).name}"
                         + (f" ({reasons})" if reasons else ""))

    # 2) augmentation (cached in the bank directory)
    clock = time.perf_counter()
    augmenter = make_augmenter(config.augmenter, loaded=lm, batch_size=config.augment_batch)
    bar = tqdm(total=len(units), desc="augment", unit="unit", disable=not progress)

    def augmented(done: int, total: int) -> None:
        bar.update(done - bar.n)
        report_progress("augment", done, total)

    augs = augment_cached(units, augmenter, kb.bank.path / AUGMENT_CACHE,
                          chunk_size=config.augment_batch, on_progress=augmented,
                          run_chunks=executor.augment_chunks if executor else None)
    bar.close()
    summary.stage_s["augment"] = time.perf_counter() - clock
    kill_point("build.augmented")

    # 3) training examples and jobs (a unit without examples is a reported failure)
    jobs = []
    documents = []
    for unit, aug in zip(units, augs, strict=True):
        doc = doc_of(unit.id)
        if doc not in documents:
            documents.append(doc)
        examples = training_examples(unit, aug, lm.tokenizer, target=config.target,  # type: ignore[arg-type]
                                     include_passage_lm=config.include_passage_lm,
                                     recipe=config.recipe)
        if not examples:
            summary.failed.append(f"{unit.id}: no training examples")
            continue
        jobs.append(ExpertJob(expert_id=unit.id, examples=tuple(examples), unit_id=unit.id,
                              content_hash=unit.content_hash, surrogate=surrogate_text(unit, aug),
                              title=unit.title, meta={"augmenter": aug.source}, doc_id=doc))

    # 4) train a chunk at a time; commit and index each document as soon as it is complete
    clock = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="train", unit="expert", disable=not progress)

    def trained(done: int, total: int, chunk: Sequence[ExpertJob]) -> None:
        bar.total = total
        bar.update(done - bar.n)
        report_progress("train", done, total)

    def committed(change: DocumentChange, staged: Sequence[Staged]) -> None:
        kb.indexed(change, staged)  # bank first, then index (knowledge.py)
        kill_point("build.indexed")

    try:
        result = train_into_bank(lm.model, lm.tokenizer, jobs, kb.bank, train_config,
                                 chunk_size=config.chunk_size, on_chunk=trained,
                                 on_document=committed, examples_settings=examples_settings(config),
                                 run_chunks=executor.train_chunks if executor else None)
    finally:
        if executor is not None:  # files of dead or failed remote attempts: none is committed
            summary.quarantined.extend(kb.bank.quarantine_leftovers())
    with_jobs = {j.document for j in jobs}
    for doc in documents:  # a document none of whose units could be trained: its old version goes
        if doc not in with_jobs and kb.bank.document_ids(doc):
            result.removed.extend(kb.delete_document(doc).removed)
    bar.close()
    kb.sync()  # safety net: one full reconcile at the end of the build
    kb.invalidate()
    summary.stage_s["train"] = time.perf_counter() - clock
    summary.experts_trained = len(result.trained)
    summary.experts_reused = len(result.skipped)
    summary.experts_removed = result.removed
    summary.failed.extend(result.failed)
    summary.quarantined = result.quarantined + summary.quarantined
    summary.expert_ids = [job.expert_id for job in jobs if job.expert_id not in
                          {f.split(":", 1)[0] for f in result.failed}]
    infos = kb.bank.list()
    summary.bank_size = len(infos)
    summary.bytes_per_expert = sum(i.bytes for i in infos) / max(len(infos), 1)
    return summary
