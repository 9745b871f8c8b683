"""Weights modes: int8 trunk linears against their float reference; experts stay exact on top."""

import functools

import pytest
import torch
from conftest import tiny_model
from torch import nn

from dmoe.base_model import CPU_DEFAULT_WEIGHTS, resolve_weights, training_weights
from dmoe.engine.batch import BatchEngine, Request
from dmoe.engine.decode import DecodeConfig, Engine
from dmoe.engine.triggers import ScheduleTrigger
from dmoe.errors import UnsupportedModelError
from dmoe.experts.lora import ExpertAdapter, LoraSpec, random_expert
from dmoe.quant import Fp16Linear, Int8Linear, pack_trunk
from dmoe.routing.base import FunctionRouter

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 33, 64]])
Decode = functools.partial(DecodeConfig, top_k=3, route_at_start=False, min_relevance=0.0,
                           no_repeat_ngram=0, record_logits=True, ignore_eos=True)


def as_weights(model, weights):
    if weights in ("fp16", "int8"):
        pack_trunk(model, weights)
    elif weights == "bf16":
        model.to(torch.bfloat16)
    return model


def test_int8_linear_is_per_channel_int8_of_the_float_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    lin.weight.data[3] *= 50  # one loud channel must not cost the others their resolution
    q = Int8Linear(lin)
    w = q.dequantized_weight()
    scale = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((w - lin.weight).abs() <= scale / 2 + 1e-7).all()
    x = torch.randn(5, 64)
    ref = nn.functional.linear(x, w, lin.bias)
    y = q(x)
    # what is left is the activations' 8-bit rounding (reduce_range: 7 bits)
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max(), (y - ref).abs().max()
    assert y.shape == (5, 48) and q(x[None]).shape == (1, 5, 48)


def test_fp16_linear_rounds_only_the_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Fp16Linear(lin)
    assert torch.equal(q.dequantized_weight(), lin.weight.half().float())
    x = torch.randn(5, 64) * 100  # fp32 activations: no range or rounding of their own
    ref = nn.functional.linear(x, lin.weight.half().float(), lin.bias)
    assert (q(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (q(x[:1]) - q(x)[:1]).abs().max() <= 1e-5 * ref.abs().max()  # rows are independent


@pytest.mark.parametrize("packer", [Fp16Linear, Int8Linear])
def test_packed_linears_refuse_to_train(packer):
    q = packer(nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="trained on float weights"):
        q(x)
    with torch.no_grad():
        assert q(x).shape == (2, 4)


def test_quantize_keeps_the_expert_mlp_float():
    model = tiny_model(layers=3)
    ref_logits = model(PROMPT).logits
    n = pack_trunk(model, "int8")
    # 3 layers x (q, k, v, o) + 2 MLPs x (gate, up, down) + lm_head; the last MLP stays float
    assert n == 3 * 4 + 2 * 3 + 1
    last = model.model.layers[-1].mlp
    assert all(type(getattr(last, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        logits = model(PROMPT).logits
    rel = (logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert 0 < rel < 0.15, rel  # a wrong scale or layout gives ~1
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.8
    ExpertAdapter(model, LoraSpec(n_layers=1))  # experts attach beside the float MLP
    with pytest.raises(UnsupportedModelError, match="int8"):
        ExpertAdapter(model, LoraSpec(n_layers=2))


def stepwise_reference(model, adapter, bank, prompt, gen):
    """Every generated position's logits from a fresh cached decode (prompt in one call, then one
    token per call: the engine's own call shapes) under the experts active there, from the start."""
    from transformers import DynamicCache

    out = []
    for t, rec in enumerate(gen.records):
        adapter.activate([bank[i] for i in rec.active])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            for tok in gen.token_ids[:t]:
                logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits
        out.append(logits[0, -1])
    adapter.activate([])
    return torch.stack(out)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp16", "int8"])
def test_cached_engine_equals_recompute_under_each_weights_mode(tokenizer, weights):
    """A trigger recomputes only the last MLP; the reference re-decodes the whole sequence with
    the new experts, under the same weights. Experts are applied in the model's float dtype."""
    model = as_weights(tiny_model(), weights)
    spec = LoraSpec(rank=4, alpha=16)
    adapter = ExpertAdapter(model, spec)
    g = torch.Generator().manual_seed(1)
    bank = {f"e{i}": random_expert(f"e{i}", adapter.mlp_shapes, spec, g, std=0.3) for i in range(6)}
    sets = iter([["e0", "e1", "e2"], ["e3"], ["e4", "e5"]])
    engine = Engine(model, tokenizer, adapter, lambda ids: [bank[i] for i in ids],
                    FunctionRouter(lambda q, k: next(sets)), ScheduleTrigger.at([0, 3, 7]))
    gen = engine.generate(PROMPT, "task", Decode(max_new_tokens=12))
    assert gen.n_triggers == 3 and gen.prefill_tokens == PROMPT.shape[1]
    ref = stepwise_reference(model, adapter, bank, PROMPT, gen)
    diff = (torch.stack(gen.logits).float() - ref.float()).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_packed_batches_against_single_rows(tokenizer, weights):
    """fp16 keeps rows independent: batched rows equal single decoding. int8's activation scale
    spans a call, so there rows match only to the quantisation noise: the first step's logits
    (before any token can differ) are compared."""
    model = as_weights(tiny_model(), weights)
    adapter = ExpertAdapter(model, LoraSpec())
    g = torch.Generator().manual_seed(1)
    bank = {"e0": random_expert("e0", adapter.mlp_shapes, LoraSpec(), g, std=0.3)}
    load = lambda ids: [bank[i] for i in ids]  # noqa: E731
    router = FunctionRouter(lambda q, k: ["e0"])
    reqs = lambda: [Request(PROMPT, "a", Decode(max_new_tokens=6),  # noqa: E731
                            trigger=ScheduleTrigger.at([0, 2])),
                    Request(torch.tensor([[11, 12, 13]]), "b", Decode(max_new_tokens=4),
                            routing=False)]
    singles = [Engine(model, tokenizer, adapter, load, router, r.trigger).generate(
        r.input_ids, r.task_input, r.config, routing=r.routing) for r in reqs()]
    gens = BatchEngine(Engine(model, tokenizer, adapter, load, router), 2).run(reqs())
    for gen, single in zip(gens, singles, strict=True):
        assert len(gen.token_ids) == len(single.token_ids)
        if weights == "fp16":
            assert gen.token_ids == single.token_ids
            diff = (torch.stack(gen.logits) - torch.stack(single.logits)).abs().max()
            assert diff <= 1e-4, diff
        else:
            first, ref = gen.logits[0], single.logits[0]
            assert (first - ref).abs().max() <= 0.05 * ref.abs().max()
    assert gens[0].records[0].active == ("e0",) and gens[1].n_triggers == 0


def test_resolve_weights():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights(None, cpu) == CPU_DEFAULT_WEIGHTS
    assert resolve_weights("auto", cpu, training=True) == "fp32"
    assert resolve_weights("fp16", cuda, training=True) == "fp16"  # a plain fp16 model on CUDA
    assert resolve_weights("auto", cuda) == "bf16"
    assert resolve_weights("bfloat16", cpu) == "bf16"  # the older --dtype names
    assert resolve_weights("fp32", cpu, training=True) == "fp32"
    for packed in ("fp16", "int8"):
        with pytest.raises(ValueError, match="train on float"):
            resolve_weights(packed, cpu, training=True)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_weights("int8", cuda)
    with pytest.raises(ValueError, match="unknown weights"):
        resolve_weights("int4", cpu)


def test_training_weights():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_weights("fp16", cpu) == "fp32" and training_weights("int8", cpu) == "fp32"
    assert training_weights("auto", cpu) == "fp32"
    assert training_weights("bf16", cpu) == "bf16" and training_weights("auto", cuda) == "bf16"
