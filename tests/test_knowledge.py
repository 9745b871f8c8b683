"""dmoe build on a tiny model, and the bank + index staying consistent."""

import dataclasses
import functools
import json

import pytest
import torch
from conftest import tiny_model

from dmoe.base_model import LoadedModel, ModelSource, model_fingerprint
from dmoe.engine.decode import DecodeConfig
from dmoe.engine.triggers import AlwaysTrigger
from dmoe.errors import BankError, WrongBaseModelError
from dmoe.knowledge import KnowledgeBase
from dmoe.training.build import BuildConfig, build
from dmoe.training.experts import TrainConfig

# The paper's mechanics (3 experts, routes on triggers only, no relevance gate, plain greedy), stated
# explicitly so these tests do not follow the shipped defaults.
PaperDecode = functools.partial(DecodeConfig, top_k=3, route_at_start=False, min_relevance=0.0,
                                no_repeat_ngram=0)

DOCS = [
    {"id": "velmora", "title": "Velmora", "text": "Velmora is a coastal town founded in 1732 by "
     "the shipbuilder Tamsin Oker. Its lighthouse is called the Grey Lantern."},
    {"id": "zorbit", "title": "Zorbit", "text": "The zorbit is a blue fruit grown only on Kelvar "
     "Island. It tastes of cinnamon and is harvested in September."},
    {"id": "loom", "title": "Thermal loom", "text": "The thermal loom was invented in 1891 by "
     "Helena Marsk, an engineer from Brenholt. It used heated copper rollers."},
]


@pytest.fixture
def lm(tokenizer):
    model = tiny_model()
    return LoadedModel(model=model, tokenizer=tokenizer, source=ModelSource("tiny", None, False),
                       device=torch.device("cpu"), fingerprint=model_fingerprint(model))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps(d) for d in DOCS] + ["{not json", json.dumps({"id": "empty", "text": ""})]
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = TrainConfig(epochs=1, max_seq_len=256)


def test_build_then_route_then_rebuild_skips(lm, corpus, tmp_path):
    bank = tmp_path / "bank"
    summary = build(corpus, bank, lm, BuildConfig(), FAST, progress=False, log=lambda s: None)
    assert summary.units == 3 and summary.experts_trained == 3 and summary.bank_size == 3
    assert len(summary.skipped_records) == 2  # malformed JSON + empty text, with line numbers
    assert all(":" in s for s in summary.skipped_records)
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    hits = kb.router().route("Who founded the coastal town of Velmora?", 3)
    assert hits[0].expert_id == "velmora#0"
    engine = kb.engine(lm, AlwaysTrigger())
    gen = engine.generate(torch.tensor([[1, 2, 3]]), "Velmora lighthouse",
                          PaperDecode(max_new_tokens=3, ignore_eos=True))
    assert gen.records[0].active[0] == "velmora#0"
    engine.close()
    kb.close()
    again = build(corpus, bank, lm, BuildConfig(), FAST, progress=False, log=lambda s: None)
    assert again.experts_trained == 0 and again.experts_reused == 3


def test_a_build_at_another_precision_retrains_and_the_flag_reaches_it(lm, corpus, tmp_path):
    from dmoe.cli import build_parser
    from dmoe.commands.build import train_config_from

    bank = tmp_path / "bank"
    build(corpus, bank, lm, BuildConfig(), FAST, progress=False, log=lambda s: None)
    bf16 = dataclasses.replace(FAST, precision="bf16")
    again = build(corpus, bank, lm, BuildConfig(), bf16, progress=False, log=lambda s: None)
    assert again.experts_trained == 3 and again.experts_reused == 0  # other settings: retrained
    args = ["build", str(corpus), "--bank", str(bank)]
    assert train_config_from(build_parser().parse_args(args)).precision == "fp32"
    parsed = build_parser().parse_args([*args, "--precision", "bf16"])
    assert train_config_from(parsed).precision == "bf16"


def test_delete_and_drift_repair(lm, corpus, tmp_path):
    bank = tmp_path / "bank"
    build(corpus, bank, lm, BuildConfig(), FAST, progress=False, log=lambda s: None)
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    kb.delete("zorbit#0")
    assert "zorbit#0" not in kb.index and len(kb) == 2
    assert all(h.expert_id != "zorbit#0" for h in kb.router().route("zorbit Kelvar fruit", 3))
    with pytest.raises(BankError, match="no expert"):
        kb.delete("zorbit#0")
    # Simulate a crash between the index write and the bank write: the index lost an expert.
    kb.index.delete("loom#0")
    report = kb.check()
    assert not report.ok and report.index is not None and "loom#0" in report.index.missing
    assert kb.check(repair=True).repaired
    assert kb.check().ok and "loom#0" in kb.index
    kb.close()
    # Reopening also repairs: drop an index entry behind the bank's back, then open.
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    kb.index.delete("velmora#0")
    kb.close()
    unsynced = KnowledgeBase.open(bank, lm.fingerprint, sync=False)  # what `bank check` reads
    assert not unsynced.check().ok
    unsynced.close()
    assert "velmora#0" in KnowledgeBase.open(bank, lm.fingerprint).index


def test_wrong_model_and_missing_bank(lm, corpus, tmp_path):
    build(corpus, tmp_path / "bank", lm, BuildConfig(), FAST, progress=False, log=lambda s: None)
    with pytest.raises(WrongBaseModelError):
        KnowledgeBase.open(tmp_path / "bank", "0123456789abcdef")
    with pytest.raises(BankError, match="not an expert bank"):
        KnowledgeBase.open(tmp_path / "nowhere")
