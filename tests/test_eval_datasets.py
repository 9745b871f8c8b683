"""Loaders: every benchmark parses from the shared data folder with the README's counts, and the
standard formats parse from any path (tiny synthetic files)."""

import json

import pytest

from dmoe.eval.datasets import data_dir, load_task

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "squad").is_dir(), reason=f"no benchmark data at {DATA}")


@needs_data
def test_squad_counts_match_readme():
    task = load_task("squad", limit=None)
    assert len(task.corpus) == 2067 and len(task.samples) == 10565
    s = task.samples[0]
    assert s.answers == ("Denver Broncos",) and s.gold_unit_ids == ("squad-0-0",)
    assert "Super Bowl 50" in next(u.text for u in task.corpus if u.id == "squad-0-0")
    assert len(load_task("squad").samples) == 300  # default: the first 300
    assert load_task("squad", offset=10, limit=5).samples[0] == task.samples[10]


@needs_data
def test_hotpotqa_counts_and_corpus():
    task = load_task("hotpotqa", limit=None)
    assert len(task.samples) == 1525
    first = load_task("hotpotqa", limit=1)
    assert first.samples[0].answers == ("yes",)
    assert len(first.corpus) == 10 and len(first.samples[0].gold_unit_ids) == 2
    ids = {u.id for u in first.corpus}
    assert set(first.samples[0].gold_unit_ids) <= ids


@needs_data
def test_strategyqa_counts_and_distractors():
    task = load_task("strategyqa", limit=None, n_distractors=0)
    assert len(task.samples) == 2290 and len(task.corpus) == 2290
    labels = [s.answers[0] for s in task.samples]
    assert labels.count("yes") == 1071 and labels.count("no") == 1219  # PROVENANCE.md
    assert task.metric == "acc" and all(s.kind == "yesno" for s in task.samples)
    small = load_task("strategyqa", limit=10)
    assert len(small.corpus) == 10 + 10033  # facts + every vital-article summary


@needs_data
def test_cwq_counts():
    task = load_task("cwq", limit=None)
    assert len(task.samples) == 1000 and len(task.corpus) == 10033
    assert "Brazil" in task.samples[2].answers and task.metric == "f1"


@needs_data
def test_knowledge_conflicts_efficacy_and_locality():
    task = load_task("knowledge_conflicts", limit=300)
    eff = [s for s in task.samples if s.meta["split"] == "efficacy"]
    loc = [s for s in task.samples if s.meta["split"] == "locality"]
    assert len(eff) == 300 and len(loc) == 300 and len(task.corpus) == 300  # the paper's 300 + 300
    assert eff[0].question == "who does candace like in phineas and ferb?"
    assert eff[0].answers == ("Griselda Blanco",) and eff[0].meta["original"] == ["Jeremy Johnson"]
    assert "Griselda Blanco" in task.corpus[0].text
    assert loc[0].id == "kc-loc-17228" and loc[-1].id == "kc-loc-17527" and not loc[0].gold_unit_ids
    assert len([s for s in load_task("knowledge_conflicts", limit=300, n_locality=5).samples
                if s.meta["split"] == "locality"]) == 5
    assert not {s.id for s in loc} & {s.id for s in eff}
    assert len(load_task("knowledge_conflicts", limit=None).samples) == 17528


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "squad")):
        load_task("squad", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_task("nope", tmp_path)


def test_formats_parse_from_any_path(tmp_path, monkeypatch):
    (tmp_path / "squad").mkdir()
    squad = {"version": "1.1", "data": [{"title": "T_x", "paragraphs": [{
        "context": "Paris is in France.", "qas": [{"id": "q1", "question": "Where is Paris?",
                                                   "answers": [{"text": "France", "answer_start": 12},
                                                               {"text": "France", "answer_start": 12}]}]}]}]}
    (tmp_path / "squad" / "squad_dev_v1.1.json").write_text(json.dumps(squad))
    monkeypatch.setenv("DMOE_DATA_DIR", str(tmp_path))
    task = load_task("squad")
    assert task.samples[0].answers == ("France",) and task.corpus[0].title == "T x"
    (tmp_path / "knowledge_conflicts").mkdir()
    kc = {"examples": [{"input": f"\nQuestion: q{i}?\nContext: ctx {i}", "target": f"new{i}",
                        "target_scores": {f"new{i}": 1, f"old{i}": 0}} for i in range(5)]}
    (tmp_path / "knowledge_conflicts" / "nq_conflicts_bigbench.json").write_text(json.dumps(kc))
    task = load_task("knowledge_conflicts", limit=2)
    assert [s.id for s in task.samples] == ["kc-0", "kc-1", "kc-loc-3", "kc-loc-4"]
    assert task.samples[2].answers == ("old3",) and [u.text for u in task.corpus] == ["ctx 0", "ctx 1"]


@needs_data
def test_gold_corpus_scope_keeps_only_the_answers_units():
    full = load_task("hotpotqa", offset=300, limit=20)
    gold = load_task("hotpotqa", offset=300, limit=20, corpus_scope="gold")
    wanted = {u for s in gold.samples for u in s.gold_unit_ids}
    assert {u.id for u in gold.corpus} == wanted and len(full.corpus) > len(gold.corpus) > 0
    assert gold.samples == full.samples
    with pytest.raises(ValueError, match="corpus_scope"):
        load_task("squad", corpus_scope="selection")
