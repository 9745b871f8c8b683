"""What augmentation produces for one unit, and the PRAG training set built from it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str  # short answer
    full_answer: str = ""  # answer as a sentence, when the augmenter gives one


@dataclass(frozen=True)
class Augmentation:
    """1 paraphrase + 3 QA pairs of one unit (DESIGN.md step 2), and how they were made."""

    paraphrase: str
    qa: tuple[QAPair, ...]
    source: str = ""  # e.g. "self", "self->extractive" (fallback), "openai:MODEL", "extractive"
    meta: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TrainingExample:
    """One supervised sequence: ``prompt`` (context) followed by ``target`` (what is learned).

    The trainer tokenizes ``prompt + target``; the loss covers the target tokens (answer-only) or
    the whole sequence, by configuration. ``teacher_prompt`` (optional) is the same context with
    the unit's passage in it: under ``objective="distill"`` the target tokens are learned from the
    frozen model reading that prompt (``dmoe.training.distill``) instead of by cross-entropy.
    """

    prompt: str
    target: str
    teacher_prompt: str = ""
