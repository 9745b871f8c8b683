"""The ``self`` augmenter on the real packaged base model (slow: loads SmolLM2-135M)."""

from __future__ import annotations

import pytest

from dmoe.augment import make_augmenter, training_examples
from dmoe.corpus.units import KnowledgeUnit

PASSAGE = KnowledgeUnit(
    "curie", "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted "
    "pioneering research on radioactivity. She was the first woman to win a Nobel Prize, and the "
    "only person to win Nobel Prizes in two scientific fields.", title="Marie Curie")


@pytest.mark.slow
def test_self_augmenter_on_packaged_model():
    from dmoe.base_model import load_base_model

    loaded = load_base_model(training=True)
    augmenter = make_augmenter("self", loaded=loaded, batch_size=2, qa_tokens=200,
                               rewrite_tokens=120)
    aug = augmenter.augment([PASSAGE])[0]
    assert aug.source in ("self", "self+extractive", "self->extractive")
    assert len(aug.qa) == 3 and all(q.question and q.answer for q in aug.qa)
    assert aug.paraphrase and aug.paraphrase != PASSAGE.text
    examples = training_examples(PASSAGE, aug, loaded.tokenizer)
    assert len(examples) == 7 and "<|im_start|>assistant" in examples[2].prompt
