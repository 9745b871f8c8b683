"""Lenient parsing of LLM augmentation output: the QA JSON list and the rewritten passage.

Small models rarely emit clean JSON. ``parse_qa`` tries, in order, and stops at the first that
yields pairs:

1. ``json.loads`` of the text from the first ``[`` to the last ``]`` (code fences stripped,
   trailing commas removed, a missing closing ``]`` added);
2. each ``{...}`` object found in the text, parsed on its own (same repairs);
3. a regex over ``"question": "..."`` / ``"answer": "..."`` / ``"full_answer": "..."`` fields;
4. not JSON at all: ``Question: ...`` / ``Answer: ...`` line pairs (also ``Q1:``/``A1:``), the form
   the packaged SmolLM2-135M falls into when it ignores the requested format.

``parse_qa_detailed`` also says which kind succeeded (``"json"`` for 1-3, ``"text"`` for 4), so
measurements can tell a JSON parse from a rescued free-text answer.

A pair needs a non-empty question and answer (numbers and lists are turned into strings); pairs that
copy the prompt's format example or repeat an earlier question are dropped. The caller decides how
many pairs are enough. This module knows nothing about models or prompts beyond that example.
"""

from __future__ import annotations

import json
import re
from typing import Any

from dmoe.augment.prompts import EXAMPLE_QUESTION
from dmoe.augment.types import QAPair

_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_TEXT_PAIR = re.compile(
    r"(?:^|\n)[ \t]*(?:\d+[.)][ \t]*)?(?:Q|Question)[ \t]*\d*[ \t]*[:.][ \t]*(?P<q>[^\n]+?)[ \t]*"
    r"\n+[ \t]*(?:A|Answer)[ \t]*\d*[ \t]*[:.][ \t]*(?P<a>[^\n]+)", re.IGNORECASE)
_FIELD = re.compile(r'"(question|answer|full_answer)"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_as_text(v) for v in value)
    return " ".join(str(value).split())


def _pair(obj: Any) -> QAPair | None:
    if not isinstance(obj, dict):
        return None
    q, a = _as_text(obj.get("question")), _as_text(obj.get("answer"))
    if not q or not a:
        return None
    return QAPair(question=q, answer=a, full_answer=_as_text(obj.get("full_answer")))


def _loads(text: str) -> Any:
    try:
        return json.loads(_TRAILING_COMMA.sub(r"\1", text))
    except json.JSONDecodeError:
        return None


def _from_list(text: str) -> list[Any]:
    start = text.find("[")
    if start < 0:
        return []
    end = text.rfind("]")
    body = text[start:end + 1] if end > start else text[start:]
    data = _loads(body)
    if data is None and end <= start:
        data = _loads(body.rstrip().rstrip(",") + "]")
    return data if isinstance(data, list) else []


def _from_objects(text: str) -> list[Any]:
    return [obj for m in _OBJECT.finditer(text) if (obj := _loads(m.group(0))) is not None]


def _from_fields(text: str) -> list[Any]:
    records: list[dict[str, str]] = []
    for name, raw in _FIELD.findall(text):
        value = _loads(f'"{raw}"') or raw
        if name == "question" or not records or name in records[-1]:
            records.append({})
        records[-1][name] = value
    return records


def _clean(pairs: list[QAPair]) -> list[QAPair]:
    out: list[QAPair] = []
    seen: set[str] = set()
    for p in pairs:
        key = p.question.lower()
        if key == EXAMPLE_QUESTION.lower() or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def _from_text(text: str) -> list[Any]:
    return [{"question": m.group("q"), "answer": m.group("a")} for m in _TEXT_PAIR.finditer(text)]


def parse_qa_detailed(text: str) -> tuple[list[QAPair], str]:
    """``(pairs, kind)``: the usable QA pairs in ``text`` and ``"json"``/``"text"``/``""``."""
    text = _FENCE.sub("", text)
    for kind, strategy in (("json", _from_list), ("json", _from_objects), ("json", _from_fields),
                           ("text", _from_text)):
        pairs = _clean([p for obj in strategy(text) if (p := _pair(obj)) is not None])
        if pairs:
            return pairs, kind
    return [], ""


def parse_qa(text: str) -> list[QAPair]:
    """All usable QA pairs in ``text`` (possibly none); see the module docstring."""
    return parse_qa_detailed(text)[0]


_PREAMBLE = re.compile(
    r"^\s*(sure[,!.]?|certainly[,!.]?|okay[,!.]?)?\s*(here('s| is)|below is)[^\n:]*:\s*\n?",
    re.IGNORECASE)
_LABEL = re.compile(r"^\s*(rewritten|revised|new)?\s*(passage|version|text)\s*:\s*",
                    re.IGNORECASE)


def clean_paraphrase(text: str, original: str) -> str:
    """The rewritten passage without chat preambles, labels and degenerate loops; "" if unusable.

    Cleaning: a leading "Here is the rewritten passage:"-style line and a "Passage:" label go;
    a sentence repeating an earlier one verbatim ends the text there (greedy decoding loops); a
    last sentence cut off by the token budget (no end punctuation) goes when a complete one is left.
    Unusable: empty, identical to the original (after whitespace normalisation), or a scrap of fewer
    than 5 words.
    """
    from dmoe.corpus.split import split_sentences

    text = _LABEL.sub("", _PREAMBLE.sub("", text.strip()))
    sentences: list[str] = []
    for sentence in split_sentences(text.strip().strip('"')):
        if sentence in sentences:
            break
        sentences.append(sentence)
    if len(sentences) > 1 and not sentences[-1].endswith((".", "!", "?", '"', "'", ")")):
        sentences.pop()
    text = " ".join(sentences)
    if len(text.split()) < 5 or text == " ".join(original.split()):
        return ""
    return text
