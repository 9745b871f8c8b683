"""The server's one running batch: every generation is a row of one ``BatchEngine``.

A request thread calls ``submit`` and gets a ``Ticket``. The scheduler thread takes new tickets
into the batch between steps and runs one step at a time under ``model_lock``, so a delete or a
build waits at most one step (the lock is first come, first served: ``FairLock``). Each committed
token goes to its ticket's ``on_token`` (called on the scheduler thread: it must be quick, and what
it raises is logged and ignored). A finished row resolves its ticket; ``Ticket.cancel`` frees the
row before the next step. A failure inside a step fails every ticket then in the batch with that
error and the batch starts afresh: the scheduler keeps serving.

This module knows nothing about HTTP or request schemas.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from dmoe.engine.batch import BatchEngine, Request
from dmoe.engine.decode import Engine, Generation

log = logging.getLogger("dmoe.server")


class FairLock:
    """A mutex handed out in arrival order (``threading.Lock`` lets a thread that releases and
    re-acquires in a loop, like the scheduler, starve everyone else)."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that may hold the lock

    def acquire(self) -> None:
        with self._cv:
            ticket = self._next
            self._next += 1
            self._cv.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GenerationCancelled(Exception):
    """The ticket was cancelled (its client went away) before its generation finished."""


class Ticket:
    """One submitted generation: ``wait()`` for it, or ``cancel()`` it."""

    def __init__(self, request: Request, before_admit: Callable[[], None] | None,
                 on_done: Callable[[Ticket], None] | None, wake: Callable[[], None]) -> None:
        self.request = request
        self.before_admit = before_admit
        self._on_done = on_done
        self._wake = wake
        self._done = threading.Event()
        self.cancelled = threading.Event()
        self.result: Generation | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        self._wake()

    def wait(self, timeout: float | None = None) -> Generation:
        """The generation; raises what failed it (``GenerationCancelled`` if cancelled)."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _resolve(self, gen: Generation) -> None:
        self.result = gen
        self._finish()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._on_done is not None:
            _quiet(self._on_done)(self)


def _quiet(callback: Callable[..., None]) -> Callable[..., None]:
    def call(*args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a client's stream must not break the other rows
            log.exception("token callback failed")
    return call


class Scheduler:
    """Owns a ``BatchEngine`` over ``engine`` and the thread that steps it."""

    def __init__(self, engine: Engine, model_lock: FairLock, max_batch: int = 8) -> None:
        self.engine = engine
        self.model_lock = model_lock
        self.max_batch = max_batch
        self._batch = BatchEngine(engine, max_batch)
        self._cv = threading.Condition()
        self._incoming: deque[Ticket] = deque()
        self._rows: dict[int, Ticket] = {}  # batch request id -> ticket
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batch steps run
        self.row_steps = 0  # rows over all steps (row_steps / steps = the mean batch size)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dmoe-batch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish nothing more: every open ticket fails with ``GenerationCancelled``."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request, before_admit: Callable[[], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Queue a generation. ``before_admit`` runs under the model lock just before the request
        joins the batch (e.g. to re-check that pinned experts still exist); what it raises fails
        the ticket. ``on_done(ticket)`` runs once when the ticket resolves or fails (on the
        scheduler thread, or on this one if the scheduler is not running)."""
        if request.on_token is not None:
            request.on_token = _quiet(request.on_token)
        ticket = Ticket(request, before_admit, on_done, self._wake)
        with self._cv:
            running = not self._stopping and self._thread is not None
            if running:
                self._incoming.append(ticket)
                self._cv.notify_all()
        if not running:
            ticket._fail(GenerationCancelled("the server is not running"))
        return ticket

    @property
    def running(self) -> int:
        return self._batch.running

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or bool(self._incoming)
                                  or self._batch.busy)
                if self._stopping:
                    break
                incoming = list(self._incoming)
                self._incoming.clear()
            with self.model_lock:
                self._admit(incoming)
                self._drop_cancelled()
                try:
                    finished = self._batch.step()
                    self.steps += 1
                    self.row_steps += self._batch.running + len(finished)  # rows that committed
                except Exception as e:
                    log.exception("a batch step failed; failing its %d rows", len(self._rows))
                    self._fail_all(e)
                    continue
            for rid, gen in finished:
                self._rows.pop(rid)._resolve(gen)
        with self.model_lock:
            self._fail_all(GenerationCancelled("the server is shutting down"))
        with self._cv:
            for ticket in self._incoming:
                ticket._fail(GenerationCancelled("the server is shutting down"))
            self._incoming.clear()

    def _admit(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            if ticket.cancelled.is_set():
                ticket._fail(GenerationCancelled())
                continue
            try:
                if ticket.before_admit is not None:
                    ticket.before_admit()
                self._rows[self._batch.submit(ticket.request)] = ticket
            except Exception as e:
                ticket._fail(e)

    def _drop_cancelled(self) -> None:
        for rid, ticket in list(self._rows.items()):
            if ticket.cancelled.is_set():
                self._batch.cancel(rid)
                del self._rows[rid]
                ticket._fail(GenerationCancelled())

    def _fail_all(self, error: BaseException) -> None:
        for ticket in self._rows.values():
            ticket._fail(error)
        self._rows.clear()
        self._batch = BatchEngine(self.engine, self.max_batch)
        self.engine.adapter.activate([])
