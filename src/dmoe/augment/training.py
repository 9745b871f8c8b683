"""PRAG's per-unit training set, built from a unit and its augmentation (DESIGN.md step 2).

With QA pairs Q1..Qn, the first ceil(n/2) questions are asked twice, once with the passage and once
with the paraphrase as context; the rest are asked with no context. For n = 3 (the paper's)::

    (passage, Q1)->A1, (rewrite, Q1)->A1, (passage, Q2)->A2, (rewrite, Q2)->A2, Q3->A3

Every prompt is ``prompts.format_prompt`` (the one frame used at inference), so training matches
inference. ``target="full_answer"`` trains on the sentence answers (falling back to the short answer
where an augmenter gave none). ``include_passage_lm`` adds the passage and the paraphrase as plain
language-modelling examples (empty prompt, the text as target): on the small packaged model, training
on the passage text injected facts where QA-only training at the paper's settings did not
(DESIGN.md step 3). Only augmentation output is used, never a benchmark's answers.
"""

from __future__ import annotations

from typing import Any, Literal

from dmoe.augment.types import Augmentation, QAPair, TrainingExample
from dmoe.corpus.units import KnowledgeUnit
from dmoe.prompts import format_prompt

TargetStyle = Literal["answer", "full_answer"]


def _target(qa: QAPair, target: TargetStyle) -> str:
    if target == "answer":
        return qa.answer
    if target == "full_answer":
        return qa.full_answer or qa.answer
    raise ValueError(f"unknown target style {target!r}; choose 'answer' or 'full_answer'")


def training_examples(unit: KnowledgeUnit, aug: Augmentation, tokenizer: Any, *,
                      target: TargetStyle = "answer",
                      include_passage_lm: bool = True) -> list[TrainingExample]:
    """The PRAG examples of one unit (module docstring), LM examples first when included."""
    examples: list[TrainingExample] = []
    if include_passage_lm:
        examples.append(TrainingExample(prompt="", target=unit.text))
        if aug.paraphrase and aug.paraphrase != unit.text:
            examples.append(TrainingExample(prompt="", target=aug.paraphrase))
    with_context = (len(aug.qa) + 1) // 2
    for i, qa in enumerate(aug.qa):
        answer = _target(qa, target)
        if i < with_context:
            for context in (unit.text, aug.paraphrase):
                examples.append(TrainingExample(
                    prompt=format_prompt(tokenizer, qa.question, passages=[context]),
                    target=answer))
        else:
            examples.append(TrainingExample(prompt=format_prompt(tokenizer, qa.question),
                                            target=answer))
    return examples
