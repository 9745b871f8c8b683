"""The LLM-free augmenter (``extractive``, alias ``none``): deterministic rules over the passage.

Paraphrase: the passage's sentences rotated by one (the second sentence first, the first last),
prefixed with "{title}: " when the unit has a title. A one-sentence passage without a title becomes
"In short: {sentence}". The rewrite is therefore always distinct from the passage and keeps every
fact word for word.

QA pairs are cloze questions, built from candidates in this order of preference:

1. entity-like spans: runs of capitalised words ("Marie Curie", "Nobel Prize") and numbers
   ("1867", "24–10", "3.5"), except a lone capitalised word opening the sentence (and a leading
   "The"/"In"/"She"… is dropped from a run that opens it);
2. the longest word (>= 4 letters) of each sentence not yet used;
3. continuation: "How does this text continue: '<first half of a sentence>'?" -> the second half.

Question: ``Fill in the blank: <sentence with the span replaced by "____">`` (prefixed with
"({title})" when there is one); answer: the span; full_answer: the sentence. Candidates are taken
round-robin over sentences (one per sentence before a second from any), so the three questions
cover different sentences where possible; with fewer than three distinct candidates the list cycles,
so any non-empty passage gets exactly three pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from dmoe.augment.types import Augmentation, QAPair
from dmoe.corpus.split import split_sentences
from dmoe.corpus.units import KnowledgeUnit

BLANK = "____"
N_QA = 3

_CAPS_RUN = re.compile(r"\b[A-Z][\w'’.-]*(?:\s+(?:of|the|de|von|van|and|for)?\s*[A-Z][\w'’.-]*)*")
_NUMBER = re.compile(r"\b\d[\d,.:/–-]*\d\b|\b\d\b")
_WORD = re.compile(r"\b[^\W\d_]{4,}\b")
# Capitalised only because they open the sentence: dropped from the front of a span there.
_OPENERS = {"The", "A", "An", "In", "On", "At", "By", "For", "From", "After", "Before", "During",
            "When", "While", "His", "Her", "Its", "Their", "This", "That", "These", "Those", "It",
            "He", "She", "They", "We", "I", "As", "Since", "Although", "However", "Both"}


def extractive_paraphrase(unit: KnowledgeUnit) -> str:
    """Sentences rotated by one, title-prefixed (module docstring)."""
    sentences = split_sentences(unit.text)
    body = " ".join(sentences[1:] + sentences[:1])
    if unit.title:
        return f"{unit.title}: {body}"
    return body if len(sentences) > 1 else f"In short: {body}"


def _entity_spans(sentence: str) -> list[tuple[int, int]]:
    spans = []
    for m in _CAPS_RUN.finditer(sentence):
        start, text = m.start(), m.group(0).rstrip(".")
        if start == 0:
            first, _, rest = text.partition(" ")
            if first in _OPENERS and rest:
                start, text = len(first) + 1, rest.lstrip()  # "The Super Bowl" -> "Super Bowl"
            elif first in _OPENERS or not rest:
                continue  # "She", or a lone word capitalised because it opens the sentence
        spans.append((start, start + len(text)))
    spans += [(m.start(), m.end()) for m in _NUMBER.finditer(sentence)]
    return sorted(spans, key=lambda s: s[0] - s[1])  # longest first


def _cloze(sentence: str, span: tuple[int, int], title: str) -> QAPair:
    masked = sentence[:span[0]] + BLANK + sentence[span[1]:]
    prefix = f"({title}) " if title else ""
    return QAPair(question=f"Fill in the blank: {prefix}{masked}",
                  answer=sentence[span[0]:span[1]], full_answer=sentence)


def _continuation(sentence: str) -> QAPair | None:
    words = sentence.split()
    if len(words) < 2:
        return None
    half = len(words) // 2
    return QAPair(question=f"How does this text continue: '{' '.join(words[:half])}'?",
                  answer=" ".join(words[half:]), full_answer=sentence)


def _round_robin(per_sentence: Sequence[list[QAPair]]) -> Iterator[QAPair]:
    for i in range(max((len(c) for c in per_sentence), default=0)):
        for cands in per_sentence:
            if i < len(cands):
                yield cands[i]


def extractive_qa(unit: KnowledgeUnit, n: int = N_QA) -> list[QAPair]:
    """Exactly ``n`` cloze/continuation QA pairs for any non-empty passage (module docstring)."""
    sentences = split_sentences(unit.text)
    if not sentences:
        raise ValueError(f"unit {unit.id!r} has no text to make questions from")
    entities = [[_cloze(s, sp, unit.title) for sp in _entity_spans(s)] for s in sentences]
    longest = []
    for s in sentences:
        words = sorted(_WORD.finditer(s), key=lambda m: m.start() - m.end())
        longest.append([_cloze(s, (m.start(), m.end()), unit.title) for m in words[:1]])
    continuation = [[p] for s in sentences if (p := _continuation(s)) is not None]
    out: list[QAPair] = []
    seen: set[str] = set()
    for tier in (entities, longest, continuation):
        for pair in _round_robin(tier):
            if pair.answer.lower() not in seen and len(out) < n:
                seen.add(pair.answer.lower())
                out.append(pair)
    if not out:  # a single word: blank it out
        out.append(_cloze(sentences[0], (0, len(sentences[0])), unit.title))
    return [out[i % len(out)] for i in range(n)]


class ExtractiveAugmenter:
    """Augmenter without an LLM (module docstring); instant and deterministic."""

    name = "extractive"

    @property
    def settings(self) -> dict[str, str]:
        from dmoe.augment.prompts import PROMPT_VERSION

        return {"augmenter": self.name, "rules": "extractive-v1", "prompt_version": PROMPT_VERSION}

    def augment(self, units: Sequence[KnowledgeUnit]) -> list[Augmentation]:
        return [Augmentation(paraphrase=extractive_paraphrase(u), qa=tuple(extractive_qa(u)),
                             source="extractive", meta={"paraphrase_source": "extractive"})
                for u in units]
