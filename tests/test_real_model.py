"""The packaged SmolLM2-135M-Instruct, end to end (marked slow: ~30 s on a 2-core CPU)."""

import functools

import pytest
import torch

from dmoe.base_model import load_base_model, model_fingerprint, resolve_model
from dmoe.engine.decode import DecodeConfig, Engine
from dmoe.errors import ModelNotFoundError
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.prompts import encode_prompt

# The paper's mechanics (3 experts, routes on triggers only, no relevance gate, plain greedy), stated
# explicitly so these tests do not follow the shipped defaults.
PaperDecode = functools.partial(DecodeConfig, top_k=3, route_at_start=False, min_relevance=0.0,
                                no_repeat_ngram=0)


def test_missing_model_names_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_local_hf_directory_loads(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    source = resolve_model(str(tmp_path / "m"))
    assert not source.is_gguf and source.path == tmp_path / "m"
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model_fingerprint(back) == model_fingerprint(model)
    assert model_fingerprint(back.to(torch.bfloat16)) == model_fingerprint(model)
    ExpertAdapter(back, LoraSpec())  # wrapping the last MLP must not change the identity
    assert model_fingerprint(back) == model_fingerprint(model)


@pytest.fixture(scope="module")
def smollm():
    return load_base_model(None, "cpu", "fp32")


@pytest.mark.slow
def test_packaged_model_answers_and_matches_generate(smollm):
    model, tok = smollm.model, smollm.tokenizer
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    engine = Engine(model, tok, ExpertAdapter(model, LoraSpec()))
    ids = torch.tensor([encode_prompt(tok, "What is the capital of France?")])
    gen = engine.generate(ids, config=PaperDecode(max_new_tokens=24))
    assert "Paris" in gen.text
    hf = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert gen.token_ids == hf
    engine.close()
    engine.adapter.detach()


@pytest.mark.slow
def test_packaged_model_cache_is_reused(smollm):
    again = load_base_model(None, "cpu", "fp32")
    assert again.fingerprint == smollm.fingerprint


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_packaged_model_on_packed_weights(smollm, weights):
    """Packed weights keep the float fingerprint (the same experts serve), answer, and refuse to
    train; the expert MLP stays the float one."""
    from torch import nn

    packed = load_base_model(None, "cpu", weights)
    assert packed.weights == weights and not packed.can_train
    assert packed.fingerprint == smollm.fingerprint
    mlp = packed.model.model.layers[-1].mlp
    assert type(mlp.down_proj) is nn.Linear and type(packed.model.lm_head) is not nn.Linear
    ids = torch.tensor([encode_prompt(packed.tokenizer, "What is the capital of France?")])
    engine = Engine(packed.model, packed.tokenizer, ExpertAdapter(packed.model, LoraSpec()))
    assert "Paris" in engine.generate(ids, config=PaperDecode(max_new_tokens=12)).text
    engine.close()
    with pytest.raises(ValueError, match="train on float"):
        load_base_model(None, "cpu", weights, training=True)


@pytest.mark.slow
def test_packaged_model_batch_equals_single_sequence(smollm):
    """Four rows with different questions, expert sets and swap steps, on the real model."""
    from conftest import random_bank

    from dmoe.engine.batch import BatchEngine, Request
    from dmoe.engine.triggers import ScheduleTrigger

    model, tok = smollm.model, smollm.tokenizer
    adapter = ExpertAdapter(model, LoraSpec())
    bank, router, load = random_bank(adapter, 4)
    cfg = PaperDecode(max_new_tokens=12, record_logits=True)
    questions = ["What is the capital of France?", "Who wrote Hamlet?",
                 "Name a planet with rings.", "Why is the sky blue? Explain briefly."]
    reqs = [Request(torch.tensor([encode_prompt(tok, q)]), q, cfg,
                    initial_experts=["e1"] if i == 1 else (),
                    trigger=ScheduleTrigger.at([i, i + 4])) for i, q in enumerate(questions)]
    refs = []
    for r in reqs:
        engine = Engine(model, tok, adapter, load, router, r.trigger)
        refs.append(engine.generate(r.input_ids, r.task_input, r.config, r.initial_experts))
        engine.close()
    engine = Engine(model, tok, adapter, load, router)
    gens = BatchEngine(engine, max_batch=4).run(reqs)
    engine.close()
    adapter.detach()
    for gen, ref in zip(gens, refs, strict=True):
        assert gen.token_ids == ref.token_ids
        assert [r.active for r in gen.records] == [r.active for r in ref.records]
        n = len(ref.logits)
        assert (torch.stack(gen.logits[:n]) - torch.stack(ref.logits)).abs().max() <= 1e-4


def test_chunked_packaged_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    """A GGUF shipped in chunk packages (as gemma3-270m is): concatenated in order into the cache,
    found there next time, and refused (no file left behind) when its sha256 does not match."""
    import hashlib
    import sys

    from dmoe.base_model import PACKAGED_MODELS, PackagedModel

    chunks = [b"GGUF-head-", b"middle-", b"tail"]
    for i, data in enumerate(chunks):
        pkg = tmp_path / "site" / f"fakemodel_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg / "data" / f"fake.gguf.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DMOE_CACHE_DIR", str(tmp_path / "cache"))
    parts = tuple(f"fakemodel_part{i + 1}" for i in range(3))
    whole = b"".join(chunks)
    monkeypatch.setitem(PACKAGED_MODELS, "fake", PackagedModel(
        "fakemodel", "fake.gguf", "pip install fake", parts, hashlib.sha256(whole).hexdigest()))
    monkeypatch.setitem(PACKAGED_MODELS, "fake-bad", PackagedModel(
        "fakemodel", "fake-bad.gguf", "pip install fake", parts, "0" * 64))
    for i, data in enumerate(chunks):  # the bad entry reads the same chunks under its own name
        (tmp_path / "site" / f"fakemodel_part{i + 1}" / "data" / f"fake-bad.gguf.part{i:02d}"
         ).write_bytes(data)

    source = resolve_model("fake")
    assert source.is_gguf and source.path.read_bytes() == whole
    assert source.path.parent == tmp_path / "cache" / "gguf"
    assert resolve_model("fake").path == source.path  # found in the cache the second time
    with pytest.raises(ModelNotFoundError, match="sha256"):
        resolve_model("fake-bad")
    assert sorted(p.name for p in source.path.parent.iterdir()) == ["fake.gguf"]
    assert not any(m.startswith("fakemodel") for m in sys.modules)
    monkeypatch.setitem(PACKAGED_MODELS, "fake-missing", PackagedModel(
        "nopkg", "x.gguf", "pip install the-x-parts", ("nopkg_part1",), None))
    with pytest.raises(ModelNotFoundError, match="pip install the-x-parts"):
        resolve_model("fake-missing")
