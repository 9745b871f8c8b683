"""``build_method(name, resources, task)``: every method by name, from the artefacts it needs.

==================  ===================================================  ==========================
name                what it is                                           needs in ``Resources``
==================  ===================================================  ==========================
``base``            question only                                        –
``rag``             BM25 top-k passages in the prompt                    –
``flare``           retrieve on a low-confidence token, regenerate       –
``dmoe``            entropy-triggered routing of final-layer experts     ``load_experts``
``dmoe_random``     control: dmoe's trigger, uniformly random experts    ``load_experts``
``dmoe_shuffled``   control: dmoe's routing, hits sent to other units'   ``load_experts``
                    experts (a seeded derangement of the expert ids)
``dmoe_oracle``     upper bound: dmoe's trigger, routed to the sample's   ``load_experts``
                    gold units' experts (evaluation only: it reads the
                    answer key)
``prag``            merged top-k passage LoRAs for the whole answer      ``load_experts``
``prag_combine``    ``prag`` + the passages in the prompt                ``load_experts``
``sft_lora``        one corpus-wide LoRA                                 ``sft_lora``
``poly_prag``       top-k passages mix a latent LoRA pool                ``poly_pool``+``poly_routing``
==================  ===================================================  ==========================

Passage retrieval (and the default DMoE router, when no bank index is given) is BM25 over the task
corpus, with expert id = unit id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dmoe.baselines.methods import BaseMethod, FlareMethod, RagMethod
from dmoe.baselines.parametric import (
    DmoeMethod,
    PolyPragMethod,
    PolyRouting,
    PragMethod,
    SftLoraMethod,
)
from dmoe.baselines.protocol import METHOD_NAMES, Method, MethodConfig
from dmoe.baselines.retrieval import PassageRetriever
from dmoe.engine.decode import ExpertLoader
from dmoe.errors import DmoeError
from dmoe.experts.lora import Expert, ExpertAdapter
from dmoe.routing.base import Router
from dmoe.routing.simple import RandomRouter, ShuffledRouter
from dmoe.samples import Sample

__all__ = ["METHOD_NAMES", "Resources", "attach_bank", "build_method"]



@dataclass
class Resources:
    """What methods share: the model (loaded once) and the trained artefacts that exist."""

    model: Any
    tokenizer: Any
    adapter: ExpertAdapter  # last-layer adapter (dmoe, and prag unless prag_adapter is given)
    config: MethodConfig = field(default_factory=MethodConfig)
    load_experts: ExpertLoader | None = None  # unit id -> expert (the bank), for dmoe / prag
    router: Router | None = None  # dmoe router over expert surrogates; default: BM25 on the corpus
    expert_of: Callable[[str], str | None] | None = None  # unit id -> expert id (default: same)
    expert_ids: Sequence[str] = ()  # every expert (controls); default: the corpus units' experts
    prag_adapter: ExpertAdapter | None = None  # if PRAG experts cover more layers
    sft_lora: Expert | None = None
    poly_pool: Sequence[Expert] = ()
    poly_routing: PolyRouting | None = None


def _need(value: Any, method: str, what: str) -> Any:
    if value is None or (isinstance(value, Sequence) and not value):
        raise DmoeError(f"method {method!r} needs {what}, which was not given")
    return value


def build_method(name: str, res: Resources, retriever: PassageRetriever) -> Method:
    """Method ``name`` over the task whose corpus ``retriever`` indexes."""
    m, tok, cfg = res.model, res.tokenizer, res.config
    if name == "base":
        return BaseMethod(m, tok, res.adapter, cfg)
    if name == "rag":
        return RagMethod(m, tok, res.adapter, retriever, cfg)
    if name == "flare":
        return FlareMethod(m, tok, res.adapter, retriever, cfg)
    if name in ("dmoe", "dmoe_random", "dmoe_shuffled", "dmoe_oracle"):
        loader = _need(res.load_experts, name, "an expert bank (--experts DIR)")
        router: Router = res.router or retriever
        ids = res.expert_ids or [e for e in map(res.expert_of or (lambda u: u), retriever.units)
                                 if e is not None]
        if name == "dmoe_random":
            router = RandomRouter(ids, seed=cfg.seed)
        elif name == "dmoe_shuffled":
            router = ShuffledRouter(router, ids, seed=cfg.seed)
        method = DmoeMethod(m, tok, res.adapter, loader, router, cfg,
                            gold_experts=_gold_experts(res) if name == "dmoe_oracle" else None)
        method.name = name
        return method
    if name in ("prag", "prag_combine"):
        loader = _need(res.load_experts, name, "an expert bank (--experts DIR)")
        return PragMethod(m, tok, res.prag_adapter or res.adapter, loader, retriever, cfg,
                          with_passages=name == "prag_combine", expert_of=res.expert_of)
    if name == "sft_lora":
        return SftLoraMethod(m, tok, res.adapter, _need(res.sft_lora, name, "a LoRA (--sft-lora)"),
                             cfg)
    if name == "poly_prag":
        pool = _need(res.poly_pool, name, "a latent LoRA pool")
        routing = _need(res.poly_routing, name, "a routing function")
        return PolyPragMethod(m, tok, res.adapter, pool, routing, retriever, cfg)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")


def _gold_experts(res: Resources) -> Callable[[Sample], list[str]]:
    """A sample -> its gold units' experts (the oracle's routes), in the order given."""
    expert_of = res.expert_of or (lambda unit_id: unit_id)

    def gold(sample: Sample) -> list[str]:
        return [e for e in map(expert_of, sample.gold_unit_ids) if e is not None]

    return gold


def attach_bank(res: Resources, bank: Any, cache_capacity: int = 64) -> None:
    """Use an ``ExpertBank`` for dmoe/prag: a cached loader, BM25 over the bank's surrogates as
    the dmoe router (the design's routing text), and unit id -> expert id for prag."""
    from dmoe.experts.cache import ExpertCache
    from dmoe.routing.bm25 import BM25Index, BM25Router

    res.load_experts = ExpertCache(bank.loader(), capacity=cache_capacity)
    index = BM25Index.in_memory()
    index.add_many(bank.surrogates().items())
    res.router = BM25Router(index)
    infos = bank.list()
    res.expert_of = {info.unit_id: info.id for info in infos}.get
    res.expert_ids = [info.id for info in infos]
