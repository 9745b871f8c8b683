"""Route replay: its first admitted expert is the one a real dmoe run with real experts admits."""

import dataclasses

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from dmoe.baselines import MethodConfig
from dmoe.baselines.parametric import DmoeMethod
from dmoe.corpus.units import KnowledgeUnit
from dmoe.eval.datasets import Sample
from dmoe.eval.replay import first_admitted, replay, replay_runner, score
from dmoe.experts.cache import ExpertCache
from dmoe.experts.lora import ExpertAdapter, LoraSpec, random_expert
from dmoe.routing.base import RouteHit
from dmoe.routing.bm25 import BM25Index, BM25Router

CORPUS = [
    KnowledgeUnit("paris", "Paris is the capital of France and its largest city."),
    KnowledgeUnit("rome", "Rome is the capital of Italy, on the river Tiber."),
    KnowledgeUnit("nile", "The Nile flows north into the Mediterranean sea."),
    KnowledgeUnit("moon", "The Moon orbits the Earth once a month."),
    KnowledgeUnit("tea", "Green tea is brewed from unoxidised leaves."),
]
QUESTIONS = ["What is the capital of France?", "Which river flows through Rome?",
             "Where does the Nile flow?", "What orbits the Earth?", "Who wrote Hamlet?",
             "How is green tea made in France?", "capital sea month leaves"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=2)
    spec = LoraSpec(rank=4, alpha=16)
    adapter = ExpertAdapter(model, spec)
    g = torch.Generator().manual_seed(5)
    bank = {u.id: random_expert(u.id, adapter.mlp_shapes, spec, g, std=0.5) for u in CORPUS}
    index = BM25Index.in_memory()
    index.add_many((u.id, u.text) for u in CORPUS)
    return model, adapter, ExpertCache(bank.__getitem__), BM25Router(index)


class GrowingRouter:
    """Relevance grows with the query (question + generated text), and the expert changes with
    its length: a gate then first admits at some later trigger, on generated text."""

    def route(self, query: str, k: int) -> list[RouteHit]:
        return [RouteHit(CORPUS[len(query) % len(CORPUS)].id, float(len(query)),
                         min(1.0, len(query) / 60))]


# this seeded random model's next-token entropies lie around 5.22-5.30 nats: tau 5.26 triggers
# at some steps and not at others, so the replay must reproduce where triggers fire
CFG = MethodConfig(max_new_tokens=12, stop_strings=(), tau=5.26)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("routing", ["bm25", "growing"])
def test_replay_first_admission_equals_real_runs(setup, batch_size, routing):
    model, adapter, loader, bm25 = setup
    router = bm25 if routing == "bm25" else GrowingRouter()
    tok = CharTokenizer()
    routes = replay(replay_runner(model, tok, adapter, router, CFG), router, QUESTIONS, CFG,
                    batch_size=batch_size, progress=False)
    assert [r["question"] for r in routes] == QUESTIONS
    n_routes = [len(r["routes"]) for r in routes]
    assert min(n_routes) >= 2 and max(n_routes) < 1 + CFG.max_new_tokens  # some steps skip
    gates = (0.0, 0.12, 0.2, 0.3) if routing == "bm25" else (0.0, 0.7, 0.8, 0.9, 1.0)
    outcomes = set()
    for gate in gates:
        method = DmoeMethod(model, tok, adapter, loader, router,
                            dataclasses.replace(CFG, route_min_relevance=gate))
        try:
            for q, r in zip(QUESTIONS, routes, strict=True):
                real = method.answer(Sample(q, q, ("x",))).active_experts
                first = real[0] if real else None
                assert first_admitted(r["routes"], gate, gate) == first, (gate, q)
                at = next((i for i, x in enumerate(r["routes"])
                           if x["expert"] is not None and x["relevance"] >= gate), None)
                outcomes.add("none" if at is None else
                             "text" if r["routes"][at]["with_text"] else "question")
        finally:
            method.close()
    # every kind of first admission occurred: none, on the question, on generated text
    assert outcomes == ({"none", "question"} if routing == "bm25" else
                        {"none", "question", "text"}), outcomes


def test_first_admitted_and_score_by_hand():
    routes = [{"expert": "a", "relevance": 0.45, "with_text": False},
              {"expert": "a", "relevance": 0.45, "with_text": False},
              {"expert": "b", "relevance": 0.6, "with_text": True}]
    assert first_admitted(routes, 0.4, 0.4) == "a"
    assert first_admitted(routes, 0.5, 0.5) == "b"
    assert first_admitted(routes, 0.5, float("inf")) is None
    assert first_admitted(routes, 0.3, 0.7) == "a"
    eff = [{"id": "a", "routes": routes}, {"id": "c", "routes": routes[2:]}]
    unrelated = [{"id": "z", "routes": routes[:1]}]
    row = next(r for r in score(eff, unrelated) if r["question_gate"] == 0.5
               and r["text_gate"] == 0.5)
    assert row == {"question_gate": 0.5, "text_gate": 0.5, "own_first": 0.0,
                   "other_first": 1.0, "unrelated_admitted": 0.0}
