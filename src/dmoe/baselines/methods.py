"""The non-parametric methods: ``base`` (no knowledge), ``rag`` (Basic-RAG) and ``flare``.

- **base**: the question alone, greedy.
- **rag**: BM25 top-k (3) passages for the question, in the prompt.
- **flare** (Jiang et al. 2023, "direct" variant): generate the answer without passages (the
  forward-looking tentative answer); at the first token whose max probability is below
  ``flare_threshold``, retrieve BM25 top-k with question + the text generated before that token,
  and regenerate **from scratch** with those passages in the prompt (the prompt changed, so nothing
  of the KV cache can be kept: every retrieval costs a full re-prefill, counted in
  ``prefill_tokens``). The check repeats on the new generation, at most ``flare_max_retrievals``
  times (and never twice with the same query). The tentative generation is run to its end (one line) before the check, as FLARE's
  look-ahead sentence is; its tokens are counted in ``generated_tokens``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dmoe.baselines.generate import Fields, Job, OneShotMethod, PromptRunner, decode_config
from dmoe.baselines.protocol import MethodConfig, Prediction
from dmoe.baselines.retrieval import PassageRetriever, passage_text
from dmoe.experts.lora import ExpertAdapter
from dmoe.routing.base import build_query
from dmoe.samples import Sample


class BaseMethod(OneShotMethod):
    """The frozen model with no external knowledge."""

    name = "base"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 config: MethodConfig | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.runner = PromptRunner(model, tokenizer, adapter)

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        return Job(sample.question, (), decode_config(self.cfg)), lambda gen: {}


class RagMethod(OneShotMethod):
    """Basic-RAG: BM25 top-k passages for the question in the prompt."""

    name = "rag"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 retriever: PassageRetriever, config: MethodConfig | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.retriever = retriever
        self.runner = PromptRunner(model, tokenizer, adapter)

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        units = self.retriever.retrieve(sample.question, self.cfg.top_k)
        job = Job(sample.question, [passage_text(u) for u in units], decode_config(self.cfg))
        return job, lambda gen: {"retrieved": tuple(u.id for u in units)}


def first_low_confidence(logits: list[torch.Tensor], threshold: float) -> int | None:
    """Index of the first step whose max softmax probability is below ``threshold``."""
    for i, step in enumerate(logits):
        if float(torch.softmax(step.float(), dim=-1).max()) < threshold:
            return i
    return None


class FlareMethod:
    """FLARE-direct: retrieve on the first low-confidence token and regenerate with passages."""

    name = "flare"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 retriever: PassageRetriever, config: MethodConfig | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.runner = PromptRunner(model, tokenizer, adapter)

    def answer(self, sample: Sample) -> Prediction:
        t0 = time.perf_counter()
        dcfg = decode_config(self.cfg, record_logits=True)
        passages: list[str] = []
        retrieved: tuple[str, ...] = ()
        generated = retrievals = 0
        prefilled = 0.0
        low_at: list[int] = []
        queries: list[str] = []
        while True:
            gen = self.runner.run(sample.question, passages, dcfg)
            generated += len(gen.token_ids)
            prefilled += gen.prefill_tokens
            i = first_low_confidence(gen.logits, self.cfg.flare_threshold)
            if i is None or retrievals >= self.cfg.flare_max_retrievals:
                break
            # retrieve with question + the confident prefix, then regenerate from scratch
            prefix = self.tokenizer.decode(gen.token_ids[:i], skip_special_tokens=True)
            query = build_query(sample.question, prefix, self.tokenizer, self.cfg.query_max_tokens)
            if query in queries:
                break  # same query as an earlier retrieval: it would fetch the same passages
            queries.append(query)
            low_at.append(i)
            units = self.retriever.retrieve(query, self.cfg.top_k)
            retrievals += 1
            if tuple(u.id for u in units) == retrieved:
                break  # same passages as the generation just made: it would repeat itself
            passages = [passage_text(u) for u in units]
            retrieved = tuple(u.id for u in units)
        return Prediction(text=gen.text, latency_s=time.perf_counter() - t0,
                          generated_tokens=generated, prefill_tokens=prefilled,
                          triggers=retrievals, retrieved=retrieved, extra={"low_conf_at": low_at})

    def close(self) -> None:
        self.runner.close()
