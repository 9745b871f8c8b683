"""Augmentation cost and robustness numbers for ``dmoe bench build``.

``measure_augmentation`` runs an augmenter once over some units (no cache) and reports:

- ``augment_s_per_unit``: wall seconds / units;
- ``augment_json_parse_rate``: share of units whose QA output parsed *as JSON* into >= 3 pairs, on
  the first try or the retry (``None`` for an augmenter without an LLM);
- ``augment_json_parse_rate_first_try``: the same, first try only;
- ``augment_qa_parse_rate``: >= 3 pairs in any accepted form (JSON or "Question:/Answer:" lines),
  first try or retry; ``augment_qa_partial_rate`` (1-2 pairs, topped up extractively);
  ``augment_fallback_rate`` (no pair at all: all extractive);
- ``augment_paraphrase_rate`` (model paraphrase usable), ``augment_sources`` (count per source).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dmoe.augment.llm import Augmenter
from dmoe.augment.types import Augmentation
from dmoe.corpus.units import KnowledgeUnit


def measure_augmentation(units: Sequence[KnowledgeUnit], augmenter: Augmenter, *,
                         keep: list[Augmentation] | None = None) -> dict[str, Any]:
    """Augment ``units`` once, timing it, and summarise parsing outcomes (module docstring).

    ``keep``: a list that receives the augmentations, for callers that want to inspect them.
    """
    if not units:
        raise ValueError("measure_augmentation needs at least one unit")
    start = time.perf_counter()
    augs = augmenter.augment(units)
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.extend(augs)
    n = len(augs)
    parsed = Counter(a.meta.get("qa_parsed", "") for a in augs)
    json_ok = Counter(a.meta.get("qa_parsed", "") for a in augs
                      if a.meta.get("qa_format") == "json")
    llm = "" not in parsed

    def rate(outcomes: tuple[str, ...], counts: Counter[str] = parsed) -> float | None:
        return sum(counts[o] for o in outcomes) / n if llm else None

    paraphrased = sum(a.meta.get("paraphrase_source") not in (None, "extractive") for a in augs)
    return {
        "augment_units": n,
        "augment_seconds": round(seconds, 3),
        "augment_s_per_unit": seconds / n,
        "augment_json_parse_rate": rate(("first", "retry"), json_ok),
        "augment_json_parse_rate_first_try": rate(("first",), json_ok),
        "augment_qa_parse_rate": rate(("first", "retry")),
        "augment_qa_partial_rate": rate(("partial",)),
        "augment_fallback_rate": rate(("failed",)),
        "augment_paraphrase_rate": paraphrased / n if llm else None,
        "augment_sources": dict(Counter(a.source for a in augs)),
    }
