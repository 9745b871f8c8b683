"""sft_lora and poly_prag trainers: fast loss = full-forward loss, training helps, storage."""

import json

import pytest
import torch
from conftest import CharTokenizer, tiny_model, toy_jobs

from dmoe.augment.types import TrainingExample
from dmoe.baselines.parametric import PolyPragMethod
from dmoe.errors import ExpertFormatError
from dmoe.experts.format import load_expert, save_expert
from dmoe.experts.lora import ExpertAdapter, LoraSpec, scaled_expert
from dmoe.experts.poly_format import load_poly, read_poly, save_poly
from dmoe.training.corpus import (
    Budget,
    CorpusStates,
    CorpusTrainConfig,
    PolyTrainConfig,
    example_losses_fast,
    example_losses_reference,
    train_poly_prag,
    train_sft_lora,
)


def _jobs(n_units: int = 4) -> list[tuple[str, list[TrainingExample]]]:
    return toy_jobs(n_units, min_qa=1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


SFT = CorpusTrainConfig(spec=LoraSpec(rank=8, alpha=16), lr=1e-2, epochs=4, batch_size=3)
POLY = PolyTrainConfig(lr=1e-2, epochs=4, batch_size=3, pool_size=3, routing_lr=0.2)


@pytest.fixture(scope="module")
def sft(model):
    return train_sft_lora(model, CharTokenizer(), _jobs(), SFT)


@pytest.fixture(scope="module")
def poly(model):
    return train_poly_prag(model, CharTokenizer(), _jobs(), POLY)


def test_sft_fast_loss_equals_full_forward(model, sft):
    tok, jobs = CharTokenizer(), _jobs()
    fast = example_losses_fast(model, tok, jobs, [sft], None, SFT)
    ref = example_losses_reference(model, tok, jobs, [sft], None, SFT)
    assert fast == pytest.approx(ref, abs=1e-5)
    assert max(sft.weights[k].abs().max().item() for k in sft.weights if k.endswith("B")) > 1e-3
    assert type(model.model.layers[-1].mlp.gate_proj) is torch.nn.Linear  # adapter detached


def test_poly_fast_loss_equals_full_forward_of_the_mixed_adapter(model, poly):
    tok, jobs = CharTokenizer(), _jobs()
    routing = poly.routing()
    fast = example_losses_fast(model, tok, jobs, poly.pool, routing, POLY)
    ref = example_losses_reference(model, tok, jobs, poly.pool, routing, POLY)
    assert fast == pytest.approx(ref, abs=1e-5)
    # ... and the reference is what PolyPragMethod activates for a single retrieved passage.
    adapter = ExpertAdapter(model, POLY.spec)
    method = PolyPragMethod(model, tok, adapter, poly.pool, routing, retriever=None)
    try:
        mix = method.mixture([jobs[1][0]])
        assert mix == pytest.approx(routing(jobs[1][0]))
        ids = torch.tensor([list(b"Unit 1: the tower")])
        adapter.activate([scaled_expert(poly.pool[j], w) for j, w in sorted(mix.items())])
        via_method = model(input_ids=ids).logits
    finally:
        method.close()
        adapter.detach()
    enc_loss = example_losses_reference(model, tok, [(jobs[1][0], [TrainingExample(
        "", "Unit 1: the tower")])], poly.pool, routing, CorpusTrainConfig(loss_on="all"))
    ce = torch.nn.functional.cross_entropy(via_method[0, :-1], ids[0, 1:]).item()
    assert enc_loss[0] == pytest.approx(ce, abs=1e-5)


def test_training_lowers_the_loss(model, sft, poly):
    tok, jobs = CharTokenizer(), _jobs()
    zero = {k: torch.zeros_like(v) if k.endswith("B") else v for k, v in sft.weights.items()}
    base = example_losses_fast(model, tok, jobs, [type(sft)("zero", sft.spec, zero)], None, SFT)
    after_sft = example_losses_fast(model, tok, jobs, [sft], None, SFT)
    after_poly = example_losses_fast(model, tok, jobs, poly.pool, poly.routing(), POLY)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after_sft) < mean(base) - 0.5, (mean(base), mean(after_sft))
    assert mean(after_poly) < mean(base) - 0.5, (mean(base), mean(after_poly))


def test_where_states_live_does_not_change_training(model, sft):
    tok, jobs = CharTokenizer(), _jobs()
    for states_on, share in (("cpu", True), ("recompute", True), ("device", False)):
        other = train_sft_lora(model, tok, jobs, SFT, Budget(
            states_on=states_on, chunk_examples=5, head_batch_tokens=40, share_prefix=share))
        diff = max((other.weights[k] - sft.weights[k]).abs().max().item() for k in sft.weights)
        assert diff < 1e-4, (states_on, share, diff)


def test_shared_trunk_states_train_the_same_loras_with_one_trunk_pass(model, sft, poly,
                                                                       monkeypatch):
    import dmoe.training.corpus as corpus

    calls = []
    real = corpus.trunk_states
    monkeypatch.setattr(corpus, "trunk_states", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok, jobs = CharTokenizer(), _jobs()
    seen: list[int] = []
    states = CorpusStates(model, tok, jobs, SFT, progress=seen.append)
    assert sum(seen) == len(states.encoded)  # the trunk pass reports every example once
    n_trunk = len(calls)
    shared_sft = train_sft_lora(model, tok, jobs, SFT, states=states)
    shared_poly = train_poly_prag(model, tok, jobs, POLY, states=states)
    assert n_trunk >= 1 and len(calls) == n_trunk  # neither trainer ran the trunk again
    assert all(torch.equal(shared_sft.weights[k], sft.weights[k]) for k in sft.weights)
    for mine, theirs in zip(shared_poly.pool, poly.pool, strict=True):
        assert all(torch.equal(mine.weights[k], theirs.weights[k]) for k in theirs.weights)
    assert torch.equal(shared_poly.weights, poly.weights)
    with pytest.raises(ValueError, match="other units or another encoding"):
        train_sft_lora(model, tok, jobs[:2], SFT, states=states)
    with pytest.raises(ValueError, match="other units or another encoding"):
        train_sft_lora(model, tok, jobs, CorpusTrainConfig(loss_on="all"), states=states)


def test_poly_routing_sums_to_one_and_unknown_is_empty(poly):
    routing = poly.routing()
    for uid, _ in _jobs():
        w = routing(uid)
        assert set(w) == {0, 1, 2} and sum(w.values()) == pytest.approx(1.0, abs=1e-6)
    assert routing("nope") == {}
    top1 = poly.routing(top_k=1)("unit/0")
    assert len(top1) == 1 and next(iter(top1.values())) == pytest.approx(1.0)
    assert poly.weights.std() > 1e-4, "routing logits must have moved"


def test_sft_save_load_round_trip(tmp_path, sft):
    save_expert(tmp_path / "sft.safetensors", sft, "fp")
    back = load_expert(tmp_path / "sft.safetensors", expected_fingerprint="fp")
    assert back.id == "sft_lora" and back.spec == sft.spec
    assert all(torch.equal(back.weights[k], sft.weights[k]) for k in sft.weights)


def test_poly_save_load_round_trip(tmp_path, poly):
    save_poly(tmp_path / "poly", poly, "fp", config={"pool_size": 3})
    back = read_poly(tmp_path / "poly", expected_fingerprint="fp")
    assert back.unit_ids == poly.unit_ids and torch.equal(back.weights, poly.weights)
    for a, b in zip(back.pool, poly.pool, strict=True):
        assert a.id == b.id and all(torch.equal(a.weights[k], b.weights[k]) for k in b.weights)
    pool, routing = load_poly(tmp_path / "poly", "fp")
    assert len(pool) == 3 and routing("unit/2") == poly.routing()("unit/2")
    manifest = json.loads((tmp_path / "poly" / "manifest.json").read_text())
    assert manifest["format"] == "dmoe-poly-prag" and manifest["version"] == "1"
    assert not list((tmp_path / "poly").glob(".tmp-*"))
    with pytest.raises(ExpertFormatError, match="trained for base model"):
        load_poly(tmp_path / "poly", "other")
    with pytest.raises(ExpertFormatError, match="not a readable"):
        load_poly(tmp_path / "missing")


def test_bad_input_gives_clear_errors(model):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="corpus is empty"):
        train_sft_lora(model, tok, [], SFT)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_poly_prag(model, tok, [], POLY)
    with pytest.raises(ValueError, match="no training examples"):
        train_sft_lora(model, tok, [("u", [])], SFT)
    with pytest.raises(ValueError, match="pool_size must be >= 1, got 0"):
        PolyTrainConfig(pool_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        CorpusTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="states_on"):
        train_sft_lora(model, tok, _jobs(1), SFT, Budget(states_on="disk"))


def test_eval_cli_loads_a_saved_pool_into_poly_prag(tmp_path, model, poly):
    from dmoe.baselines import MethodConfig, PassageRetriever, Resources, build_method
    from dmoe.cli import build_parser
    from dmoe.corpus.units import KnowledgeUnit
    from dmoe.eval.datasets import Sample

    args = build_parser().parse_args(["eval", "--out", str(tmp_path), "--methods", "poly_prag",
                                      "--poly", str(tmp_path / "poly"), "--poly-top-k", "2"])
    assert args.poly == tmp_path / "poly" and args.poly_top_k == 2
    save_poly(args.poly, poly, "fp")
    pool, routing = load_poly(args.poly, "fp", args.poly_top_k)
    assert all(len(routing(uid)) == 2 for uid in poly.unit_ids)
    units = [KnowledgeUnit(uid, f"the tower of town {u} is green", f"town {u}")
             for u, uid in enumerate(poly.unit_ids)]
    res = Resources(model, CharTokenizer(), ExpertAdapter(model, POLY.spec),
                    MethodConfig(max_new_tokens=3, stop_strings=(), top_k=2),
                    poly_pool=pool, poly_routing=routing)
    retriever = PassageRetriever(units)
    method = build_method("poly_prag", res, retriever)
    try:
        pred = method.answer(Sample("q", "what about the tower of town 1?", ("green",)))
    finally:
        method.close()
        retriever.close()
        res.adapter.detach()
    mixture = pred.extra["mixture"]
    assert mixture and set(mixture) <= {e.id for e in pool}
    assert sum(mixture.values()) == pytest.approx(2.0, abs=1e-5)  # two passages, each sums to 1


def test_candidate_head_over_the_whole_vocabulary_trains_the_same_corpus_loras(model, sft, poly):
    """K >= V: the candidate head is the full cross-entropy, so sft_lora and the Poly pool land on
    the same weights (up to summation order); states built for another head_vocab are refused."""
    import dataclasses

    tok, jobs, v = CharTokenizer(), _jobs(), model.config.vocab_size
    seen: list[int] = []
    states = CorpusStates(model, tok, jobs, dataclasses.replace(SFT, head_vocab=v),
                          progress=seen.append)
    assert states.candidates is not None and all(len(c) == v for c in states.candidates)
    assert sum(seen) == 2 * len(states.encoded)  # the trunk pass, then the candidate sets
    whole_sft = train_sft_lora(model, tok, jobs, dataclasses.replace(SFT, head_vocab=v),
                               Budget(head_batch_tokens=40), states=states)
    whole_poly = train_poly_prag(model, tok, jobs, dataclasses.replace(POLY, head_vocab=v),
                                 states=states)
    assert max((whole_sft.weights[k] - sft.weights[k]).abs().max().item() for k in sft.weights) < 1e-4
    for mine, theirs in zip(whole_poly.pool, poly.pool, strict=True):
        assert max((mine.weights[k] - theirs.weights[k]).abs().max().item()
                   for k in theirs.weights) < 1e-4
    assert torch.allclose(whole_poly.weights, poly.weights, atol=1e-4)
    with pytest.raises(ValueError, match="other units or another encoding"):
        train_sft_lora(model, tok, jobs, SFT, states=states)
    with pytest.raises(ValueError, match="cached"):
        CorpusStates(model, tok, jobs, dataclasses.replace(SFT, head_vocab=8),
                     Budget(states_on="recompute"))


def test_candidate_head_fits_corpus_loras_like_the_full_head(model, sft):
    """A K below V is an approximation: its LoRA must fit the corpus about as well (full V)."""
    import dataclasses

    tok, jobs = CharTokenizer(), _jobs()
    # The tiny random model's next-token distribution is nearly flat, so K must cover half of its
    # 257 tokens here (mean loss 3.567 vs the full head's 3.559; K = 32: 3.716); an LM is peaked.
    cand = train_sft_lora(model, tok, jobs, dataclasses.replace(SFT, head_vocab=128))
    base = example_losses_fast(model, tok, jobs, [dataclasses.replace(sft, weights={
        k: torch.zeros_like(w) if k.endswith("B") else w for k, w in sft.weights.items()})],
        None, SFT)
    full, mine = (example_losses_fast(model, tok, jobs, [e], None, SFT) for e in (sft, cand))
    assert sum(mine) / len(mine) == pytest.approx(sum(full) / len(full), abs=0.1), (full, mine)
    assert sum(mine) < sum(base) - 0.5 * len(base), (base, mine)
