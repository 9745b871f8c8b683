"""Knowledge builds in a separate process, so that serving never waits for training.

The worker process loads its own copy of the base model (``make_model``, a picklable factory) and
runs ``dmoe.training.build.build_into`` for one job at a time. It never writes the bank's rows or
the index: the server holds the bank's one-writer lock and stays the only writer. Instead:

- reads (which experts exist, with which hashes) go through the worker's own read-only SQLite
  connection, which sees every commit at once;
- a trained expert's file is written into ``experts/`` directly (``ExpertBank.stage``): no row
  points at it yet, so nothing can route to it, and a crash leaves a leftover that the next
  build's quarantine pass moves away;
- every write (commit a document = rows + index, delete a document, sync the index, quarantine
  leftovers) is a call sent to the server, which runs it under ``model_lock``, i.e. between two
  batch steps (all but the quarantine pass, which moves only files no row points at), and answers
  with the result. A document's experts therefore appear to every row's
  next trigger at once: one SQLite transaction, then one index commit.

Training, augmentation and the trunk passes hold no lock, so answers go on during a build (they
share the CPU cores with it). If the worker dies, the job fails with the reason; what it had
committed stays, and a resubmitted job skips it.

This module knows nothing about HTTP or the job queue (``dmoe.server.jobs`` drives it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dmoe.errors import DmoeError, redact
from dmoe.experts.bank import DocumentChange, ExpertBank, Staged, StagingBank
from dmoe.knowledge import KnowledgeBase
from dmoe.training.build import BuildConfig, BuildSummary, build_into
from dmoe.training.experts import TrainConfig

log = logging.getLogger("dmoe.server")
Call = Callable[..., Any]  # (name, *args) -> the server's answer


class BuildWorkerError(DmoeError):
    """The build worker died, or a write it asked the server for failed."""


class WorkerBank(StagingBank):
    """The bank as the worker sees it: read-only rows, directly staged files, writes by call."""

    def __init__(self, path: Path, call: Call) -> None:
        super().__init__(path)
        self._call = call

    def commit_document(self, doc_id: str, staged: Sequence[Staged],
                        keep: Any = ()) -> DocumentChange:
        change: DocumentChange = self._call("commit_document", doc_id, [s.row for s in staged],
                                            sorted(keep))
        return change

    def quarantine_leftovers(self) -> list[str]:
        moved: list[str] = self._call("quarantine_leftovers")
        return moved


class WorkerKnowledge:
    """``build_into``'s view of the served knowledge base, from the worker (``BuildTarget``)."""

    def __init__(self, bank: WorkerBank) -> None:
        self._bank = bank

    @property
    def bank(self) -> ExpertBank:
        return self._bank

    def indexed(self, change: DocumentChange, staged: Sequence[Staged]) -> None:
        """Nothing to do: the server indexed the document in the same call as its commit."""

    def delete_document(self, doc_id: str) -> DocumentChange:
        change: DocumentChange = self._bank._call("delete_document", doc_id)
        return change

    def sync(self) -> Any:
        return self._bank._call("sync")

    def invalidate(self, expert_ids: Sequence[str] | None = None) -> None:
        """Nothing to do: the server forgets what each of its writes changed."""


def _worker_main(conn: Connection, make_model: Callable[[], Any], bank_path: str,
                 build_config: BuildConfig, train_config: TrainConfig, threads: int) -> None:
    """The worker process: load the model, then run one build per corpus path received."""
    import torch

    torch.set_num_threads(threads)
    lm = make_model()
    conn.send(("ready", lm.fingerprint))

    def call(name: str, *args: Any) -> Any:
        conn.send(("call", name, args))
        kind, value = conn.recv()
        if kind == "error":
            raise BuildWorkerError(f"the server could not {name.replace('_', ' ')}: {value}")
        return value

    while (corpus := conn.recv()) is not None:
        bank = WorkerBank(Path(bank_path), call)
        try:
            summary = build_into(WorkerKnowledge(bank), corpus, lm, build_config, train_config,
                                 progress=False, log=lambda line: conn.send(("log", line)),
                                 on_progress=lambda s, d, t: conn.send(("progress", s, d, t)))
            conn.send(("done", summary))
        except Exception as e:
            expected = isinstance(e, DmoeError | ValueError | FileNotFoundError)
            conn.send(("failed", redact(f"{type(e).__name__}: {e}"), expected))
        finally:
            bank.close()


class BuildWorker:
    """The server's side: starts the process on first use, runs builds through it, and applies
    the writes it asks for under ``model_lock``."""

    def __init__(self, make_model: Callable[[], Any], kb: KnowledgeBase,
                 model_lock: AbstractContextManager[Any], build_config: BuildConfig,
                 train_config: TrainConfig, threads: int | None = None) -> None:
        self.make_model = make_model
        self.kb = kb
        self.model_lock = model_lock
        self.build_config = build_config
        self.train_config = train_config
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._proc: Any = None
        self._conn: Connection | None = None
        self.busy = False  # a build is running through the worker
        self.closing = False  # close() was called: a build cut off now is not a failure

    def _start(self) -> Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self.closing = False  # a new start after a close()
        ctx = multiprocessing.get_context("spawn")  # no fork of a process running torch threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, name="dmoe-build-worker", daemon=True,
                                 args=(child, self.make_model, str(self.kb.bank.path),
                                       self.build_config, self.train_config, self.threads))
        self._proc.start()
        child.close()
        self._conn = parent
        kind, fingerprint = self._recv(parent)
        if fingerprint != self.kb.bank.fingerprint:
            self.close()
            raise BuildWorkerError(f"the build worker loaded a model with fingerprint "
                                   f"{fingerprint}, the bank holds {self.kb.bank.fingerprint}")
        return parent

    def _recv(self, conn: Connection) -> Any:
        try:
            return conn.recv()
        except (EOFError, OSError):
            proc, self._proc, self._conn = self._proc, None, None
            code = None
            if proc is not None:
                proc.join(5)
                code = proc.exitcode
            raise BuildWorkerError(f"the build worker process died (exit code {code}); experts "
                                   f"it committed are kept, resubmit to finish") from None

    def run(self, corpus: Path, on_progress: Callable[[str, int, int], None],
            on_log: Callable[[str], None]) -> BuildSummary:
        """Build ``corpus`` into the served bank through the worker; its summary."""
        conn = self._start()
        conn.send(str(corpus))
        self.busy = True
        try:
            return self._serve(conn, on_progress, on_log)
        finally:
            self.busy = False

    def _serve(self, conn: Connection, on_progress: Callable[[str, int, int], None],
               on_log: Callable[[str], None]) -> BuildSummary:
        while True:
            msg = self._recv(conn)
            kind = msg[0]
            if kind == "call":
                answer = self._apply(msg[1], msg[2])
                try:
                    conn.send(answer)
                except OSError:
                    self._recv(conn)  # the worker is gone: raises BuildWorkerError
            elif kind == "progress":
                on_progress(*msg[1:])
            elif kind == "log":
                on_log(msg[1])
            elif kind == "done":
                summary: BuildSummary = msg[1]
                return summary
            else:
                error, expected = msg[1], msg[2]
                raise (ValueError(error) if expected else BuildWorkerError(error))

    def _apply(self, name: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        """One write the worker asked for, between two batch steps: ("ok", result) or ("error",
        the reason)."""
        kb = self.kb
        try:
            if name == "quarantine_leftovers":  # only files no row points at: no reader's concern
                return "ok", kb.bank.quarantine_leftovers()
            with self.model_lock:
                if self.closing:  # shutting down: the job resumes on restart, and redoes this
                    return "error", "the server is shutting down"
                if name == "commit_document":
                    doc_id, rows, keep = args
                    staged = [Staged(row) for row in rows]
                    change = kb.bank.commit_document(doc_id, staged, keep=keep)
                    kb.indexed(change, staged)  # bank first, then index (knowledge.py)
                    return "ok", change
                if name == "delete_document":
                    return "ok", kb.delete_document(args[0])
                if name == "sync":
                    report = kb.sync()
                    kb.invalidate()
                    return "ok", report
                return "error", f"unknown call {name!r}"
        except Exception as e:
            log.exception("build worker call %s failed", name)
            return "error", redact(f"{type(e).__name__}: {e}")

    def close(self, timeout: float = 10.0) -> None:
        """End the worker process; a build in progress is cut off at once (its job stays
        unfinished on disk and resumes on the next start)."""
        self.closing = True
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return
        if self.busy:
            proc.terminate()
        else:
            try:
                if conn is not None:
                    conn.send(None)
            except OSError:
                pass
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout)
        if conn is not None:
            conn.close()
