"""One generation in the shared prompt frame: the engine call every method makes.

``PromptRunner`` formats (question, passages) with ``dmoe.prompts``, runs the shared greedy
``Engine`` and always leaves the adapter with no active experts afterwards, so methods that share a
model never leak experts into each other. ``run_batch`` runs several such generations as one batch
(``dmoe.engine.batch``); every row decodes the tokens ``run`` would.

``OneShotMethod`` is the shape of every method that answers with exactly one generation: it
prepares a ``Job`` per sample and gets ``answer`` (the single-sequence engine) and
``answer_batch`` (the batched engine) from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmoe.baselines.protocol import MethodConfig, Prediction
from dmoe.engine.batch import BatchEngine, Request
from dmoe.engine.decode import DecodeConfig, Engine, ExpertLoader, Generation
from dmoe.engine.triggers import TriggerPolicy
from dmoe.experts.lora import ExpertAdapter
from dmoe.prompts import encode_prompt
from dmoe.routing.base import Router
from dmoe.samples import Sample


def decode_config(cfg: MethodConfig, record_logits: bool = False) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k,
                        min_score=cfg.route_min_score, min_relevance=cfg.route_min_relevance,
                        query_max_tokens=cfg.query_max_tokens, stop_strings=cfg.stop_strings,
                        route_at_start=cfg.route_at_start, composition=cfg.composition,
                        composition_temperature=cfg.composition_temperature,
                        composition_scale=cfg.composition_scale,
                        no_repeat_ngram=cfg.no_repeat_ngram, kv_policy=cfg.kv_policy,
                        record_logits=record_logits)


def first_seen(ids: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Union of id sets in first-appearance order."""
    return tuple(dict.fromkeys(i for group in ids for i in group))


@dataclass(frozen=True)
class Job:
    """One generation: the prompt's parts, the decode settings and pinned experts."""

    question: str
    passages: Sequence[str]
    config: DecodeConfig
    initial_experts: Sequence[str] = ()
    router: Router | None = None  # this generation's router (None: the runner's)


class PromptRunner:
    """An ``Engine`` plus prompt encoding; ``run`` is one greedy generation."""

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 load_experts: ExpertLoader | None = None, router: Router | None = None,
                 trigger: TriggerPolicy | None = None) -> None:
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.engine = Engine(model, tokenizer, adapter, load_experts, router, trigger)

    def run(self, question: str, passages: Sequence[str], cfg: DecodeConfig,
            initial_experts: Sequence[str] = (), router: Router | None = None) -> Generation:
        ids = torch.tensor([encode_prompt(self.tokenizer, question, passages)], dtype=torch.long)
        try:
            return self.engine.generate(ids, question, cfg, initial_experts=initial_experts,
                                        router=router)
        finally:
            self.adapter.activate([])

    def run_batch(self, jobs: Sequence[Job]) -> list[Generation]:
        """All ``jobs`` as one batch (one at a time if experts sit on more than the last layer,
        which the batched engine refuses); the same generations as ``run`` on each."""
        if len(self.adapter.layer_ids) > 1 or len(jobs) == 1:
            return [self.run(j.question, j.passages, j.config, j.initial_experts, j.router)
                    for j in jobs]
        reqs = [Request(torch.tensor([encode_prompt(self.tokenizer, j.question, j.passages)],
                                     dtype=torch.long), j.question, j.config,
                        initial_experts=j.initial_experts, router=j.router) for j in jobs]
        try:
            return BatchEngine(self.engine, max_batch=len(reqs)).run(reqs)
        finally:
            self.adapter.activate([])

    def close(self) -> None:
        self.engine.close()


def prediction(gen: Generation, t0: float, **fields: Any) -> Prediction:
    """A ``Prediction`` for a single generation that started at ``perf_counter() == t0``."""
    return Prediction(text=gen.text, latency_s=time.perf_counter() - t0,
                      generated_tokens=len(gen.token_ids), prefill_tokens=gen.prefill_tokens,
                      **fields)


Fields = Callable[[Generation], dict[str, Any]]  # a generation -> the Prediction's other fields


class OneShotMethod:
    """A method that answers with one generation: subclasses implement ``prepare``.

    ``answer`` decodes with the single-sequence engine. ``answer_batch`` decodes a batch together;
    its texts, token counts and fields equal ``answer``'s, and ``latency_s`` is the batch's wall
    time divided by its size (the cost per answer; ``extra["batch_size"]`` says how many shared it).
    """

    name: str
    runner: PromptRunner

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        raise NotImplementedError

    def answer(self, sample: Sample) -> Prediction:
        t0 = time.perf_counter()
        job, fields = self.prepare(sample)
        gen = self.runner.run(job.question, job.passages, job.config, job.initial_experts,
                              job.router)
        return prediction(gen, t0, **fields(gen))

    def answer_batch(self, samples: Sequence[Sample]) -> list[Prediction]:
        t0 = time.perf_counter()
        prepared = [self.prepare(s) for s in samples]
        gens = self.runner.run_batch([job for job, _ in prepared])
        per_answer = (time.perf_counter() - t0) / len(samples)
        out = []
        for gen, (_, fields) in zip(gens, prepared, strict=True):
            f = fields(gen)
            f["extra"] = {**f.get("extra", {}), "batch_size": len(samples)}
            out.append(Prediction(text=gen.text, latency_s=per_answer,
                                  generated_tokens=len(gen.token_ids),
                                  prefill_tokens=gen.prefill_tokens, **f))
        return out

    def close(self) -> None:
        self.runner.close()
