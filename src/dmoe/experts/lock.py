"""The bank's one-writer lock: an advisory ``flock`` on ``BANK/bank.lock`` holding the owner's PID.

Every command that writes a bank (``dmoe build``, ``experts rm``, ``bank check --repair``,
``dmoe serve``) takes it before doing any work, so a second writer fails at once, naming the process
that holds it, instead of failing halfway (or corrupting the index) after minutes of training. The
kernel releases the lock when its holder dies, ``kill -9`` included; a stale PID in the file is
harmless. Within one process the lock is shared and counted (several handles on one bank in one
process are that process's business: the server's job runner writes through the server's own bank).

This module knows nothing about what a bank holds.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from pathlib import Path

from dmoe.errors import BankLockedError

LOCK_FILE = "bank.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, holders in this process)
_guard = threading.Lock()


def _who(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return text or "another process"


class BankLock:
    """Holds the bank-wide write lock from ``acquire()`` until ``release()``."""

    def __init__(self, bank_dir: str | Path) -> None:
        self.path = Path(bank_dir) / LOCK_FILE
        self._key = str(self.path.resolve())
        self.held = False

    def acquire(self) -> BankLock:
        with _guard:
            if self._key in _held:
                fd, n = _held[self._key]
                _held[self._key] = (fd, n + 1)
                self.held = True
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BankLockedError(
                    f"the bank {self.path.parent.name!r} is being written by {_who(self.path)}; "
                    f"wait for it to finish (one writer at a time)") from None
            os.ftruncate(fd, 0)
            cmd = " ".join(os.path.basename(a) for a in sys.argv[:2])
            os.pwrite(fd, f"PID {os.getpid()} ({cmd})\n".encode(), 0)
            _held[self._key] = (fd, 1)
            self.held = True
            return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _guard:
            fd, n = _held[self._key]
            if n > 1:
                _held[self._key] = (fd, n - 1)
                return
            del _held[self._key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> BankLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
