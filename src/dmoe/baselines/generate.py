"""One generation in the shared prompt frame: the engine call every method makes.

``PromptRunner`` formats (question, passages) with ``dmoe.prompts``, runs the shared greedy
``Engine`` and always leaves the adapter with no active experts afterwards, so methods that share a
model never leak experts into each other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from dmoe.baselines.protocol import MethodConfig, Prediction
from dmoe.engine.decode import DecodeConfig, Engine, ExpertLoader, Generation
from dmoe.engine.triggers import TriggerPolicy
from dmoe.experts.lora import ExpertAdapter
from dmoe.prompts import encode_prompt
from dmoe.routing.base import Router


def decode_config(cfg: MethodConfig, record_logits: bool = False) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k,
                        min_score=cfg.route_min_score, min_relevance=cfg.route_min_relevance,
                        query_max_tokens=cfg.query_max_tokens, stop_strings=cfg.stop_strings,
                        route_at_start=cfg.route_at_start, composition=cfg.composition,
                        composition_temperature=cfg.composition_temperature,
                        composition_scale=cfg.composition_scale,
                        no_repeat_ngram=cfg.no_repeat_ngram, record_logits=record_logits)


def first_seen(ids: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Union of id sets in first-appearance order."""
    return tuple(dict.fromkeys(i for group in ids for i in group))


class PromptRunner:
    """An ``Engine`` plus prompt encoding; ``run`` is one greedy generation."""

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 load_experts: ExpertLoader | None = None, router: Router | None = None,
                 trigger: TriggerPolicy | None = None) -> None:
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.engine = Engine(model, tokenizer, adapter, load_experts, router, trigger)

    def run(self, question: str, passages: Sequence[str], cfg: DecodeConfig,
            initial_experts: Sequence[str] = ()) -> Generation:
        ids = torch.tensor([encode_prompt(self.tokenizer, question, passages)], dtype=torch.long)
        try:
            return self.engine.generate(ids, question, cfg, initial_experts=initial_experts)
        finally:
            self.adapter.activate([])

    def close(self) -> None:
        self.engine.close()


def prediction(gen: Generation, t0: float, **fields: Any) -> Prediction:
    """A ``Prediction`` for a single generation that started at ``perf_counter() == t0``."""
    return Prediction(text=gen.text, latency_s=time.perf_counter() - t0,
                      generated_tokens=len(gen.token_ids), prefill_tokens=gen.prefill_tokens,
                      **fields)
