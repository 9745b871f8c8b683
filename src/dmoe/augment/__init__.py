"""Augmentation: per unit 1 paraphrase + 3 QA pairs (paper prompts), cached; PRAG training sets."""

from dmoe.augment.cache import AugmentationCache, augment_cached, cache_key
from dmoe.augment.extractive import ExtractiveAugmenter, extractive_paraphrase, extractive_qa
from dmoe.augment.llm import Augmenter, ChatBackend, LLMAugmenter, make_augmenter
from dmoe.augment.measure import measure_augmentation
from dmoe.augment.parse import clean_paraphrase, parse_qa, parse_qa_detailed
from dmoe.augment.training import training_examples
from dmoe.augment.types import Augmentation, QAPair, TrainingExample

__all__ = ["Augmentation", "AugmentationCache", "Augmenter", "ChatBackend", "ExtractiveAugmenter",
           "LLMAugmenter", "QAPair", "TrainingExample", "augment_cached", "cache_key",
           "clean_paraphrase", "extractive_paraphrase", "extractive_qa", "make_augmenter",
           "measure_augmentation", "parse_qa", "parse_qa_detailed", "training_examples"]
