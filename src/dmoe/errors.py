"""User-facing error hierarchy.

Everything here is an expected failure a user can fix (a missing model, a bad argument, a bank built
for another model). The CLI prints these as one line; internal invariants use ``assert`` instead.
"""

import re


class DmoeError(Exception):
    """Base class of every error the CLI and server turn into a friendly message."""


class ModelNotFoundError(DmoeError):
    """The base model could not be located; the message lists every place that was tried."""


class UnsupportedModelError(DmoeError):
    """The model's architecture lacks what final-layer experts need (a gate/up/down MLP)."""


class ExpertFormatError(DmoeError):
    """An expert file is malformed or does not fit the attached model."""


class RouterIndexError(DmoeError):
    """A router index is missing, was written by an incompatible format version, or is locked."""


class BankError(DmoeError):
    """An expert bank is missing, malformed, inconsistent, or asked to do something it cannot."""


class WrongBaseModelError(BankError):
    """A bank (or expert) was built for a different base model than the one loaded."""


class CorpusError(DmoeError):
    """A corpus file cannot be read, or (with ``strict=True``) holds a bad record; names file:line."""


class AugmentError(DmoeError):
    """An augmenter cannot run: an unset endpoint, a failing HTTP call, an unreadable cache."""


class BankLockedError(BankError):
    """Another process is writing the bank; the message names its PID."""


class BankDatabaseError(BankError):
    """The bank's SQLite database is missing or unreadable (``bank check --repair`` rebuilds it)."""


class ExpertUnavailableError(BankError):
    """One expert cannot be used (missing, corrupt, non-finite); the engine drops it for the step."""


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\":,;()\[\]<>]+){2,}/?")


def redact(message: str) -> str:
    """``message`` with every absolute path cut to its last component: errors shown to API
    clients never reveal the server's file layout (``/srv/x/bank/experts/a.st`` -> ``…/a.st``)."""
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
