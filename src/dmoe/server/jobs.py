"""Background build jobs: posted documents -> ``dmoe.training.build.build`` into the served bank.

One worker thread runs the queued jobs one at a time. A job writes its documents to
``JOBS_DIR/<job id>/documents.jsonl`` (the corpus format ``dmoe build`` reads) and its status to
``job.json`` beside it, then calls ``build`` on the server's bank directory.

Locking. A build runs forward passes through the served model (the fast trainer hooks the last
layer's norm to stop the trunk early, which would break a generation running at the same time) and
writes the bank and the index, so the whole build holds the server's ``model_lock``: generations and
deletes wait for it, and it waits for them. ``build`` opens its own ``KnowledgeBase`` on the same
directory, so the server's index first releases tantivy's writer lock (``index.close()``, after
which it stays readable and takes the writer again on its next write); afterwards the server's
knowledge base re-reads the index, re-syncs it with the bank and forgets its cached experts, so the
next request sees the new experts.

Jobs live in memory (the newest ``keep``); a restart forgets them, not the experts they built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.errors import DmoeError
from dmoe.knowledge import KnowledgeBase
from dmoe.training.build import BuildConfig, build
from dmoe.training.experts import TrainConfig

log = logging.getLogger("dmoe.server")


@dataclass
class Job:
    """One build request and its progress (mutated only by the worker thread)."""

    id: str
    documents: int
    corpus: Path
    status: str = "queued"  # queued | running | succeeded | failed
    stage: str = "waiting"  # waiting | augment | train | done
    done: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    expert_ids: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "documents": self.documents,
                "stage": self.stage, "done": self.done, "total": self.total,
                "created": self.created, "started": self.started, "finished": self.finished,
                "expert_ids": self.expert_ids, "summary": self.summary, "error": self.error}


def document_id(doc: dict[str, Any]) -> str:
    """A posted document's id: its own, else a content hash (re-posting the same text is a no-op)."""
    return str(doc.get("id") or "doc-" + hashlib.sha256(doc["text"].encode()).hexdigest()[:12])


class JobRunner:
    """Queue of build jobs and the one thread that runs them."""

    def __init__(self, lm: Any, kb: KnowledgeBase, model_lock: threading.Lock, jobs_dir: Path,
                 build_config: BuildConfig, train_config: TrainConfig, keep: int = 100) -> None:
        self.lm = lm
        self.kb = kb
        self.model_lock = model_lock
        self.jobs_dir = Path(jobs_dir)
        self.build_config = build_config
        self.train_config = train_config
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()  # guards _jobs
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="dmoe-build", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job (queued ones are dropped) and end the worker thread."""
        if self._thread is None:
            return
        while True:  # drop what has not started
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.status, job.error, job.finished = "failed", "server shut down", time.time()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    # -- API -------------------------------------------------------------------------------------

    def submit(self, documents: Sequence[dict[str, Any]]) -> Job:
        """Write the documents to the job's corpus file and queue the build."""
        job_id = "job-" + uuid.uuid4().hex[:12]
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True, exist_ok=True)
        corpus = folder / "documents.jsonl"
        with corpus.open("w", encoding="utf-8") as f:
            for doc in documents:
                record = {"id": document_id(doc), "title": doc.get("title") or "", "text": doc["text"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        job = Job(id=job_id, documents=len(documents), corpus=corpus)
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        self._save(job)
        self.start()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(("queued", "running", "succeeded", "failed"), 0)
            for job in self._jobs.values():
                out[job.status] += 1
            return out

    # -- worker ----------------------------------------------------------------------------------

    def _save(self, job: Job) -> None:
        path = job.corpus.parent / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.to_dict(), indent=1))
        tmp.replace(path)

    def _progress(self, job: Job, stage: str, done: int, total: int) -> None:
        job.stage, job.done, job.total = stage, done, total

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as e:  # a failed build must not kill the worker
                if not isinstance(e, DmoeError | ValueError | FileNotFoundError):
                    log.exception("build job %s failed", job.id)
                job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            job.finished = time.time()
            self._save(job)

    def _run(self, job: Job) -> None:
        with self.model_lock:
            job.status, job.started = "running", time.time()
            self._save(job)
            kb = self.kb
            with kb.lock:
                kb.index.close()  # release tantivy's writer lock for build()'s own index handle
                try:
                    summary = build(job.corpus, kb.bank.path, self.lm, self.build_config,
                                    self.train_config, progress=False,
                                    log=lambda line: log.info("%s: %s", job.id, line),
                                    on_progress=lambda s, d, t: self._progress(job, s, d, t))
                finally:
                    kb.index.refresh()
                    kb.sync()
                    kb.experts.invalidate()
        job.summary = summary.to_dict()
        job.expert_ids = summary.expert_ids
        job.stage, job.status = "done", "succeeded"
