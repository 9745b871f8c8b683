"""A benchmark corpus's bank: augment each unit, train one expert per unit, store them.

The two steps ``scripts/build_eval_bank.py`` and ``dmoe ablate`` (the arms that need their own
bank: ``rank``, ``placement``) share::

    jobs = expert_jobs(lm, task.corpus)                  # extractive augmentation, recipe examples
    report = train_task_bank(lm, jobs, BANK, TrainConfig(spec=LoraSpec(rank=8, alpha=32)))

Rerunning skips the experts the bank already holds with the same content and settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dmoe.augment import make_augmenter
from dmoe.augment.training import Recipe, training_examples
from dmoe.corpus.units import KnowledgeUnit
from dmoe.experts.bank import ExpertBank
from dmoe.training.build import BuildConfig, surrogate_text
from dmoe.training.builder import BuildReport, ExpertJob, pending, train_into_bank
from dmoe.training.experts import TrainConfig

CHUNK = 32  # experts trained side by side (and committed) at a time


def expert_jobs(lm: Any, units: Sequence[KnowledgeUnit], recipe: Recipe = BuildConfig.recipe,
                augmenter: str = "extractive") -> list[ExpertJob]:
    """One training job per unit: its augmentation turned into the recipe's examples, and its
    routing text."""
    augs = make_augmenter(augmenter, loaded=lm).augment(list(units))
    return [ExpertJob(expert_id=unit.id, unit_id=unit.id, content_hash=unit.content_hash,
                      examples=tuple(training_examples(unit, aug, lm.tokenizer, recipe=recipe)),
                      surrogate=surrogate_text(unit, aug), title=unit.title)
            for unit, aug in zip(units, augs, strict=True)]


def train_task_bank(lm: Any, jobs: Sequence[ExpertJob], path: str | Path, config: TrainConfig,
                    dtype: str = "float32", settings: dict[str, Any] | None = None,
                    desc: str = "train", progress: bool = True,
                    chunk_size: int = CHUNK) -> BuildReport:
    """Train ``jobs`` into the bank at ``path`` (created with ``config.spec`` and ``dtype`` if
    new), resumably; ``settings`` names what shaped the examples (it enters the settings hash).
    ``lm`` must hold float weights (``load_base_model(training=True)``)."""
    bank = ExpertBank.open_or_create(path, lm.fingerprint, lm.source.name, config.spec, dtype)
    try:
        # a resumed build's bar starts at the experts the bank already holds
        held = len(jobs) - len(pending(bank, jobs, config.settings_hash(settings)))
        bar = tqdm(total=len(jobs), initial=held, desc=desc, unit="expert", disable=not progress)
        t0 = time.perf_counter()
        report = train_into_bank(lm.model, lm.tokenizer, jobs, bank, config, chunk_size=chunk_size,
                                 on_chunk=lambda done, total, _chunk: bar.update(held + done - bar.n),
                                 examples_settings=settings)
        bar.close()
        print(f"{len(report.trained)} trained, {len(report.skipped)} skipped in "
              f"{time.perf_counter() - t0:.1f}s; bank {path} holds {len(bank)} experts")
        return report
    finally:
        bank.close()
