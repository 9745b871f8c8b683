"""The ``spans`` augmenter: answers chosen in the passage first, questions written by a small LLM.

The paper's JSON QA prompt parses 0% of the time on the packaged 135M model (``dmoe bench build``),
so it falls back to cloze questions ("Fill in the blank: ...") that look nothing like the questions
users ask. This augmenter splits the job so a small model can do its part:

1. the answers are spans picked by rule (``extractive_qa``: entities, numbers, long words), so every
   answer occurs in the passage by construction;
2. for each (sentence, answer) the model writes one question, few-shot, as a plain completion::

       Sentence: Marie Curie won the Nobel Prize in Physics in 1903.
       Answer: 1903
       Question: When did Marie Curie win the Nobel Prize in Physics?
       ...
       Sentence: {sentence}
       Answer: {answer}
       Question:

3. a question is kept only if it passes ``valid_question`` (one line ending in "?", 3-30 words,
   not containing the answer, sharing a content word with the sentence); otherwise that pair stays
   the cloze pair. ``meta["qa_valid"]`` counts the model's valid questions per unit.

The paraphrase is the extractive one. This module knows nothing about training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from dmoe.augment.extractive import extractive_paraphrase, extractive_qa
from dmoe.augment.types import Augmentation, QAPair
from dmoe.corpus.units import KnowledgeUnit

SHOTS = (
    ("Marie Curie won the Nobel Prize in Physics in 1903.", "1903",
     "When did Marie Curie win the Nobel Prize in Physics?"),
    ("The Eiffel Tower, designed by Gustave Eiffel's company, stands in Paris.", "Paris",
     "In which city does the Eiffel Tower stand?"),
    ("Lake Baikal in Siberia is the deepest lake in the world.", "Lake Baikal",
     "What is the deepest lake in the world?"),
)
PROMPT_VERSION = "spans-v1"
_WORDS = re.compile(r"[^\W_]{4,}")


def question_prompt(sentence: str, answer: str) -> str:
    shots = "".join(f"Sentence: {s}\nAnswer: {a}\nQuestion: {q}\n\n" for s, a, q in SHOTS)
    return f"{shots}Sentence: {sentence.strip()}\nAnswer: {answer.strip()}\nQuestion:"


def valid_question(question: str, answer: str, sentence: str) -> bool:
    """The checks of the module docstring (step 3)."""
    q = question.strip()
    if "\n" in q or not q.endswith("?") or not 3 <= len(q.split()) <= 30:
        return False
    if answer.strip().lower() in q.lower():
        return False
    shared = {w.lower() for w in _WORDS.findall(q)} & {w.lower() for w in _WORDS.findall(sentence)}
    return bool(shared)


class SpanQuestionAugmenter:
    """Rule-picked answers, model-written questions (module docstring)."""

    name = "spans"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8,
                 max_new_tokens: int = 32, model_id: str = "") -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                             f"{max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.model_id = model_id

    @property
    def settings(self) -> dict[str, Any]:
        return {"augmenter": self.name, "model": self.model_id, "prompt_version": PROMPT_VERSION,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}

    @torch.no_grad()
    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Greedy first lines of plain completions of ``prompts`` (left-padded batches)."""
        tok, out = self.tokenizer, []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        for lo in range(0, len(prompts), self.batch_size):
            enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[lo:lo + self.batch_size]]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
            gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
            out += [tok.decode(row[width:].tolist(), skip_special_tokens=True).strip()
                    .split("\n")[0].strip() for row in gen]
        return out

    def augment(self, units: Sequence[KnowledgeUnit]) -> list[Augmentation]:
        cloze = [extractive_qa(u) for u in units]
        flat = [(i, j, p) for i, pairs in enumerate(cloze) for j, p in enumerate(pairs)]
        written = self.complete([question_prompt(p.full_answer, p.answer) for _, _, p in flat])
        qa = [list(pairs) for pairs in cloze]
        valid = [0] * len(units)
        for (i, j, p), q in zip(flat, written, strict=True):
            if valid_question(q, p.answer, p.full_answer):
                qa[i][j] = QAPair(question=q, answer=p.answer, full_answer=p.full_answer)
                valid[i] += 1
        return [Augmentation(paraphrase=extractive_paraphrase(u), qa=tuple(pairs),
                             source=self.name, meta={"qa_valid": str(v), "qa_total": str(len(pairs)),
                                                     "paraphrase_source": "extractive"})
                for u, pairs, v in zip(units, qa, valid, strict=True)]
