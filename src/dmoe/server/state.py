"""Everything one server process holds: the model, the knowledge base, the engine, locks, jobs,
metrics and its limits.

Concurrency model:

- Every generation is a row of one running batch (``dmoe.server.scheduler``): up to ``max_batch``
  rows decode together, each with its own experts, trigger and router; more wait for a free row.
  At most ``max_waiting`` generations may wait or run, more get 503.
- ``model_lock`` (first come, first served) serialises the model and every write to the knowledge
  base: each batch step holds it, and so do deletes and each commit of a build (the worker
  process trains without it; a build run in this process, without ``worker_model``, holds it
  throughout, since training runs forward passes and hooks the model). Writes therefore happen
  between two steps, never while a router names an expert and the engine loads it.
- Reads that never touch the model (listing experts, job status, metrics) take no lock: the bank's
  SQLite connection and the tantivy searcher are safe to read from any thread.
- A change to the knowledge base is visible to the next trigger of every row; a row keeps the
  experts it has already loaded until its next trigger.

This module knows nothing about HTTP.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmoe.engine.triggers import NeverTrigger
from dmoe.experts.lora import LoraSpec
from dmoe.knowledge import KnowledgeBase
from dmoe.server.build_worker import BuildWorker
from dmoe.server.jobs import JobRunner
from dmoe.server.metrics import Metrics, Scraped
from dmoe.server.scheduler import FairLock, Scheduler
from dmoe.training.build import BuildConfig
from dmoe.training.experts import TrainConfig

JOBS_DIR = "jobs"  # inside the bank directory


@dataclass(frozen=True)
class ServerConfig:
    """Access keys and request limits."""

    api_key: str | None = None  # when set, every endpoint requires it (or the admin key)
    admin_key: str | None = None  # when set, management endpoints require exactly this key
    default_max_tokens: int = 64  # when a request gives no max_tokens
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the model's context length minus one
    max_body_bytes: int = 16 << 20  # larger request bodies get 413
    max_waiting: int = 64  # generations waiting for or holding the model; more get 503
    max_batch: int = 8  # generations decoded together (rows of the running batch)

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_tokens_limit", "max_body_bytes", "max_waiting",
                     "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for name in ("api_key", "admin_key"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it unset for no key)")


def longest_token(tokenizer: Any) -> int:
    """Characters the longest vocabulary entry can stand for (byte-level entries: one character
    per byte); 16 when the tokenizer has no vocabulary to ask (a conservative bound for tests'
    byte tokenizers, whose tokens are single bytes)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return 16
    longest = max((len(t) for t in get_vocab()), default=16)
    return max(longest, 1)


class ServerBusy(Exception):
    """More generations are waiting than ``max_waiting`` allows."""


class ServerState:
    """The loaded model + knowledge base + one engine, and what serialises access to them."""

    def __init__(self, lm: Any, kb: KnowledgeBase, config: ServerConfig | None = None,
                 build_config: BuildConfig | None = None, train_config: TrainConfig | None = None,
                 jobs_dir: str | Path | None = None,
                 worker_model: Callable[[], Any] | None = None) -> None:
        """``worker_model``: a picklable factory of the same model (``load_base_model`` with the
        same arguments); with it, builds run in a separate process (``BuildWorker``), without it
        in this one, holding ``model_lock``."""
        self.lm = lm
        self.kb = kb
        self.config = config or ServerConfig()
        self.model_name = str(lm.source.name)
        self.engine = kb.engine(lm, NeverTrigger())  # trigger and router are set per request
        self.bm25 = kb.router()
        self.model_lock = FairLock()
        self.scheduler = Scheduler(self.engine, self.model_lock, self.config.max_batch)
        self.metrics = Metrics()
        train_config = train_config or TrainConfig(spec=kb.bank.spec)
        if train_config.spec != kb.bank.spec:
            raise ValueError(f"train_config.spec {train_config.spec} differs from the bank's "
                             f"{kb.bank.spec}")
        build_config = build_config or BuildConfig()
        worker = None if worker_model is None else BuildWorker(
            worker_model, kb, self.model_lock, build_config, train_config)
        self.jobs = JobRunner(lm, kb, self.model_lock, Path(jobs_dir or kb.bank.path / JOBS_DIR),
                              build_config, train_config, worker=worker)
        self.max_token_chars = longest_token(lm.tokenizer)
        ctx = getattr(lm.model.config, "max_position_embeddings", None)
        self.context_length: int | None = int(ctx) if ctx else None
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @classmethod
    def load(cls, bank: str | Path, model: str | None = None, device: str | None = None,
             weights: str | None = None, config: ServerConfig | None = None,
             build_config: BuildConfig | None = None) -> ServerState:
        """Load the base model and open the bank (created empty when missing); builds run in a
        worker process that loads the same model."""
        from dmoe.base_model import load_base_model, training_weights
        from dmoe.experts.bank import expert_layers

        lm = load_base_model(model, device, weights, float_mlps=expert_layers(bank))
        bank = Path(bank)
        if (bank / "bank.json").is_file():
            kb = KnowledgeBase.open(bank, lm.fingerprint)
        else:
            kb = KnowledgeBase.open_or_create(bank, lm.fingerprint, lm.source.name, LoraSpec())
        return cls(lm, kb, config, build_config,
                   worker_model=functools.partial(load_base_model, model, device,
                                                  training_weights(lm.weights, lm.device),
                                                  training=True))

    def start(self) -> None:
        """Start the batch scheduler and the build worker (idempotent)."""
        self.scheduler.start()
        self.jobs.start()

    def stop(self) -> None:
        """Stop both: open generations end as cancelled; queued jobs stay queued on disk."""
        self.scheduler.stop()
        self.jobs.stop()

    def close(self) -> None:
        self.scheduler.stop()
        self.jobs.close()
        with self.model_lock:
            self.engine.close()
            self.kb.close()

    @property
    def max_prompt_chars(self) -> int | None:
        """Characters above which no prompt can fit ``max_prompt_tokens``: each token covers at
        most ``max_token_chars`` characters (the tokenizer's longest vocabulary entry)."""
        tokens = self.max_prompt_tokens
        return None if tokens is None else tokens * self.max_token_chars

    @property
    def max_prompt_tokens(self) -> int | None:
        if self.config.max_prompt_tokens is not None:
            return self.config.max_prompt_tokens
        return self.context_length - 1 if self.context_length else None

    def admit(self) -> None:
        """Count one generation in, or raise ``ServerBusy``; pair with ``release()``."""
        with self._waiting_lock:
            if self._waiting >= self.config.max_waiting:
                raise ServerBusy(f"{self._waiting} generations are already waiting or running; "
                                 f"retry later")
            self._waiting += 1

    def release(self) -> None:
        with self._waiting_lock:
            assert self._waiting > 0, "release() without admit()"
            self._waiting -= 1

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """``admit()`` for the duration of a block."""
        self.admit()
        try:
            yield
        finally:
            self.release()

    def scraped_metrics(self) -> dict[str, Scraped]:
        """Series read at scrape time, in ``Metrics.render``'s shape."""
        jobs = self.jobs.counts()
        cache = self.kb.experts
        return {
            "dmoe_bank_experts": ("gauge", "Experts in the served bank.", {(): float(len(self.kb))}),
            "dmoe_generations_waiting": ("gauge", "Generations waiting for or holding the model.",
                                         {(): float(self._waiting)}),
            "dmoe_batch_rows": ("gauge", "Generations in the running batch.",
                                {(): float(self.scheduler.running)}),
            "dmoe_batch_steps_total": ("counter", "Batch decode steps.",
                                       {(): float(self.scheduler.steps)}),
            "dmoe_batch_row_steps_total": ("counter", "Rows summed over batch steps (divided by "
                                           "steps: the mean batch size).",
                                           {(): float(self.scheduler.row_steps)}),
            "dmoe_jobs": ("gauge", "Build jobs kept in memory, by status.",
                          {(("status", s),): float(n) for s, n in jobs.items()}),
            "dmoe_expert_cache_lookups_total": ("counter", "Expert cache lookups, by result.",
                                          {(("result", "hit"),): float(cache.hits),
                                           (("result", "miss"),): float(cache.misses)}),
            "dmoe_experts_dropped_total": ("counter", "Routed experts left out of a step because "
                                           "their file is corrupt or unusable.",
                                           {(): float(self.kb.dropped)}),
            "dmoe_experts_unusable": ("gauge", "Distinct experts found unusable since the bank "
                                      "last changed.", {(): float(len(self.kb.unusable))}),
        }
