"""The question type every layer shares: benchmark loaders make ``Sample``s, methods answer them.

It lives below both ``dmoe.eval`` and ``dmoe.baselines`` so the import arrows stay one-way
(eval -> baselines -> samples). This module knows nothing about files, models or scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["span", "yesno"]


@dataclass(frozen=True)
class Sample:
    """One benchmark question."""

    id: str  # stable id from the source file (used to resume runs)
    question: str
    answers: tuple[str, ...]  # gold aliases (any one counts)
    kind: Kind = "span"  # "yesno" -> scored by ACC
    gold_unit_ids: tuple[str, ...] = ()  # corpus units that hold the answer (oracle routing)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
