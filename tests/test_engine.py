"""The decode loop against a no-cache reference, HF generate, and its trigger bookkeeping."""

import functools
import itertools
import math

import pytest
import torch
from conftest import reference_logits, tiny_model

from dmoe.engine.decode import DecodeConfig, Engine, repeated_ngram_tokens
from dmoe.engine.triggers import (
    AlwaysTrigger,
    EntropyTrigger,
    NeverTrigger,
    RandomTrigger,
    ScheduleTrigger,
    make_trigger,
    token_entropy,
)
from dmoe.experts.cache import ExpertCache
from dmoe.experts.lora import ExpertAdapter, LoraSpec, composition_weights, random_expert
from dmoe.routing.base import FunctionRouter, RouteHit

# The paper's mechanics (3 experts, routes on triggers only, no relevance gate, plain greedy), stated
# explicitly so these tests do not follow the shipped defaults.
PaperDecode = functools.partial(DecodeConfig, top_k=3, route_at_start=False, min_relevance=0.0,
                                no_repeat_ngram=0)

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 33, 64]])


def setup(arch="llama", layers=2, n_layers=1, n_experts=6, schedule=(0, 3, 7), std=0.3):
    model = tiny_model(arch, layers=layers)
    spec = LoraSpec(rank=4, alpha=16, n_layers=n_layers)
    adapter = ExpertAdapter(model, spec)
    g = torch.Generator().manual_seed(1)
    bank = {f"e{i}": random_expert(f"e{i}", adapter.mlp_shapes, spec, g, std=std)
            for i in range(n_experts)}
    sets = itertools.cycle([["e0", "e1", "e2"], ["e3"], ["e4", "e5"]])
    router = FunctionRouter(lambda q, k: next(sets))
    cache = ExpertCache(bank.__getitem__, capacity=4)
    return model, adapter, bank, router, cache, ScheduleTrigger.at(schedule)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_cached_engine_equals_no_cache_recompute(tokenizer, arch):
    model, adapter, bank, router, cache, trigger = setup(arch)
    engine = Engine(model, tokenizer, adapter, cache, router, trigger)
    gen = engine.generate(PROMPT, "task", PaperDecode(max_new_tokens=12, record_logits=True,
                                                       ignore_eos=True))
    assert [r.triggered for r in gen.records].count(True) == 3
    assert {r.active for r in gen.records} == {("e0", "e1", "e2"), ("e3",), ("e4", "e5")}
    assert gen.prefill_tokens == PROMPT.shape[1], "last-layer experts must never re-prefill"
    ref = reference_logits(model, adapter, bank, PROMPT, gen)
    diff = (torch.stack(gen.logits) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    # The experts matter: without swapping, position logits differ from the reference.
    adapter.activate([])
    plain = reference_logits(model, adapter, {}, PROMPT, type(gen)(
        gen.token_ids, "", [type(r)(r.token_id, r.entropy, False, ()) for r in gen.records],
        "length", 0))
    assert (plain - ref).abs().max() > 1e-2


@pytest.mark.parametrize("policy,should_agree", [("recompute", True), ("stale", False)])
def test_multi_layer_experts_need_recompute(tokenizer, policy, should_agree):
    model, adapter, bank, router, cache, trigger = setup(layers=3, n_layers=2, schedule=(2, 6))
    engine = Engine(model, tokenizer, adapter, cache, router, trigger)
    cfg = PaperDecode(max_new_tokens=10, record_logits=True, ignore_eos=True, kv_policy=policy)
    gen = engine.generate(PROMPT, "task", cfg)
    diff = (torch.stack(gen.logits) - reference_logits(model, adapter, bank, PROMPT, gen)).abs().max()
    if should_agree:
        assert diff <= 1e-4, diff
        assert gen.prefill_tokens > PROMPT.shape[1]  # it re-prefilled on each trigger
    else:
        assert diff > 1e-3, f"stale cache should be visible, max diff {diff}"
        assert gen.prefill_tokens == PROMPT.shape[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_partial_recompute_of_the_expert_layers_equals_a_full_recompute(tokenizer, arch):
    """kv_policy="partial": re-running only the last N layers from the stored residual stream is
    exact (max abs logit diff <= 1e-4 in fp32) and costs N/L of a re-prefill per trigger."""
    model, adapter, bank, router, cache, trigger = setup(arch, layers=4, n_layers=2,
                                                         schedule=(0, 2, 6))
    engine = Engine(model, tokenizer, adapter, cache, router, trigger)
    runs = {}
    for policy in ("recompute", "partial"):
        cfg = PaperDecode(max_new_tokens=10, record_logits=True, ignore_eos=True, kv_policy=policy)
        runs[policy] = engine.generate(PROMPT, "task", cfg)
    full, partial = runs["recompute"], runs["partial"]
    assert partial.token_ids == full.token_ids
    assert (torch.stack(partial.logits) - torch.stack(full.logits)).abs().max() <= 1e-4
    ref = reference_logits(model, adapter, bank, PROMPT, partial)
    assert (torch.stack(partial.logits) - ref).abs().max() <= 1e-4
    lengths = [PROMPT.shape[1] + t for t in (0, 2, 6)]  # positions re-run at each trigger
    assert full.prefill_tokens == PROMPT.shape[1] + sum(lengths)
    assert partial.prefill_tokens == pytest.approx(PROMPT.shape[1] + sum(lengths) * 2 / 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_no_experts_equals_hf_generate(tokenizer, arch):
    model = tiny_model(arch)
    adapter = ExpertAdapter(model, LoraSpec())
    engine = Engine(model, tokenizer, adapter)
    gen = engine.generate(PROMPT, config=PaperDecode(max_new_tokens=20))
    hf = model.generate(PROMPT, max_new_tokens=20, do_sample=False)[0, PROMPT.shape[1]:].tolist()
    assert gen.token_ids == hf
    assert gen.n_triggers == 0


def test_trigger_records_query_and_active_set(tokenizer):
    model, adapter, bank, router, cache, _ = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, AlwaysTrigger())
    gen = engine.generate(PROMPT, "what is x?", PaperDecode(max_new_tokens=4, ignore_eos=True,
                                                              query_max_tokens=12))
    assert gen.n_triggers == 4 and len(gen.trigger_s) == 4
    assert router.queries[0] == "what is x?"
    assert all(len(tokenizer.encode(q)) <= 12 for q in router.queries)
    assert gen.records[0].active == ("e0", "e1", "e2") and gen.records[1].active == ("e3",)
    # LRU of 4: e0 e1 e2 | e3 | e4 e5 (evicts e0 e1) | e0 e1 e2 (all evicted by then) = 9 loads.
    assert cache.misses == 9 and len(cache) == 4  # bounded by capacity, not by the bank


def test_routing_off_decodes_like_the_base_model(tokenizer):
    model, adapter, bank, router, cache, _ = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, AlwaysTrigger())
    cfg = PaperDecode(max_new_tokens=6, ignore_eos=True)
    off = engine.generate(PROMPT, "q", cfg, routing=False)
    plain = Engine(model, tokenizer, adapter).generate(PROMPT, config=cfg)
    assert off.n_triggers == 0 and not router.queries
    assert off.token_ids == plain.token_ids


class ScoredRouter:
    """Cycles through fixed hit lists with relevances: relevant, irrelevant, half relevant."""

    def __init__(self) -> None:
        self.sets = itertools.cycle([
            [RouteHit("e0", 9.0, 0.9), RouteHit("e1", 8.0, 0.8)],
            [RouteHit("e3", 2.0, 0.1), RouteHit("e4", 1.0, 0.05)],
            [RouteHit("e5", 7.0, 0.7), RouteHit("e2", 1.5, 0.1)],
        ])

    def route(self, query, k):
        return next(self.sets)[:k]


@pytest.mark.parametrize("gate,expected", [
    (0.0, [("e0", "e1"), ("e3", "e4"), ("e5", "e2")]),  # default: every hit, as before the gate
    (0.5, [("e0", "e1"), (), ("e5",)]),  # irrelevant hits dropped; none left -> no expert
])
def test_relevance_gate_sets_the_active_set(tokenizer, gate, expected):
    model, adapter, bank, _, cache, trigger = setup()  # triggers at steps 0, 3, 7
    engine = Engine(model, tokenizer, adapter, cache, ScoredRouter(), trigger)
    cfg = PaperDecode(max_new_tokens=10, record_logits=True, ignore_eos=True, min_relevance=gate)
    gen = engine.generate(PROMPT, "task", cfg)
    active = [r.active for r in gen.records]
    assert active == [expected[0]] * 3 + [expected[1]] * 4 + [expected[2]] * 3
    assert gen.n_triggers == 3 and gen.prefill_tokens == PROMPT.shape[1]
    ref = reference_logits(model, adapter, bank, PROMPT, gen)  # () = the plain base model
    assert (torch.stack(gen.logits) - ref).abs().max().item() <= 1e-4


def test_gate_thresholds_are_validated():
    with pytest.raises(ValueError, match="min_relevance"):
        PaperDecode(min_relevance=-0.1)


def test_active_set_persists_between_triggers(tokenizer):
    model, adapter, bank, router, cache, _ = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, ScheduleTrigger.at([2]))
    gen = engine.generate(PROMPT, "q", PaperDecode(max_new_tokens=6, ignore_eos=True))
    assert [r.active for r in gen.records] == [(), ()] + [("e0", "e1", "e2")] * 4


def test_stop_conditions(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer, ExpertAdapter(model, LoraSpec()))
    full = engine.generate(PROMPT, config=PaperDecode(max_new_tokens=30, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    # EOS: make the model's own 3rd token the EOS id.
    engine.eos_ids = {full.token_ids[2]}
    assert engine.generate(PROMPT, config=PaperDecode(max_new_tokens=30)).finish_reason == "eos"
    engine.eos_ids = {256}
    text = full.text
    printable = next((c for c in text[3:] if c.strip()), None)
    if printable is not None:
        gen = engine.generate(PROMPT, config=PaperDecode(max_new_tokens=30, stop_strings=(printable,)))
        assert gen.finish_reason == "stop" and printable not in gen.text


def test_stop_strings_count_after_leading_whitespace():
    from dmoe.engine.decode import stop_index

    assert stop_index("Paris.\nQ: next", ("\n",)) == 6
    assert stop_index("\n\n Paris\nQ:", ("\n",)) == 8  # a base model opening with newlines
    assert stop_index(" \n ", ("\n",)) is None  # nothing has started yet
    assert stop_index("a STOP b. c", ("STOP", ".", "")) == 2  # the earliest; "" is ignored
    assert stop_index("\nQ: x\nQ: y", ("\nQ:",)) == 5  # the opening one starts in the whitespace


def test_bad_input_rejected(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer, ExpertAdapter(model, LoraSpec()))
    with pytest.raises(ValueError, match="input_ids"):
        engine.generate(torch.tensor([[]], dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        PaperDecode(max_new_tokens=0)
    with pytest.raises(ValueError, match="kv_policy"):
        PaperDecode(kv_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router needs"):
        Engine(model, tokenizer, ExpertAdapter(model, LoraSpec()), router=FunctionRouter(list))


def test_trigger_policies():
    logits = torch.zeros(1, 1000)
    assert abs(token_entropy(logits).item() - torch.log(torch.tensor(1000.0)).item()) < 1e-4
    assert token_entropy(torch.tensor([[0.0, -1e9]])).item() < 1e-6
    assert EntropyTrigger(2.0)(0, 2.1) and not EntropyTrigger(2.0)(0, 1.9)
    assert AlwaysTrigger()(5, 0.0) and not NeverTrigger()(5, 99.0)
    r = RandomTrigger(rate=0.3, seed=7)
    first = [r(s, 0.0) for s in range(200)]
    again = [r(s, 0.0) for s in reversed(range(200))][::-1]  # no state: any call order
    assert first == again and 30 < sum(first) < 90
    # each question (its own entropies) gets its own steps, at the asked rate overall
    g = torch.Generator().manual_seed(0)
    entropies = (torch.rand(100, 32, generator=g) * 5).tolist()
    steps = [tuple(s for s in range(32) if r(s, e[s])) for e in entropies]
    assert len(set(steps)) > 90
    assert abs(sum(map(len, steps)) / 3200 - 0.3) < 0.03
    assert [RandomTrigger(rate=0.3, seed=8)(s, 0.0) for s in range(200)] != first  # seeded
    assert isinstance(make_trigger("entropy", tau=1.5), EntropyTrigger)
    with pytest.raises(ValueError, match="unknown trigger"):
        make_trigger("sometimes")


def test_attribution_spans_follow_the_active_set(tokenizer):
    from dmoe.engine.attribution import spans

    model, adapter, bank, router, cache, _ = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, ScheduleTrigger.at([2, 5]))
    gen = engine.generate(PROMPT, "q", PaperDecode(max_new_tokens=8, ignore_eos=True))
    parts = spans(gen, tokenizer)
    assert [(s.start, s.end, s.experts, s.triggered) for s in parts] == [
        (0, 2, (), False), (2, 5, ("e0", "e1", "e2"), True), (5, 8, ("e3",), True)]
    assert "".join(s.text for s in parts) == tokenizer.decode(gen.token_ids) == gen.text
    # cut by a stop string: the spans cover the answer only, not the tokens that made the stop
    # (a fresh engine: the test router's sets cycle from the start again)
    model, adapter, bank, router, cache, _ = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, ScheduleTrigger.at([2, 5]))
    stop = gen.text[3:5]
    cut = engine.generate(PROMPT, "q", PaperDecode(max_new_tokens=8, ignore_eos=True,
                                                   stop_strings=(stop,)))
    assert cut.finish_reason == "stop" and gen.text.startswith(cut.text) and len(cut.text) <= 3
    parts = spans(cut, tokenizer)
    assert "".join(s.text for s in parts) == cut.text
    assert parts[-1].end <= len(cut.token_ids) - 1  # the token completing the stop is left out
    assert [s.experts for s in parts] == [(), ("e0", "e1", "e2")][:len(parts)]


def test_token_texts_add_up_to_the_answer_and_wait_for_whole_characters(tokenizer):
    from dmoe.engine.attribution import token_texts

    ids = list("a é😀b".encode())  # 1-, 2- and 4-byte characters, byte tokens
    pieces = token_texts(ids, tokenizer)
    assert len(pieces) == len(ids) and "".join(pieces) == "a é😀b"
    assert pieces == ["a", " ", "", "é", "", "", "", "😀", "b"]  # a character lands whole
    assert token_texts(ids[:3], tokenizer) == ["a", " ", "\ufffd"]  # cut mid-character: shown
    assert token_texts([], tokenizer) == []


def test_weighted_composition_cached_equals_recompute(tokenizer):
    """softmax composition: the cached engine equals a full recompute under the same weighted sets,
    and the weights matter (the exact sum gives other logits)."""
    model, adapter, bank, _, cache, trigger = setup()
    relevances = {"e0": 0.9, "e1": 0.5, "e2": 0.2, "e3": 0.7, "e4": 0.4, "e5": 0.3}
    sets = itertools.cycle([["e0", "e1", "e2"], ["e3"], ["e4", "e5"]])
    router = FunctionRouter(lambda q, k: next(sets))
    router_hits = router.route
    router.route = lambda q, k: [RouteHit(h.expert_id, h.score, relevances[h.expert_id])
                                 for h in router_hits(q, k)]
    engine = Engine(model, tokenizer, adapter, cache, router, trigger)
    cfg = PaperDecode(max_new_tokens=12, record_logits=True, ignore_eos=True,
                       composition="softmax", composition_temperature=0.5, composition_scale=0.7)
    gen = engine.generate(PROMPT, "task", cfg)

    def weights(ids):  # by hand: λ · softmax(relevance / T)
        e = [math.exp(relevances[i] / 0.5) for i in ids]
        return [0.7 * x / sum(e) for x in e]

    ref, cat = [], []
    for t, rec in enumerate(gen.records):
        seq = torch.cat([PROMPT, torch.tensor([gen.token_ids[:t]], dtype=torch.long)], dim=1)
        experts = [bank[i] for i in rec.active]
        with torch.no_grad():
            adapter.activate(experts, weights(rec.active) if experts else None)
            ref.append(model(seq).logits[0, -1])
            adapter.activate(experts)
            cat.append(model(seq).logits[0, -1])
    got = torch.stack(gen.logits)
    assert (got - torch.stack(ref)).abs().max().item() <= 1e-4
    assert (got - torch.stack(cat)).abs().max().item() > 1e-2


def test_composition_weights():
    assert composition_weights([3.0, 1.0], "cat") == [1.0, 1.0]
    w = composition_weights([1.0, 0.0], "softmax", temperature=1.0, scale=2.0)
    assert w == pytest.approx([2 * math.e / (math.e + 1), 2 / (math.e + 1)])
    assert composition_weights([5.0, 1.0, 0.0], "softmax", float("inf"), 0.9) == pytest.approx([0.3] * 3)
    with pytest.raises(ValueError, match="composition"):
        composition_weights([1.0], "mean")


def test_repeated_ngram_tokens():
    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]  # "1 2" was followed by 3
    assert repeated_ngram_tokens([1, 2, 1, 4, 1], 2) == [2, 4]
    assert repeated_ngram_tokens([7, 7], 1) == [7]
    assert repeated_ngram_tokens([1, 2, 3], 0) == [] and repeated_ngram_tokens([1], 3) == []


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_is_greedy_among_allowed_tokens(tokenizer, n):
    """Each token is the argmax of the step's logits over the tokens that repeat no n-gram (the
    no-cache reference of a plain run over the same prefix), and no n-gram occurs twice."""
    model, adapter, bank, router, cache, trigger = setup()
    engine = Engine(model, tokenizer, adapter, cache, router, trigger)
    plain = engine.generate(PROMPT, "task", PaperDecode(max_new_tokens=24, ignore_eos=True))
    grams = lambda ids: [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]  # noqa: E731
    assert len(set(grams(plain.token_ids))) < len(grams(plain.token_ids)), "tiny model must loop"
    gen = engine.generate(PROMPT, "task", PaperDecode(max_new_tokens=24, ignore_eos=True,
                                                       no_repeat_ngram=n, record_logits=True))
    assert len(set(grams(gen.token_ids))) == len(grams(gen.token_ids))
    ref = reference_logits(model, adapter, bank, PROMPT, gen)
    for t, token in enumerate(gen.token_ids):
        allowed = ref[t].clone()
        banned = repeated_ngram_tokens(gen.token_ids[:t], n)
        allowed[banned] = float("-inf")
        assert token == int(allowed.argmax())
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        DecodeConfig(no_repeat_ngram=-1)
