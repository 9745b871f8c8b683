"""Background build jobs: posted documents -> ``dmoe.training.build.build_into`` the served bank.

One worker thread runs the queued jobs one at a time. A job writes its documents to
``JOBS_DIR/<job id>/documents.jsonl`` (the corpus format ``dmoe build`` reads, fsync'd before the
job is acknowledged) and its status to the table ``jobs`` of the bank's own SQLite database, so
jobs survive a restart: on start, a job that was queued or running when the server died is queued
again and resumed (the build skips what is already stored), or marked failed with the reason when
its documents are gone. A finished job's folder is removed; its row stays queryable (the newest
``keep`` rows are kept).

Where builds run. With a ``BuildWorker`` (what ``dmoe serve`` uses), in a separate process with its
own model copy (``dmoe.server.build_worker``): training holds no lock, and only each write to the
bank and index waits for the server's ``model_lock`` (one batch step at most). Without one (tests,
embedding with an in-memory model) the build runs in this process through the served model (the
fast trainer hooks the last layer's norm to stop the trunk early, which would break a generation
running at the same time), so the whole build holds ``model_lock`` and answers wait for it.
Either way the build writes through the server's own knowledge base (the server holds the bank
lock for its lifetime), which forgets the cached experts of every document it commits, so the next
trigger sees the new experts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.errors import DmoeError, redact
from dmoe.experts.bank import DB_FILE
from dmoe.faults import kill_point
from dmoe.knowledge import KnowledgeBase
from dmoe.server.build_worker import BuildWorker, BuildWorkerError
from dmoe.training.build import BuildConfig, build_into
from dmoe.training.experts import TrainConfig

log = logging.getLogger("dmoe.server")
CORPUS_FILE = "documents.jsonl"


JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, stage TEXT NOT NULL, done INTEGER NOT NULL,
    total INTEGER NOT NULL, documents INTEGER NOT NULL, created REAL NOT NULL, started REAL,
    finished REAL, expert_ids TEXT NOT NULL, summary TEXT, error TEXT);
"""
_JOB_COLUMNS = ("id", "status", "stage", "done", "total", "documents", "created", "started",
                "finished", "expert_ids", "summary", "error")


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


class JobStore:
    """The ``jobs`` table of the bank's database (its own connection, safe across threads)."""

    def __init__(self, db_path: Path, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(JOBS_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def save(self, job: Job) -> None:
        d = job.to_dict()
        d["expert_ids"] = json.dumps(d["expert_ids"])
        d["summary"] = None if d["summary"] is None else json.dumps(d["summary"])
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({','.join(_JOB_COLUMNS)}) VALUES "
                             f"({','.join('?' * len(_JOB_COLUMNS))})",
                             tuple(d[c] for c in _JOB_COLUMNS))

    def _job(self, row: tuple[Any, ...]) -> Job:
        d = dict(zip(_JOB_COLUMNS, row, strict=True))
        d["expert_ids"] = json.loads(d["expert_ids"])
        d["summary"] = None if d["summary"] is None else json.loads(d["summary"])
        return Job(corpus=self.jobs_dir / d["id"] / CORPUS_FILE, **d)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(_JOB_COLUMNS)} FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def unfinished(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(_JOB_COLUMNS)} FROM jobs WHERE status IN "
                                    f"('queued', 'running') ORDER BY created").fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("queued", "running", "succeeded", "failed"), 0)
        with self._lock:
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
                out[status] = int(n)
        return out

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` finished jobs' rows."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE status IN ('succeeded', 'failed') AND id NOT "
                             "IN (SELECT id FROM jobs ORDER BY created DESC LIMIT ?)", (keep,))


def document_id(doc: dict[str, Any]) -> str:
    """A posted document's id: its own, else a content hash (re-posting the same text is a no-op)."""
    return str(doc.get("id") or "doc-" + hashlib.sha256(doc["text"].encode()).hexdigest()[:12])


class JobRunner:
    """Queue of build jobs and the one thread that runs them."""

    def __init__(self, lm: Any, kb: KnowledgeBase, model_lock: AbstractContextManager[Any], jobs_dir: Path,
                 build_config: BuildConfig, train_config: TrainConfig, keep: int = 1000,
                 worker: BuildWorker | None = None) -> None:
        self.lm = lm
        self.kb = kb
        self.model_lock = model_lock
        self.jobs_dir = Path(jobs_dir)
        self.build_config = build_config
        self.train_config = train_config
        self.keep = keep
        self.worker = worker  # None: builds run in this process, under model_lock
        self.store = JobStore(kb.bank.path / DB_FILE, self.jobs_dir)
        self._live: dict[str, Job] = {}  # the job running now (its progress is not saved per step)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume what a previous process left unfinished, prune finished jobs' files, and start
        the worker thread."""
        if self._thread is not None:
            return
        for job in self.store.unfinished():
            if job.corpus.is_file():
                job.status, job.stage, job.done, job.total = "queued", "waiting", 0, 0
                log.warning("resuming build job %s, interrupted by a restart", job.id)
                self.store.save(job)
                self._queue.put(job)
            else:
                self._finish(job, "failed", "interrupted by a restart, and its documents file "
                                            "is gone")
        if self.jobs_dir.is_dir():
            for folder in sorted(self.jobs_dir.iterdir()):
                known = self.store.get(folder.name)
                if known is None and self._unfinished_legacy(folder):
                    self._adopt(folder)
                elif known is None or known.status in ("succeeded", "failed"):
                    shutil.rmtree(folder, ignore_errors=True)
        self._thread = threading.Thread(target=self._work, name="dmoe-build", daemon=True)
        self._thread.start()

    @staticmethod
    def _unfinished_legacy(folder: Path) -> bool:
        """A job folder of a dmoe that kept jobs in memory, whose ``job.json`` never finished."""
        try:
            status = json.loads((folder / "job.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return False
        return status in ("queued", "running") and (folder / CORPUS_FILE).is_file()

    def _adopt(self, folder: Path) -> None:
        corpus = folder / CORPUS_FILE
        n = sum(1 for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip())
        job = Job(id=folder.name, documents=n, corpus=corpus)
        log.warning("resuming build job %s, left unfinished by an older dmoe", job.id)
        self.store.save(job)
        self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """End the worker thread; queued jobs stay queued in the database and resume on the next
        start. A job running in the build worker is cut off (it resumes on the next start too);
        one running in this process is finished first."""
        if self._thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            if self.worker is not None:
                self.worker.close()
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    # -- API -------------------------------------------------------------------------------------

    def submit(self, documents: Sequence[dict[str, Any]]) -> Job:
        """Write the documents to the job's corpus file, record the job, and queue it."""
        job_id = "job-" + uuid.uuid4().hex[:12]
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True, exist_ok=True)
        corpus = folder / CORPUS_FILE
        with corpus.open("w", encoding="utf-8") as f:
            for doc in documents:
                record = {"id": document_id(doc), "title": doc.get("title") or "", "text": doc["text"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        job = Job(id=job_id, documents=len(documents), corpus=corpus)
        self.store.save(job)
        self.store.prune(self.keep)
        kill_point("job.submitted")
        self.start()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._live.get(job_id) or self.store.get(job_id)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    # -- worker ----------------------------------------------------------------------------------

    def _progress(self, job: Job, stage: str, done: int, total: int) -> None:
        job.stage, job.done, job.total = stage, done, total

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        self.store.save(job)
        self._live.pop(job.id, None)
        shutil.rmtree(job.corpus.parent, ignore_errors=True)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception as e:  # a failed build must not kill the worker
                if isinstance(e, BuildWorkerError) and self.worker is not None \
                        and self.worker.closing:
                    self._live.pop(job.id, None)  # cut off by a shutdown: resumes on restart
                    continue
                if not isinstance(e, DmoeError | ValueError | FileNotFoundError):
                    log.exception("build job %s failed", job.id)
                self._finish(job, "failed", redact(f"{type(e).__name__}: {e}"))
            else:
                self._finish(job, "succeeded")

    def _begin(self, job: Job) -> None:
        job.status, job.started = "running", time.time()
        self._live[job.id] = job
        self.store.save(job)
        kill_point("job.started")

    def _run(self, job: Job) -> None:
        def on_log(line: str) -> None:
            log.info("%s: %s", job.id, line)

        def on_progress(stage: str, done: int, total: int) -> None:
            self._progress(job, stage, done, total)

        if self.worker is not None:
            self._begin(job)
            summary = self.worker.run(job.corpus, on_progress, on_log)
        else:
            with self.model_lock:
                self._begin(job)
                summary = build_into(self.kb, job.corpus, self.lm, self.build_config,
                                     self.train_config, progress=False, log=on_log,
                                     on_progress=on_progress)
        job.summary = summary.to_dict()
        job.expert_ids = summary.expert_ids
        job.stage = "done"
