"""The one protocol every method answers through, its output record, and the shared knobs.

A ``Method`` turns a ``Sample`` into a ``Prediction``: the raw generation plus what it cost. Methods
are built once per (method, task) by ``dmoe.baselines.registry.build_method`` and own whatever they
need (an engine, a retriever, experts); the runner only calls ``answer`` and ``close``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dmoe.engine.decode import DecodeConfig as _D
from dmoe.engine.decode import KVPolicy
from dmoe.engine.triggers import DEFAULT_TAU
from dmoe.eval.metrics import ANSWER_STOPS
from dmoe.experts.lora import Composition
from dmoe.samples import Sample

METHOD_NAMES = ("base", "rag", "flare", "prag", "prag_combine", "sft_lora", "poly_prag", "dmoe",
                "dmoe_random", "dmoe_shuffled", "dmoe_oracle")  # dmoe's controls and upper bound


@dataclass(frozen=True)
class Prediction:
    """One method's answer to one sample and its cost."""

    text: str  # raw generation (scoring extracts the answer from it)
    latency_s: float  # wall time of ``answer`` (retrieval, prompt building, every forward pass)
    generated_tokens: int  # tokens decoded, summed over every (re)generation
    prefill_tokens: float  # prompt tokens run through the full model, summed over re-prefills (a partial
    # recompute of N of L layers counts N/L per position, kv_policy="partial")
    triggers: int = 0  # DMoE re-routings / FLARE retrievals
    active_experts: tuple[str, ...] = ()  # every expert id active at some point, first-use order
    retrieved: tuple[str, ...] = ()  # passage ids put in the prompt (final generation)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific details (JSON-safe)


@runtime_checkable
class Method(Protocol):
    """Anything that answers samples; ``name`` is the row label in every table."""

    name: str

    def answer(self, sample: Sample) -> Prediction: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class MethodConfig:
    """Knobs shared by all methods (set with ``dmoe eval --set key=value``)."""

    max_new_tokens: int = 32  # generation cap per (re)generation
    stop_strings: tuple[str, ...] = ANSWER_STOPS  # where the scored answer ends (first line's
    # first sentence, eval.metrics): what follows is never scored, so it is not generated
    top_k: int = 3  # passages (rag, flare, prag, poly_prag) and, unless dmoe_top_k, dmoe experts
    dmoe_top_k: int = _D.top_k  # experts per dmoe route; 0 = top_k (the paper: 3 for both)
    query_max_tokens: int = 128  # router / retriever query = last this-many tokens
    flare_threshold: float = 0.5  # FLARE retrieves at the first token whose max prob is below this
    flare_max_retrievals: int = 2  # FLARE retrievals (= regenerations) per sample at most
    trigger: str = "entropy"  # dmoe trigger policy: entropy | always | never | random
    tau: float = DEFAULT_TAU  # dmoe entropy threshold in nats (paper 2.0)
    trigger_rate: float = 0.1  # for trigger=random
    # dmoe's routing knobs default to the engine's shipped defaults (DecodeConfig)
    route_at_start: bool = _D.route_at_start  # dmoe: also route on the question before prefill
    route_min_score: float = _D.min_score  # dmoe relevance gate: drop experts with raw score below
    route_min_relevance: float = _D.min_relevance  # ... or relevance (BM25 score / query max)
    # below (scripts/calibrate_router.py); no hit passes -> no expert (base model)
    composition: Composition = _D.composition  # "cat" (the paper's Σ Δ_i) | "softmax" (λ-scaled mix)
    composition_temperature: float = _D.composition_temperature  # T of softmax over relevances
    composition_scale: float = _D.composition_scale  # λ, the convex mix's overall strength
    no_repeat_ngram: int = _D.no_repeat_ngram  # every method: greedy never repeats a generated
    # n-gram of this length (0 = off)
    kv_policy: KVPolicy = _D.kv_policy  # dmoe, experts on > 1 layer: recompute | partial | stale
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.dmoe_top_k < 0:
            raise ValueError(f"dmoe_top_k must be >= 0 (0 = top_k), got {self.dmoe_top_k}")
        if not 0.0 <= self.flare_threshold <= 1.0:
            raise ValueError(f"flare_threshold must be in [0, 1], got {self.flare_threshold}")
        if self.route_min_score < 0 or self.route_min_relevance < 0:
            raise ValueError(f"route_min_score and route_min_relevance must be >= 0, got "
                             f"{self.route_min_score} and {self.route_min_relevance}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0 (0 = off), got {self.no_repeat_ngram}")
        if self.flare_max_retrievals < 0:
            raise ValueError(f"flare_max_retrievals must be >= 0, got {self.flare_max_retrievals}")

    def with_overrides(self, pairs: list[str]) -> MethodConfig:
        """``["tau=1.5", "stop_strings=\\n,."]`` -> a new config; values parsed by field type."""
        changes: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise ValueError(f"bad --set {pair!r}; keys: {', '.join(fields)}")
            current = getattr(self, key)
            if isinstance(current, bool):
                changes[key] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(current, tuple):
                changes[key] = tuple(s.encode().decode("unicode_escape") for s in raw.split(",") if s)
            else:
                changes[key] = type(current)(raw)
        return dataclasses.replace(self, **changes)
