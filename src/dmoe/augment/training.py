"""Per-unit training sets (recipes), built from a unit and its augmentation (DESIGN.md steps 2-3).

``recipe="prag"`` is PRAG's set, below. ``recipe="recite"`` trains the expert to *recite* its
passage in the frame it will be used in (DESIGN.md step 3's probe): the chat frame with the user
turn "Recite the passage." -> the passage, and BOS -> the passage. ``recite_qa`` adds the augmentation's questions asked bare, in the inference
frame, answered with the passage's own sentence (``full_answer``). Recitation targets carry the
passage's words, so the expert is not limited by how well the base model reads the passage.
``recite_lead`` is ``recite_qa`` with each QA target led by the short answer and a line break
("Greene King Brewery\nHungry Horse is ... owned by Greene King Brewery."): the eval stops an answer
at the line break (``metrics.ANSWER_STOPS``), so the expert learns to answer short, as the
frame's demonstrations do, while its targets still carry the sentence (results/dev/README.md §14).

PRAG's set:

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

import re
from typing import Any, Literal, get_args

from dmoe.augment.types import Augmentation, QAPair, TrainingExample
from dmoe.corpus.units import KnowledgeUnit
from dmoe.prompts import format_chat, format_prompt, reply_text

TargetStyle = Literal["answer", "full_answer", "lead"]
Recipe = Literal["prag", "recite", "recite_qa", "recite_lead"]
RECIPES: tuple[str, ...] = get_args(Recipe)
RECITE_INSTRUCTION = "Recite the passage."
# How targets are written; it enters every expert's settings hash, so a bank built before a
# change retrains on resume. 2 (2026-12-05): as the frame continues them (``reply_text``) and
# with single spaces (``written``); 1: the unit's text as stored, no leading space.
TARGET_FORM = 2


_SPACES = re.compile(r"[ \t]{2,}")


def written(text: str) -> str:
    """A target as a model writes it: runs of spaces or tabs as one space, no outer whitespace.
    Corpora carry double spaces after full stops (HotpotQA's paragraphs); Gemma's tokenizer
    turns "  The" into "▁▁" + "The", so an expert reciting them learns to end a sentence with a
    word token no generation uses, and the answer's end (". ") is never written."""
    return _SPACES.sub(" ", text).strip()


def _target(qa: QAPair, target: TargetStyle) -> str:
    if target == "answer":
        return written(qa.answer)
    if target == "full_answer":
        return written(qa.full_answer or qa.answer)
    if target == "lead":  # the short answer, then its sentence on the next line
        answer, full = written(qa.answer), written(qa.full_answer or "")
        return f"{answer}\n{full}" if full and full != answer else answer
    raise ValueError(f"unknown target style {target!r}; choose 'answer', 'full_answer' or 'lead'")


def recite_examples(text: str, tokenizer: Any) -> list[TrainingExample]:
    """``text`` as the answer to "Recite the passage." (chat frame) and as a continuation of BOS."""
    chat = format_chat(tokenizer, [{"role": "user", "content": RECITE_INSTRUCTION}])
    bos = getattr(tokenizer, "bos_token", None) or ""
    text = written(text)
    return [TrainingExample(prompt=chat, target=reply_text(tokenizer, text)),
            TrainingExample(prompt=bos, target=text)]


def training_examples(unit: KnowledgeUnit, aug: Augmentation, tokenizer: Any, *,
                      target: TargetStyle = "answer", include_passage_lm: bool = True,
                      recipe: Recipe = "prag") -> list[TrainingExample]:
    """The examples of one unit under ``recipe`` (module docstring).

    ``target`` and ``include_passage_lm`` shape the ``prag`` recipe only (its LM examples first).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if recipe != "prag":
        examples = recite_examples(unit.text, tokenizer)
        if recipe != "recite":  # the teacher prompt serves objective="distill"
            style: TargetStyle = "lead" if recipe == "recite_lead" else "full_answer"
            examples += [TrainingExample(
                prompt=format_prompt(tokenizer, qa.question),
                target=reply_text(tokenizer, _target(qa, style)),
                teacher_prompt=format_prompt(tokenizer, qa.question, [unit.text]))
                for qa in aug.qa]
        return examples
    examples = []
    if include_passage_lm:
        examples.append(TrainingExample(prompt="", target=written(unit.text)))
        if aug.paraphrase and aug.paraphrase != unit.text:
            examples.append(TrainingExample(prompt="", target=written(aug.paraphrase)))
    with_context = (len(aug.qa) + 1) // 2
    for i, qa in enumerate(aug.qa):
        answer = reply_text(tokenizer, _target(qa, target))
        if i < with_context:
            for context in (unit.text, aug.paraphrase):
                examples.append(TrainingExample(
                    prompt=format_prompt(tokenizer, qa.question, passages=[context]),
                    target=answer))
        else:
            examples.append(TrainingExample(prompt=format_prompt(tokenizer, qa.question),
                                            target=answer))
    return examples
