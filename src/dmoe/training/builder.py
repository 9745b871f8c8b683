"""Filling a bank from training jobs, resumably: train in chunks, store each chunk, skip the done.

``train_into_bank`` is what ``dmoe build`` calls after augmentation. Killed at any moment (even
``kill -9``) and rerun with the same jobs, it finishes with a consistent bank: experts already stored
with the same content hash and training settings are skipped, a chunk in flight is simply retrained,
and ``bank.repair()`` (run first) removes files a killed write left behind.

This module knows nothing about corpora or augmentation: a job is an id, its examples and its texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmoe.augment.types import TrainingExample
from dmoe.experts.bank import BankReport, ExpertBank
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


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)  # ids trained (added or updated) in this run
    skipped: list[str] = field(default_factory=list)  # ids already stored with the same hashes
    repaired: BankReport = field(default_factory=BankReport)  # what repair() cleaned first


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


def train_into_bank(model: Any, tokenizer: Any, jobs: Sequence[ExpertJob], bank: ExpertBank,
                    config: TrainConfig, chunk_size: int = 64, fast: bool = True,
                    on_chunk: Callable[[int, int, Sequence[ExpertJob]], None] | None = None,
                    examples_settings: dict[str, Any] | None = None) -> BuildReport:
    """Train the pending jobs ``chunk_size`` at a time and store each chunk as soon as it is done.

    ``on_chunk(done, total, chunk)`` is called after each stored chunk with its jobs (progress
    bars; indexing just what was stored). ``examples_settings`` names what shaped the jobs'
    examples (recipe, ...); it enters the settings hash, so changing it retrains.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = [j.expert_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("expert ids must be unique within a build")
    report = BuildReport(repaired=bank.repair())
    settings = config.settings_hash(examples_settings)
    todo = pending(bank, jobs, settings)
    todo_ids = {j.expert_id for j in todo}
    report.skipped = [i for i in ids if i not in todo_ids]
    for lo in range(0, len(todo), chunk_size):
        chunk = todo[lo:lo + chunk_size]
        experts = train(model, tokenizer, [(j.expert_id, j.examples) for j in chunk], config,
                        fast=fast)
        for job, expert in zip(chunk, experts, strict=True):
            store = bank.update if bank.exists(job.expert_id) else bank.add
            store(expert, unit_id=job.unit_id or job.expert_id, content_hash=job.content_hash,
                  settings_hash=settings, surrogate=job.surrogate, title=job.title, meta=job.meta)
            report.trained.append(job.expert_id)
        if on_chunk:
            on_chunk(lo + len(chunk), len(todo), chunk)
    return report
