"""``dmoe build --executor ray``: the build's two heavy stages on a Ray cluster.

The pipeline is ``build_into``'s, unchanged; only where its two heavy stages run differs:

- **augmentation**: a Ray Data ``map_batches`` over chunks of units, in a pool of CPU actors (an
  LLM augmenter loads the model once per actor);
- **training**: a Ray Data ``map_batches`` over chunks of jobs, in a pool of actors that each load
  the base model once (with one GPU each when the cluster has GPUs), cache the frozen trunk and
  train their chunk (``train_and_stage``, the local build's stage function), then write the expert
  files straight into the bank directory (on several machines: a shared filesystem);
- **this process** stays the one writer: it appends to the augmentation cache, and commits each
  document (one SQLite transaction, then the index) as soon as its chunks come back.

A staged expert file is invisible until its document is committed, so a worker that dies loses
nothing committed: Ray restarts it and retries its chunk (``max_retries`` times), and whatever it
left behind is moved to ``quarantine/`` when the build ends, fails or is rerun. A rerun skips every
expert already stored with the same content and settings, as a local rerun does.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dmoe.augment.types import Augmentation
from dmoe.corpus.units import KnowledgeUnit
from dmoe.errors import DmoeError
from dmoe.faults import ENV as FAULT_ENV
from dmoe.training.builder import ChunkWork, Outcome

log = logging.getLogger("dmoe.build")


class RayBuildError(DmoeError):
    """A chunk failed on the cluster even after its retries."""


def require_ray() -> None:
    """A one-line error when Ray is missing, before any model is loaded."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DmoeError("--executor ray needs Ray Data: pip install 'dmoe[ray]'") from e


def worker_model(spec: str | None = None, weights: str | None = None) -> Callable[[], Any]:
    """A picklable factory of the base model for the workers (like the server's build worker):
    ``--model`` and ``--weights`` as given, on the worker's own device (CUDA when it has one),
    with float weights for training."""
    from dmoe.base_model import load_base_model

    return functools.partial(load_base_model, spec, None, weights, training=True)


class _AugmentWorker:
    """A Ray Data actor: builds the augmenter once, then augments one chunk per row."""

    def __init__(self, augmenter: str, batch_size: int, make_model: Callable[[], Any],
                 threads: int) -> None:
        import torch

        from dmoe.augment import make_augmenter

        torch.set_num_threads(threads)
        needs_model = augmenter in ("self", "spans")
        loaded = make_model() if needs_model else None
        self.augmenter = make_augmenter(augmenter, loaded=loaded, batch_size=batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = [pickle.dumps(self.augmenter.augment(pickle.loads(p))) for p in batch["payload"]]
        return {"i": batch["i"], "payload": out}


class _TrainWorker:
    """A Ray Data actor: loads the model once, then trains and stages one chunk per row."""

    def __init__(self, make_model: Callable[[], Any], bank_path: str, train_config: Any,
                 threads: int) -> None:
        import torch

        from dmoe.experts.bank import StagingBank

        torch.set_num_threads(threads)
        self.lm = make_model()
        self.bank = StagingBank(Path(bank_path))
        if self.bank.fingerprint != self.lm.fingerprint:
            raise RayBuildError(f"the worker's model (fingerprint {self.lm.fingerprint}) is not "
                                f"the bank's ({self.bank.fingerprint})")
        self.config = train_config

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from dmoe.training.builder import train_and_stage

        out = []
        for payload in batch["payload"]:
            work: ChunkWork = pickle.loads(payload)
            out.append(pickle.dumps(list(train_and_stage(self.lm.model, self.lm.tokenizer, work,
                                                         self.config, self.bank))))
        return {"i": batch["i"], "payload": out}


class RayExecutor:
    """Runs ``build_into``'s augmentation and training chunks on a Ray cluster (``Executor``).

    ``address``: ``None`` starts a local cluster in this process (``num_cpus``); ``"auto"`` or
    ``HOST:PORT`` joins a running one. Use it as a context manager; a cluster it started is shut
    down on exit.
    """

    def __init__(self, make_model: Callable[[], Any], bank_path: str | Path, build_config: Any,
                 train_config: Any, *, address: str | None = None, num_cpus: int | None = None,
                 workers: int | None = None, threads_per_worker: int = 1,
                 max_retries: int = 2) -> None:
        self.make_model = make_model
        self.bank_path = str(bank_path)
        self.build_config = build_config
        self.train_config = train_config
        self.address = address
        self.num_cpus = num_cpus
        self.workers = workers
        self.threads = threads_per_worker
        self.max_retries = max_retries
        self._started = False

    def __enter__(self) -> RayExecutor:
        import ray
        import ray.data

        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=True)
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # dmoe's own bars report progress, as in a local build
        ctx.verbose_stats_logs = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    # -- what the cluster offers ---------------------------------------------------------------

    def _gpus(self) -> int:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))

    def _pool(self, gpu: bool) -> int:
        import ray

        if self.workers is not None:
            return self.workers
        if gpu:
            return max(self._gpus(), 1)
        return max(int(ray.cluster_resources().get("CPU", 1)) // self.threads, 1)

    def _runtime_env(self) -> dict[str, Any] | None:
        if os.environ.get(FAULT_ENV):  # the fault suite's kill points reach the workers too
            return {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
        return None

    def _map(self, payloads: Sequence[bytes], worker: type, kwargs: dict[str, Any],
             gpu: bool) -> Iterator[tuple[int, Any]]:
        """Rows ``{i, payload}`` through an actor pool of ``worker``; ``(i, result)`` as rows
        finish, in any order."""
        import ray.data

        if not payloads:
            return
        items = [{"i": i, "payload": p} for i, p in enumerate(payloads)]
        size = min(self._pool(gpu), len(items))
        with warnings.catch_warnings():  # retries have no named parameter in Ray 2.60 yet
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                worker, fn_constructor_kwargs=kwargs, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=size), num_cpus=self.threads,
                num_gpus=1 if gpu else 0, runtime_env=self._runtime_env(),
                max_restarts=self.max_retries, max_task_retries=self.max_retries)
        try:
            for row in ds.iter_rows():
                yield int(row["i"]), pickle.loads(row["payload"])
        except Exception as e:  # a worker died for good, or raised: Ray wraps either
            raise RayBuildError(f"a build chunk failed on the Ray cluster after "
                                f"{self.max_retries} retries: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e

    # -- Executor --------------------------------------------------------------------------------

    def augment_chunks(self, chunks: Sequence[Sequence[KnowledgeUnit]]
                       ) -> Iterator[tuple[int, list[Augmentation]]]:
        cfg = self.build_config
        kwargs = {"augmenter": cfg.augmenter, "batch_size": cfg.augment_batch,
                  "make_model": self.make_model, "threads": self.threads}
        yield from self._map([pickle.dumps(list(c)) for c in chunks], _AugmentWorker, kwargs,
                             gpu=False)

    def train_chunks(self, works: Sequence[ChunkWork]) -> Iterator[tuple[int, list[Outcome]]]:
        kwargs = {"make_model": self.make_model, "bank_path": self.bank_path,
                  "train_config": self.train_config, "threads": self.threads}
        yield from self._map([pickle.dumps(w) for w in works], _TrainWorker, kwargs,
                             gpu=self._gpus() > 0)
