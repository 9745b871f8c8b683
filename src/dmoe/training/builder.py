"""Filling a bank from training jobs, resumably and a whole document at a time.

``train_into_bank`` is what ``dmoe build`` calls after augmentation. Jobs are trained in chunks;
each trained expert's file is staged at once, and as soon as every pending unit of a document is
staged the document is committed in one transaction (``ExpertBank.commit_document``): its new
experts become visible and its units the new version no longer has are removed together. Killed at
any moment (even ``kill -9``) and rerun with the same jobs, it finishes with a consistent bank:
experts already stored with the same content hash and training settings are skipped, staged files
of an uncommitted document are quarantined when the bank is next opened for writing, and the
document is simply retrained.

This module knows nothing about corpora or augmentation: a job is an id, its examples and its texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dmoe.augment.types import TrainingExample
from dmoe.experts.bank import DocumentChange, ExpertBank, Staged, doc_of
from dmoe.faults import kill_point
from dmoe.training.experts import TrainConfig, train


@dataclass(frozen=True)
class ExpertJob:
    """Everything needed to train and store one unit's expert."""

    expert_id: str
    examples: tuple[TrainingExample, ...]
    unit_id: str = ""  # defaults to expert_id
    content_hash: str = ""  # KnowledgeUnit.content_hash: a changed unit is retrained
    surrogate: str = ""  # routing text (passage + paraphrase + QA pairs)
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    doc_id: str | None = None  # the document it belongs to (default: the unit id before '#')

    @property
    def document(self) -> str:
        return self.doc_id if self.doc_id is not None else doc_of(self.unit_id or self.expert_id)


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)  # ids trained (added or updated) in this run
    skipped: list[str] = field(default_factory=list)  # ids already stored with the same hashes
    removed: list[str] = field(default_factory=list)  # stale units of updated documents
    failed: list[str] = field(default_factory=list)  # "id: reason" (not stored)
    quarantined: list[str] = field(default_factory=list)  # leftovers of an interrupted run


def pending(bank: ExpertBank, jobs: Sequence[ExpertJob], settings_hash: str) -> list[ExpertJob]:
    """Jobs whose expert is absent, or stored for other content or other settings."""
    out = []
    for job in jobs:
        if bank.exists(job.expert_id):
            info = bank.info(job.expert_id)
            if (info.content_hash, info.settings_hash) == (job.content_hash, settings_hash):
                continue
        out.append(job)
    return out


DocumentHook = Callable[[DocumentChange, Sequence[Staged]], None]


@dataclass(frozen=True)
class ChunkWork:
    """One chunk of jobs for a worker: what ``train_and_stage`` needs besides the model."""

    jobs: tuple[ExpertJob, ...]
    settings_hash: str
    doc_units: dict[str, tuple[str, ...]]  # each job's document -> every unit of its new version


Outcome = Staged | str  # a job's expert file, staged; or "id: reason" when it could not be trained
ChunkRunner = Callable[[Sequence[ChunkWork]], Iterator[tuple[int, Iterable[Outcome]]]]


def train_and_stage(model: Any, tokenizer: Any, work: ChunkWork, config: TrainConfig,
                    bank: ExpertBank, fast: bool = True) -> Iterator[Outcome]:
    """The worker's stage, wherever it runs: train one chunk's experts together, then write each
    one's file into the bank (staged: no row points at it yet). Yields one outcome per job, in
    order, each file written only when asked for: a committer in the same process commits a
    document as soon as its last file is written (a remote worker takes the whole list)."""
    experts = train(model, tokenizer, [(j.expert_id, j.examples) for j in work.jobs], config,
                    fast=fast)
    kill_point("build.chunk_trained")
    for job, expert in zip(work.jobs, experts, strict=True):
        if not all(bool(torch.isfinite(t).all()) for t in expert.weights.values()):
            yield f"{job.expert_id}: training diverged (non-finite weights)"
            continue
        yield bank.stage(
            expert, unit_id=job.unit_id or job.expert_id, content_hash=job.content_hash,
            settings_hash=work.settings_hash, surrogate=job.surrogate, title=job.title,
            meta=job.meta, doc_id=job.document, doc_units=work.doc_units[job.document])


def train_into_bank(model: Any, tokenizer: Any, jobs: Sequence[ExpertJob], bank: ExpertBank,
                    config: TrainConfig, chunk_size: int = 64, fast: bool = True,
                    on_chunk: Callable[[int, int, Sequence[ExpertJob]], None] | None = None,
                    on_document: DocumentHook | None = None,
                    examples_settings: dict[str, Any] | None = None,
                    run_chunks: ChunkRunner | None = None) -> BuildReport:
    """Train the pending jobs ``chunk_size`` at a time, committing each document once all of its
    pending units are trained (a document whose units are all unchanged is committed first, to
    drop the units it no longer has).

    ``on_document(change, staged)`` follows each commit (the index update); ``on_chunk(done,
    total, chunk)`` each trained chunk (progress bars). ``examples_settings`` names what shaped
    the jobs' examples (recipe, ...); it enters the settings hash, so changing it retrains.
    ``run_chunks(works)`` runs ``train_and_stage`` on each chunk somewhere and yields ``(index,
    outcomes)`` as chunks finish, in any order (default: here, one after another; ``dmoe.training.
    ray_build`` runs them on a Ray cluster). This function stays the only writer of rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = [j.expert_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("expert ids must be unique within a build")
    report = BuildReport(quarantined=bank.quarantine_leftovers())
    settings = config.settings_hash(examples_settings)
    todo = pending(bank, jobs, settings)
    todo_ids = {j.expert_id for j in todo}
    report.skipped = [i for i in ids if i not in todo_ids]
    units: dict[str, list[str]] = {}  # document -> every unit id of its new version
    for job in jobs:
        units.setdefault(job.document, []).append(job.expert_id)
    waiting = {doc: {j.expert_id for j in todo if j.document == doc} for doc in units}
    staged: dict[str, list[Staged]] = {doc: [] for doc in units}
    kept = {doc: [i for i in unit_ids if i not in todo_ids] for doc, unit_ids in units.items()}

    def commit(doc: str) -> None:
        change = bank.commit_document(doc, staged[doc], keep=kept[doc])
        report.removed.extend(change.removed)
        if on_document:
            on_document(change, staged[doc])

    for doc in units:  # unchanged documents: only their stale units go
        if not waiting[doc] and set(bank.document_ids(doc)) - set(units[doc]):
            commit(doc)
    works = []
    for lo in range(0, len(todo), chunk_size):
        chunk = tuple(todo[lo:lo + chunk_size])
        works.append(ChunkWork(chunk, settings, {j.document: tuple(units[j.document])
                                                  for j in chunk}))
    if run_chunks is None:
        def run_chunks(works: Sequence[ChunkWork]) -> Iterator[tuple[int, Iterable[Outcome]]]:
            for i, work in enumerate(works):
                yield i, train_and_stage(model, tokenizer, work, config, bank, fast)

    done = 0
    for i, outcomes in run_chunks(works):
        chunk = works[i].jobs
        for job, outcome in zip(chunk, outcomes, strict=True):
            doc = job.document
            waiting[doc].discard(job.expert_id)
            if isinstance(outcome, str):
                report.failed.append(outcome)
            else:
                staged[doc].append(outcome)
                report.trained.append(job.expert_id)
            if not waiting[doc]:
                commit(doc)
        done += len(chunk)
        if on_chunk:
            on_chunk(done, len(todo), chunk)
    return report
