"""Which experts were active for which part of a generated answer.

Turns a ``Generation``'s per-token records into contiguous spans with one active set each — the
shape the CLI prints (``--show-experts``), the server returns and the evaluator stores.
"""

from __future__ import annotations

import os
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
    """Split the answer wherever the active set changes (or a trigger re-selects the same set).

    Spans cover the answer, ``gen.text``: a generation cut by a stop string generated a token or
    two past its answer (the ones that completed the stop), and those are left out."""
    pieces: list[str] = []  # the text of each token that starts inside the answer, clipped to it
    at = 0
    for piece in token_texts(gen.token_ids, tokenizer):
        if at >= len(gen.text):
            break
        pieces.append(piece[: len(gen.text) - at])
        at += len(piece)
    out: list[Span] = []
    start = 0
    records = gen.records[: len(pieces)]
    for i in range(1, len(records) + 1):
        if i == len(records) or records[i].triggered or records[i].active != records[start].active:
            out.append(Span(start, i, "".join(pieces[start:i]), records[start].active,
                            records[start].triggered))
            start = i
    return out


def token_texts(token_ids: list[int], tokenizer: Any) -> list[str]:
    """The text each generated token added: ``"".join`` gives the decoded answer wherever
    decoding a prefix gives a prefix of the text (byte-level BPE and SentencePiece do).

    A token that ends inside a multi-byte character adds ``""``; the token that completes the
    character carries it. Each step decodes only a short window (the tokens since the one before
    the last emitted text, as incremental detokenisers do), so an answer costs linear time.
    """
    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    out: list[str] = []
    prefix = read = 0  # the window starts at ``prefix``; text up to ``read`` has been emitted
    before = ""  # decode(token_ids[prefix:read])
    for i in range(1, len(token_ids) + 1):
        text = decode(token_ids[prefix:i])
        if i < len(token_ids) and (text.endswith("\ufffd") or not text.startswith(before)):
            out.append("")  # half a character, or a tokenizer that rewrote earlier text: wait
            continue
        if not text.startswith(before):  # the last token rewrote earlier text: it takes the rest
            out.append(text[len(os.path.commonprefix([before, text])):])
        else:
            out.append(text[len(before):])
        prefix, read = read, i
        before = decode(token_ids[prefix:read])
    return out
