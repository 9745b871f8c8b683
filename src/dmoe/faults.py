"""Seeded crash points for the fault suite: ``DMOE_FAULT_KILL_AT=<point>:<n>`` makes the process
``SIGKILL`` itself the n-th time it reaches ``kill_point("<point>")``.

The points sit on the write paths of the bank, the build and the server's jobs, at the moments a
crash is worst (a file written but its row not committed, a transaction committed but old files not
yet removed, ...). Unset, a point costs one dict lookup. This is how ``tests/test_faults.py`` and
``dmoe bench faults`` prove that ``kill -9`` at any of them loses nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "DMOE_FAULT_KILL_AT"
POINTS = (
    "build.augmented",  # units augmented (and cached), nothing trained yet
    "build.chunk_trained",  # a chunk of experts trained, none of its files written
    "bank.staged",  # one expert file written and renamed into place, no row points at it
    "bank.in_transaction",  # inside a document's transaction: old rows deleted, not committed
    "bank.committed",  # a document committed, the files it replaced not yet removed
    "build.indexed",  # a chunk's documents committed and indexed, the build not finished
    "job.submitted",  # a server job recorded (queued), its build not started
    "job.started",  # a server job marked running, its build not started
)
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, n = spec.rpartition(":")
    return (name, int(n)) if name and n.isdigit() else (spec, 1)


def kill_point(name: str) -> None:
    """``SIGKILL`` this process if ``$DMOE_FAULT_KILL_AT`` names this point and this hit."""
    assert name in POINTS, f"unknown kill point {name!r}"
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
