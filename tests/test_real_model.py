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
    return load_base_model(None, "cpu")


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
    again = load_base_model(None, "cpu")
    assert again.fingerprint == smollm.fingerprint
