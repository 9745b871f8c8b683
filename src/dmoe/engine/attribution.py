"""Which experts were active for which part of a generated answer.

Turns a ``Generation``'s per-token records into contiguous spans with one active set each — the
shape the CLI prints (``--show-experts``), the server returns and the evaluator stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dmoe.engine.decode import Generation


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of the answer, generated under one active expert set."""

    start: int  # first token index (0 = first generated token)
    end: int  # one past the last token index
    text: str  # the decoded text of these tokens
    experts: tuple[str, ...]  # active expert ids, in routing order
    triggered: bool  # whether the span starts at a trigger

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spans(gen: Generation, tokenizer: Any) -> list[Span]:
    """Split the answer wherever the active set changes (or a trigger re-selects the same set)."""
    out: list[Span] = []
    start = 0
    records = gen.records
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].triggered or records[i].active != records[start].active:
            ids = gen.token_ids[start:i]
            out.append(Span(start, i, str(tokenizer.decode(ids, skip_special_tokens=True)),
                            records[start].active, records[start].triggered))
            start = i
    return out
