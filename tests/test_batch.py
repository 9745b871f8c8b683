"""The batched engine against the single-sequence reference: same tokens, same logits, per row."""

import functools
import zlib

import pytest
import torch
from conftest import tiny_model

from dmoe.engine.batch import BatchEngine, Request
from dmoe.engine.decode import DecodeConfig, Engine
from dmoe.engine.triggers import AlwaysTrigger, EntropyTrigger, ScheduleTrigger
from dmoe.experts.lora import ExpertAdapter, LoraSpec, random_expert
from dmoe.routing.base import FunctionRouter

Decode = functools.partial(DecodeConfig, top_k=3, route_at_start=False, min_relevance=0.0,
                           no_repeat_ngram=0, record_logits=True, ignore_eos=True)
SETS = [["e0", "e1", "e2"], ["e3"], ["e4", "e5"], [], ["e1"]]


def query_router():
    """Routes by a hash of the query, so the answer does not depend on call order."""
    return FunctionRouter(lambda q, k: SETS[zlib.crc32(q.encode()) % len(SETS)])


def loader(bank):
    return lambda ids: [bank[i] for i in ids]


def setup(arch="llama", layers=2, n_layers=1, std=0.3):
    model = tiny_model(arch, layers=layers)
    spec = LoraSpec(rank=4, alpha=16, n_layers=n_layers)
    adapter = ExpertAdapter(model, spec)
    g = torch.Generator().manual_seed(1)
    bank = {f"e{i}": random_expert(f"e{i}", adapter.mlp_shapes, spec, g, std=std) for i in range(6)}
    return model, adapter, bank


def requests():
    """Four rows: different prompt lengths, expert sets, swap steps, lengths and settings."""
    prompt = lambda *ids: torch.tensor([list(ids)])  # noqa: E731
    return [
        Request(prompt(5, 17, 99, 3, 42, 7, 8, 120, 33, 64), "first task",
                Decode(max_new_tokens=12), trigger=ScheduleTrigger.at([0, 3, 7])),
        Request(prompt(11, 12), "second", Decode(max_new_tokens=7),
                initial_experts=["e3"], trigger=ScheduleTrigger.at([2, 5])),
        Request(prompt(*range(40, 70)), "third", Decode(max_new_tokens=15, no_repeat_ngram=2),
                trigger=ScheduleTrigger.at([1, 2, 9, 10])),
        Request(prompt(200, 3, 9, 1, 4), "fourth, no routing", Decode(max_new_tokens=9),
                routing=False),
    ]


def reference(model, tokenizer, adapter, bank, req, router):
    engine = Engine(model, tokenizer, adapter, loader(bank), router, req.trigger)
    try:
        return engine.generate(req.input_ids, req.task_input, req.config,
                               initial_experts=req.initial_experts, routing=req.routing)
    finally:
        engine.close()
        adapter.activate([])


def assert_same(gen, ref):
    assert gen.token_ids == ref.token_ids
    assert [r.active for r in gen.records] == [r.active for r in ref.records]
    assert [r.triggered for r in gen.records] == [r.triggered for r in ref.records]
    assert gen.finish_reason == ref.finish_reason and gen.text == ref.text
    assert gen.prefill_tokens == ref.prefill_tokens
    diff = (torch.stack(gen.logits) - torch.stack(ref.logits)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("max_batch", [4, 2])  # 2: rows leave and waiting ones join mid-run
def test_batch_rows_equal_single_sequence_engine(tokenizer, arch, max_batch):
    model, adapter, bank = setup(arch)
    router = query_router()
    refs = [reference(model, tokenizer, adapter, bank, r, router) for r in requests()]
    assert sum(g.n_triggers for g in refs) >= 8
    assert len({r.active for g in refs for r in g.records}) >= 3, "rows must hold different sets"
    engine = Engine(model, tokenizer, adapter, loader(bank), router)
    gens = BatchEngine(engine, max_batch).run(requests())
    for gen, ref in zip(gens, refs, strict=True):
        assert_same(gen, ref)
    assert adapter.active == () and all(m.lora is None for m in adapter.mlps.values())


def test_batch_with_entropy_trigger_and_eos(tokenizer):
    """The engine's own (shared) trigger policy, route at start and EOS, as eval runs it."""
    model, adapter, bank = setup()
    router = query_router()
    tau = 5.24  # the tiny base model's entropies lie around 5.2-5.3: some steps fire, some not
    reqs = [Request(torch.tensor([[i, 2 * i, 3, 4 + i]]), f"question {i}",
                    Decode(max_new_tokens=10, route_at_start=True, ignore_eos=False))
            for i in range(1, 7)]
    refs = []
    for r in reqs:
        engine = Engine(model, tokenizer, adapter, loader(bank), router, EntropyTrigger(tau))
        refs.append(engine.generate(r.input_ids, r.task_input, r.config))
        engine.close()
    fired = [r.triggered for g in refs for r in g.records]
    assert 0 < sum(fired) < len(fired) and {g.finish_reason for g in refs} >= {"length"}
    engine = Engine(model, tokenizer, adapter, loader(bank), router, EntropyTrigger(tau))
    gens = BatchEngine(engine, max_batch=4).run(reqs)
    for gen, ref in zip(gens, refs, strict=True):
        assert_same(gen, ref)


def test_cancel_frees_the_row_and_the_rest_still_match(tokenizer):
    model, adapter, bank = setup()
    router = query_router()
    refs = [reference(model, tokenizer, adapter, bank, r, router) for r in requests()]
    batch = BatchEngine(Engine(model, tokenizer, adapter, loader(bank), router), max_batch=3)
    ids = [batch.submit(r) for r in requests()]
    done = dict(batch.step())
    assert batch.running == 3 and batch.waiting == 1
    assert batch.cancel(ids[2]) and not batch.cancel(ids[2])
    assert batch.running == 2
    while batch.busy:
        done.update(batch.step())
    assert ids[2] not in done
    for i in (0, 1, 3):
        assert_same(done[ids[i]], refs[i])


def test_streaming_callbacks_see_every_token(tokenizer):
    model, adapter, bank = setup()
    seen: dict[int, list[int]] = {0: [], 1: []}
    reqs = [Request(torch.tensor([[1, 2, 3]]), "a", Decode(max_new_tokens=5),
                    on_token=lambda rec: seen[0].append(rec.token_id)),
            Request(torch.tensor([[9, 8]]), "b", Decode(max_new_tokens=3),
                    on_token=lambda rec: seen[1].append(rec.token_id))]
    engine = Engine(model, tokenizer, adapter, loader(bank), query_router(), AlwaysTrigger())
    gens = BatchEngine(engine).run(reqs)
    assert [seen[0], seen[1]] == [g.token_ids for g in gens]


def test_bad_input_rejected(tokenizer):
    model, adapter, bank = setup(layers=3, n_layers=2)
    engine = Engine(model, tokenizer, adapter, loader(bank), query_router())
    with pytest.raises(ValueError, match="last layer only"):
        BatchEngine(engine)
    model, adapter, bank = setup()
    engine = Engine(model, tokenizer, adapter)
    with pytest.raises(ValueError, match="max_batch"):
        BatchEngine(engine, max_batch=0)
    with pytest.raises(ValueError, match="shape"):
        BatchEngine(engine).submit(Request(torch.tensor([[]], dtype=torch.long)))
