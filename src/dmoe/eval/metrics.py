"""Answer scoring: SQuAD-normalised EM/F1 over gold aliases, yes/no accuracy, and answer extraction.

Scoring follows the official SQuAD v1.1 evaluation script (and the PRAG/DRAGIN/FLARE convention):

- ``normalize_answer``: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace;
- ``exact_match`` / ``f1``: max over the gold aliases; F1 is bag-of-tokens overlap;
- F1 is 0 on a yes/no mismatch (HotpotQA rule): if either normalised side is ``yes``/``no``/
  ``noanswer`` and the two differ, no partial credit is given;
- ``contains``: the normalised gold appears inside the normalised prediction (token-bounded), the
  lenient PopQA-style match used for knowledge-injection efficacy;
- ``yes_no_label`` / ``accuracy`` for yes/no sets (StrategyQA). In span sets, a sample whose gold
  is a bare yes/no (HotpotQA comparison questions) is scored on the answer's yes/no label when it
  has one ("No, they are not." -> "no"), else on the answer as is.

Answer extraction (``extract_answer``) is deliberately simple and uses no LLM: the method's raw
generation is stripped, cut to its first non-empty line, a leading ``Answer:`` label is removed, and
the line is cut at the end of its first sentence (``.``/``!``/``?`` followed by whitespace, so
"3.5" or "U.S.A" survive). Everything a method generates after that is ignored, so a generation
may stop at the first of ``ANSWER_STOPS`` (what the eval protocol does, ``MethodConfig``): cut
there, it scores the same as the full generation, whatever follows (a tested property).

This module knows nothing about models, methods or datasets.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_LABEL = re.compile(r"^\s*(final\s+)?answer\s*[:\-]\s*", re.IGNORECASE)
YES_NO = ("yes", "no", "noanswer")
# Where a generation may stop without changing its extracted answer (after SQuAD normalisation):
# the first line's end, or its first sentence's end (the space after the mark included).
ANSWER_STOPS = ("\n", ". ", "! ", "? ")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower, remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_answer(generation: str) -> str:
    """The direct answer in a generation: first non-empty line, minus an ``Answer:`` label, cut at
    the end of its first sentence (see the module docstring)."""
    line = next((ln.strip() for ln in generation.splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line)
    return _SENTENCE_END.split(line, maxsplit=1)[0].strip()


def _em_one(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1_one(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in YES_NO or g in YES_NO) and p != g:
        return 0.0
    p_toks, g_toks = p.split(), g.split()
    common = Counter(p_toks) & Counter(g_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_toks), same / len(g_toks)
    return 2 * precision * recall / (precision + recall)


def _contains_one(pred: str, gold: str) -> float:
    g = normalize_answer(gold)
    if not g:
        return 0.0
    return float(f" {g} " in f" {normalize_answer(pred)} ")


def _check_golds(golds: Iterable[str]) -> list[str]:
    out = [g for g in golds if isinstance(g, str)]
    if not out:
        raise ValueError(f"need at least one gold answer string, got {golds!r}")
    return out


def exact_match(pred: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0."""
    return max(_em_one(pred, g) for g in _check_golds(golds))


def f1(pred: str, golds: Iterable[str]) -> float:
    """Max over aliases of the SQuAD token F1 (0 on a yes/no mismatch)."""
    return max(_f1_one(pred, g) for g in _check_golds(golds))


def contains(pred: str, golds: Iterable[str]) -> float:
    """1.0 if any normalised alias occurs in the normalised prediction on token boundaries."""
    return max(_contains_one(pred, g) for g in _check_golds(golds))


def yes_no_label(text: str) -> str | None:
    """``"yes"``/``"no"`` read from an answer: its first word if that is yes/no/true/false, else
    the only one of yes/no that occurs as a word; ``None`` when undecided."""
    words = normalize_answer(text).split()
    mapping = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
    if words and words[0] in mapping:
        return mapping[words[0]]
    found = {mapping[w] for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def accuracy(pred: str, golds: Iterable[str]) -> float:
    """Yes/no accuracy: the prediction's ``yes_no_label`` equals the gold's."""
    gold = {yes_no_label(g) for g in _check_golds(golds)} - {None}
    label = yes_no_label(pred)
    return float(label is not None and label in gold)


def yes_no_golds(golds: Iterable[str]) -> bool:
    """Whether every gold answer is "yes" or "no" (HotpotQA's comparison questions)."""
    return all(normalize_answer(g) in ("yes", "no") for g in golds)


def score(generation: str, golds: Iterable[str], kind: str = "span") -> dict[str, float | str]:
    """Every metric for one sample: ``answer`` (extracted), ``em``, ``f1``, ``contains`` and, for
    ``kind == "yesno"``, ``acc`` (where em = f1 = acc, scored on the yes/no label)."""
    golds = _check_golds(golds)
    answer = extract_answer(generation)
    if kind == "yesno":
        acc = accuracy(answer, golds)
        return {"answer": answer, "em": acc, "f1": acc, "acc": acc,
                "contains": contains(answer, golds)}
    if kind != "span":
        raise ValueError(f"kind must be 'span' or 'yesno', got {kind!r}")
    scored = answer
    if yes_no_golds(golds):
        scored = yes_no_label(answer) or answer  # "No, they are not." answers a yes/no gold "no"
    return {"answer": answer, "em": exact_match(scored, golds), "f1": f1(scored, golds),
            "contains": contains(answer, golds)}


def has_loop(text: str, n: int = 3, times: int = 3) -> bool:
    """True when some word n-gram occurs ``times`` or more times (a degenerate, looping answer)."""
    words = text.lower().split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times
