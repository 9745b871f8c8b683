"""The parametric methods: knowledge as LoRA weights instead of (or beside) prompt text.

Every class takes its trained artefacts as constructor arguments (an expert loader, a single LoRA,
a latent pool) so the training code stays elsewhere; all of them generate through the shared
greedy ``Engine`` and the one prompt frame.

- **dmoe**: per-unit experts on the last layer's MLP, swapped by the BM25 router when the
  next-token entropy exceeds ``tau``, no re-prefill (the design in ``dmoe.engine.decode``); routed
  experts below ``route_min_score`` / ``route_min_relevance`` are dropped (none left: base model).
- **prag** (PRAG, Su et al. 2025): BM25 top-k passages for the question; their per-passage LoRAs are
  merged (rank-concatenated sum) and active for the whole answer, prompt = question only.
  *Layers*: whatever the loaded experts cover (``ExpertAdapter(model, LoraSpec(n_layers=...))``).
  PRAG itself puts LoRAs on every layer's FFN; because the set is fixed before prefill, no KV cache
  issue arises at any depth. This harness defaults to the DMoE bank (last-layer FFN) so that
  ``prag`` vs ``dmoe`` isolates *when/what* is routed from *where* experts sit and both share one
  bank's storage; an all-layer PRAG bank only needs an adapter with ``n_layers`` = model depth.
- **prag_combine**: ``prag`` plus the same passages in the prompt.
- **sft_lora**: one LoRA trained on the whole corpus's augmented data, always active.
- **poly_prag** (Poly-PRAG): a small pool of latent LoRAs ``L_1..L_m`` and a routing function giving
  each passage sparse weights ``w_p`` over the pool; a query's top-k passages give the adapter
  ``Σ_p Σ_j w_pj · ΔL_j`` (storage: m LoRAs + k floats per passage, independent of corpus size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dmoe.baselines.generate import (
    Fields,
    Job,
    OneShotMethod,
    PromptRunner,
    decode_config,
    first_seen,
)
from dmoe.baselines.protocol import MethodConfig
from dmoe.baselines.retrieval import PassageRetriever, passage_text
from dmoe.engine.decode import ExpertLoader
from dmoe.engine.triggers import make_trigger
from dmoe.experts.lora import Expert, ExpertAdapter, scaled_expert
from dmoe.routing.base import Router
from dmoe.routing.simple import OracleRouter
from dmoe.samples import Sample


class DmoeMethod(OneShotMethod):
    """DMoE: entropy-triggered BM25 routing of final-layer experts during decoding.

    ``gold_experts`` makes it the oracle arm (``dmoe_oracle``): each sample's triggers route to
    its gold units' experts (an ``OracleRouter`` per generation, so batches stay exact), and a
    sample with none decodes with no expert.
    """

    name = "dmoe"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 load_experts: ExpertLoader, router: Router,
                 config: MethodConfig | None = None,
                 gold_experts: Callable[[Sample], Sequence[str]] | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.router = router
        self.gold_experts = gold_experts
        self.k = self.cfg.dmoe_top_k or self.cfg.top_k  # experts per trigger
        trigger = make_trigger(self.cfg.trigger, self.cfg.tau, self.cfg.trigger_rate, self.cfg.seed)
        self.runner = PromptRunner(model, tokenizer, adapter, load_experts, router, trigger)

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        cfg = dataclasses.replace(decode_config(self.cfg), top_k=self.k)
        router = None if self.gold_experts is None else OracleRouter(self.gold_experts(sample))
        return Job(sample.question, (), cfg, router=router), lambda gen: {
            "triggers": gen.n_triggers, "active_experts": first_seen([r.active for r in gen.records]),
            "extra": {"trigger_steps": [i for i, r in enumerate(gen.records) if r.triggered]}}


class PragMethod(OneShotMethod):
    """PRAG (``with_passages=False``) or PRAG-combine (``True``): merged top-k passage LoRAs."""

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter,
                 load_experts: ExpertLoader, retriever: PassageRetriever,
                 config: MethodConfig | None = None, with_passages: bool = False,
                 expert_of: Callable[[str], str | None] | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.expert_of = expert_of or (lambda unit_id: unit_id)  # unit id -> expert id (or None)
        self.name = "prag_combine" if with_passages else "prag"
        self.with_passages = with_passages
        self.retriever = retriever
        self.runner = PromptRunner(model, tokenizer, adapter, load_experts)

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        units = self.retriever.retrieve(sample.question, self.cfg.top_k)
        ids = [e for e in (self.expert_of(u.id) for u in units) if e is not None]
        passages = [passage_text(u) for u in units] if self.with_passages else []
        retrieved = tuple(u.id for u in units) if self.with_passages else ()
        return (Job(sample.question, passages, decode_config(self.cfg), ids),
                lambda gen: {"active_experts": tuple(ids), "retrieved": retrieved})


class SftLoraMethod(OneShotMethod):
    """One corpus-wide LoRA, active for every answer."""

    name = "sft_lora"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter, lora: Expert,
                 config: MethodConfig | None = None) -> None:
        self.cfg = config or MethodConfig()
        self.lora = lora
        self.runner = PromptRunner(model, tokenizer, adapter, lambda ids: [lora])

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        job = Job(sample.question, (), decode_config(self.cfg), [self.lora.id])
        return job, lambda gen: {"active_experts": (self.lora.id,)}


PolyRouting = Callable[[str], Mapping[int, float]]  # unit id -> {pool index: weight} (sparse)


class PolyPragMethod(OneShotMethod):
    """Poly-PRAG: the top-k passages' routing weights mix a small pool of latent LoRAs."""

    name = "poly_prag"

    def __init__(self, model: Any, tokenizer: Any, adapter: ExpertAdapter, pool: Sequence[Expert],
                 routing: PolyRouting, retriever: PassageRetriever,
                 config: MethodConfig | None = None) -> None:
        if not pool:
            raise ValueError("poly_prag needs a non-empty pool of latent LoRAs")
        self.cfg = config or MethodConfig()
        self.pool = list(pool)
        self.routing = routing
        self.retriever = retriever
        self.runner = PromptRunner(model, tokenizer, adapter, self._load_mix)

    def _load_mix(self, ids: Sequence[str]) -> list[Expert]:
        """``"j*w"`` -> w · pool[j] (``prepare`` names a mixture's terms so; w round-trips)."""
        terms = [i.split("*") for i in ids]
        return [scaled_expert(self.pool[int(j)], float(w), f"{j}*{w}") for j, w in terms]

    def mixture(self, unit_ids: Sequence[str]) -> dict[int, float]:
        """Summed pool weights of the given passages (Σ_p w_p)."""
        total: dict[int, float] = {}
        for uid in unit_ids:
            for j, w in self.routing(uid).items():
                if not 0 <= j < len(self.pool):
                    raise ValueError(f"routing of {uid!r} names pool index {j}, pool has "
                                     f"{len(self.pool)}")
                total[j] = total.get(j, 0.0) + float(w)
        return {j: w for j, w in total.items() if w != 0.0}

    def prepare(self, sample: Sample) -> tuple[Job, Fields]:
        units = self.retriever.retrieve(sample.question, self.cfg.top_k)
        mix = sorted(self.mixture([u.id for u in units]).items())
        job = Job(sample.question, (), decode_config(self.cfg), [f"{j}*{w!r}" for j, w in mix])
        return job, lambda gen: {"active_experts": tuple(self.pool[j].id for j, _ in mix),
                                 "extra": {"mixture": {self.pool[j].id: w for j, w in mix}}}
