"""Every method end to end on a tiny random model and a tiny corpus, through the one protocol."""

import pytest
import torch
from conftest import tiny_model

from dmoe.baselines import (
    METHOD_NAMES,
    Method,
    MethodConfig,
    PassageRetriever,
    Resources,
    build_method,
)
from dmoe.baselines.methods import first_low_confidence
from dmoe.baselines.retrieval import passage_text
from dmoe.corpus.units import KnowledgeUnit
from dmoe.errors import DmoeError
from dmoe.eval.datasets import Sample
from dmoe.experts.cache import ExpertCache
from dmoe.experts.lora import ExpertAdapter, LoraSpec, compose, random_expert, scaled_expert
from dmoe.prompts import encode_prompt

CORPUS = [
    KnowledgeUnit("u-paris", "Paris is the capital of France.", "Paris"),
    KnowledgeUnit("u-rome", "Rome is the capital of Italy.", "Rome"),
    KnowledgeUnit("u-nile", "The Nile flows into the sea.", "Nile"),
    KnowledgeUnit("u-moon", "The Moon orbits the Earth.", "Moon"),
]
SAMPLE = Sample("q1", "What is the capital of France?", ("Paris",), gold_unit_ids=("u-paris",))
CFG = MethodConfig(max_new_tokens=6, stop_strings=(), top_k=2, dmoe_top_k=0, route_at_start=False,
                   route_min_relevance=0.0)  # the paper's routing, not the shipped defaults


@pytest.fixture(scope="module")
def res():
    from conftest import CharTokenizer

    model = tiny_model("llama", layers=2)
    spec = LoraSpec(rank=4, alpha=16)
    adapter = ExpertAdapter(model, spec)
    g = torch.Generator().manual_seed(3)
    bank = {u.id: random_expert(u.id, adapter.mlp_shapes, spec, g, std=0.3) for u in CORPUS}
    pool = [random_expert(f"latent{j}", adapter.mlp_shapes, spec, g, std=0.3) for j in range(2)]
    routing = {u.id: {i % 2: 0.5 + 0.1 * i} for i, u in enumerate(CORPUS)}
    return Resources(model, CharTokenizer(), adapter, CFG, load_experts=ExpertCache(bank.__getitem__),
                     sft_lora=random_expert("sft", adapter.mlp_shapes, spec, g, std=0.3),
                     poly_pool=pool, poly_routing=routing.__getitem__)


@pytest.fixture(scope="module")
def retriever():
    r = PassageRetriever(CORPUS)
    yield r
    r.close()


def answer(res, retriever, name, **overrides):
    import dataclasses

    res = dataclasses.replace(res, config=dataclasses.replace(CFG, **overrides))
    method = build_method(name, res, retriever)
    try:
        assert isinstance(method, Method) and method.name == name
        return method.answer(SAMPLE)
    finally:
        method.close()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_answers_and_leaves_no_expert_active(res, retriever, name):
    pred = answer(res, retriever, name)
    assert isinstance(pred.text, str) and 1 <= pred.generated_tokens <= 6 * 3
    assert pred.latency_s > 0 and pred.prefill_tokens >= len(encode_prompt(res.tokenizer, SAMPLE.question))
    assert res.adapter.active == ()  # nothing leaks into the next method


def test_base_and_rag_prompts(res, retriever):
    tok = res.tokenizer
    base = answer(res, retriever, "base")
    assert base.prefill_tokens == len(encode_prompt(tok, SAMPLE.question)) and base.triggers == 0
    rag = answer(res, retriever, "rag")
    assert rag.retrieved[0] == "u-paris" and len(rag.retrieved) == 2
    passages = [passage_text(next(u for u in CORPUS if u.id == i)) for i in rag.retrieved]
    assert rag.prefill_tokens == len(encode_prompt(tok, SAMPLE.question, passages))


def test_flare_retrieves_on_low_confidence_and_regenerates(res, retriever):
    base, rag = answer(res, retriever, "base"), answer(res, retriever, "rag")
    never = answer(res, retriever, "flare", flare_threshold=0.0)
    assert never.text == base.text and never.triggers == 0 and never.retrieved == ()
    always = answer(res, retriever, "flare", flare_threshold=1.0, flare_max_retrievals=1)
    # first token is "low confidence" -> query = question alone -> RAG's passages, from scratch
    assert always.triggers == 1 and always.retrieved == rag.retrieved and always.text == rag.text
    assert always.prefill_tokens == base.prefill_tokens + rag.prefill_tokens
    assert always.generated_tokens == base.generated_tokens + rag.generated_tokens
    assert always.extra["low_conf_at"] == [0]


def test_first_low_confidence():
    sure, unsure = torch.tensor([10.0, 0.0, 0.0]), torch.zeros(3)
    assert first_low_confidence([sure, sure, unsure, unsure], 0.5) == 2
    assert first_low_confidence([sure], 0.5) is None


def test_dmoe_routes_without_reprefill(res, retriever):
    base = answer(res, retriever, "base")
    never = answer(res, retriever, "dmoe", trigger="never")
    assert never.text == base.text and never.triggers == 0 and never.active_experts == ()
    always = answer(res, retriever, "dmoe", trigger="always")
    assert always.triggers == always.generated_tokens
    assert always.prefill_tokens == base.prefill_tokens  # swaps never re-prefill
    assert always.active_experts and set(always.active_experts) <= {u.id for u in CORPUS}
    start = answer(res, retriever, "dmoe", trigger="never", route_at_start=True)
    assert start.active_experts[0] == "u-paris" and start.triggers == 0
    assert len(start.active_experts) == CFG.top_k
    # dmoe_top_k sets the experts per route for dmoe alone
    one = answer(res, retriever, "dmoe", trigger="never", route_at_start=True, dmoe_top_k=1)
    assert one.active_experts == ("u-paris",)
    assert answer(res, retriever, "rag", dmoe_top_k=1).retrieved == answer(res, retriever, "rag").retrieved


def test_dmoe_relevance_gate(res, retriever):
    base = answer(res, retriever, "dmoe", trigger="never")
    # "capital of France" matches u-paris (relevance 0.21) and u-rome on "capital" only (0.08)
    start = answer(res, retriever, "dmoe", trigger="never", route_at_start=True,
                   route_min_relevance=0.15)
    assert start.active_experts == ("u-paris",)
    # nothing is relevant enough: no expert at all, so the answer is the base model's
    shut = answer(res, retriever, "dmoe", trigger="always", route_at_start=True,
                  route_min_relevance=1.0)
    assert shut.active_experts == () and shut.triggers > 0 and shut.text == base.text
    with pytest.raises(ValueError, match="route_min_score"):
        MethodConfig(route_min_score=-1.0)


def test_prag_merges_retrieved_experts(res, retriever):
    rag, prag = answer(res, retriever, "rag"), answer(res, retriever, "prag")
    base = answer(res, retriever, "base")
    assert prag.active_experts == rag.retrieved and prag.retrieved == ()
    assert prag.prefill_tokens == base.prefill_tokens
    comb = answer(res, retriever, "prag_combine")
    assert comb.active_experts == comb.retrieved == rag.retrieved
    assert comb.prefill_tokens == rag.prefill_tokens
    assert answer(res, retriever, "sft_lora").active_experts == ("sft",)


def test_poly_prag_mixes_the_pool(res, retriever):
    poly = answer(res, retriever, "poly_prag")
    mix = poly.extra["mixture"]  # u-paris -> latent0 (0.5), u-rome -> latent1 (0.6)
    assert mix == pytest.approx({"latent0": 0.5, "latent1": 0.6})
    e = res.poly_pool[0]
    a, b = compose([scaled_expert(e, 0.5)], res.adapter.layer_ids[0], "up_proj", torch.device("cpu"),
                   torch.float32)
    a0, b0 = compose([e], res.adapter.layer_ids[0], "up_proj", torch.device("cpu"), torch.float32)
    assert torch.allclose(b @ a, 0.5 * (b0 @ a0))


def test_missing_artefacts_are_named(res, retriever):
    import dataclasses

    bare = dataclasses.replace(res, load_experts=None, sft_lora=None, poly_pool=())
    for name, what in [("dmoe", "expert bank"), ("prag", "expert bank"), ("sft_lora", "LoRA"),
                       ("poly_prag", "pool")]:
        with pytest.raises(DmoeError, match=what):
            build_method(name, bare, retriever)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope", res, retriever)


def test_config_overrides():
    cfg = MethodConfig().with_overrides(["tau=1.5", "route-at-start=true", "stop_strings=\\n,."])
    assert cfg.tau == 1.5 and cfg.route_at_start and cfg.stop_strings == ("\n", ".")
    with pytest.raises(ValueError, match="bad --set"):
        MethodConfig().with_overrides(["nope=1"])
    with pytest.raises(ValueError, match="flare_threshold"):
        MethodConfig(flare_threshold=2.0)


def test_methods_over_an_expert_bank(res, retriever, tmp_path):
    import dataclasses

    from dmoe.baselines.registry import attach_bank
    from dmoe.experts.bank import ExpertBank

    bank = ExpertBank.create(tmp_path / "bank", "fp", "tiny", LoraSpec(rank=4, alpha=16))
    g = torch.Generator().manual_seed(5)
    for u in CORPUS[:3]:  # u-moon has no expert
        e = random_expert(f"x-{u.id}", res.adapter.mlp_shapes, LoraSpec(rank=4, alpha=16), g, std=0.3)
        bank.add(e, unit_id=u.id, content_hash=u.content_hash, settings_hash="s",
                 surrogate=f"{u.title} {u.text}", title=u.title)
    r = dataclasses.replace(res, load_experts=None, router=None)
    attach_bank(r, bank)
    prag = answer(r, retriever, "prag")
    assert prag.active_experts == ("x-u-paris", "x-u-rome")
    dm = answer(r, retriever, "dmoe", trigger="never", route_at_start=True)
    assert dm.active_experts[0] == "x-u-paris"
    bank.close()


def test_dmoe_controls_route_elsewhere(res, retriever):
    real = answer(res, retriever, "dmoe", trigger="never", route_at_start=True, dmoe_top_k=1)
    assert real.active_experts == ("u-paris",)
    shuffled = answer(res, retriever, "dmoe_shuffled", trigger="never", route_at_start=True,
                      dmoe_top_k=1)
    assert len(shuffled.active_experts) == 1 and shuffled.active_experts != ("u-paris",)
    rnd = [answer(res, retriever, "dmoe_random", trigger="always", dmoe_top_k=1, seed=s)
           for s in range(4)]
    assert all(p.triggers == p.generated_tokens for p in rnd)  # dmoe's trigger, unchanged
    assert len({e for p in rnd for e in p.active_experts}) >= 2  # not the one relevant expert


def test_dmoe_oracle_routes_each_sample_to_its_own_gold_experts(res, retriever):
    import dataclasses

    r = dataclasses.replace(res, config=dataclasses.replace(CFG, trigger="always", dmoe_top_k=1))
    method = build_method("dmoe_oracle", r, retriever)
    try:
        preds = {s.id: method.answer(s) for s in BATCH}
    finally:
        method.close()
    assert preds["q1"].active_experts == ("u-paris",)
    assert preds["q2"].active_experts == ("u-nile",)
    assert preds["q3"].active_experts == ("u-moon",)  # top-1 of its two, the first given
    assert preds["q4"].active_experts == () and preds["q4"].triggers > 0  # no gold: no expert


def test_shuffled_router_is_a_derangement_that_keeps_scores():
    from dmoe.routing.base import FunctionRouter
    from dmoe.routing.simple import ShuffledRouter

    ids = [f"e{i}" for i in range(7)]
    inner = FunctionRouter(lambda q, k: ids[:k])
    router = ShuffledRouter(inner, ids, seed=5)
    assert sorted(router.mapping) == sorted(router.mapping.values()) == ids
    assert all(a != b for a, b in router.mapping.items())
    hits, real = router.route("q", 3), inner.route("q", 3)
    assert [h.score for h in hits] == [h.score for h in real]
    assert [h.expert_id for h in hits] == [router.mapping[h.expert_id] for h in real]


BATCH = [SAMPLE, Sample("q2", "Where does the Nile flow?", ("sea",), gold_unit_ids=("u-nile",)),
         Sample("q3", "What orbits the Earth?", ("Moon",), gold_unit_ids=("u-moon", "u-nile")),
         Sample("q4", "Rome is the capital of which country, and since when?", ("Italy",))]


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "flare"])
def test_answer_batch_equals_answer(res, retriever, name):
    """Every one-generation method answers a batch exactly as it answers one by one (dmoe's controls
    included; the dmoe arms re-route at every step)."""
    import dataclasses

    res = dataclasses.replace(res, config=dataclasses.replace(
        CFG, max_new_tokens=8, trigger="always", route_at_start=True))
    method = build_method(name, res, retriever)
    try:
        one = [method.answer(s) for s in BATCH]
        many = method.answer_batch(BATCH)
    finally:
        method.close()
    for a, b in zip(one, many, strict=True):
        assert (a.text, a.generated_tokens, a.prefill_tokens, a.triggers, a.active_experts,
                a.retrieved) == (b.text, b.generated_tokens, b.prefill_tokens, b.triggers,
                                 b.active_experts, b.retrieved)
        assert b.extra.pop("batch_size") == len(BATCH) and a.extra == b.extra
    assert res.adapter.active == () and all(m.lora is None for m in res.adapter.mlps.values())
    if name.startswith("dmoe") or name.startswith("prag") or name in ("sft_lora", "poly_prag"):
        assert any(p.active_experts for p in one), "the batch must hold experts to prove anything"
