"""The runner: per-sample JSONL, resume computes nothing twice, summary/tables/plot from files."""

import json

import pytest
from conftest import CharTokenizer, tiny_model

from dmoe.baselines import MethodConfig, PassageRetriever, Prediction, Resources, build_method
from dmoe.cli import main
from dmoe.corpus.units import KnowledgeUnit
from dmoe.eval.datasets import Sample, Task
from dmoe.eval.report import (
    diagnostics_table,
    quality_table,
    sign_test_p,
    spread_labels,
    summarize,
    write_report,
)
from dmoe.eval.runner import (
    latest_records,
    merge_results,
    read_records,
    results_path,
    run_task,
    shard,
)
from dmoe.experts.lora import ExpertAdapter, LoraSpec

CORPUS = [KnowledgeUnit("k0", "Zorvan is the capital of Ventia."),
          KnowledgeUnit("k1", "The river Quell is long.")]
TASK = Task("knowledge_conflicts", [
    Sample("e0", "What is the capital of Ventia?", ("Zorvan",), gold_unit_ids=("k0",),
           meta={"split": "efficacy"}),
    Sample("e1", "Is the river Quell long?", ("yes",), kind="yesno", meta={"split": "efficacy"}),
    Sample("l0", "Who wrote Hamlet?", ("Shakespeare",), meta={"split": "locality"}),
], CORPUS)


@pytest.fixture(scope="module")
def resources():
    model = tiny_model("llama", layers=2)
    return Resources(model, CharTokenizer(), ExpertAdapter(model, LoraSpec()),
                     MethodConfig(max_new_tokens=4, stop_strings=()))


class Counting:
    """Wraps a method and counts answer() calls."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def answer(self, sample):
        self.calls += 1
        return self.inner.answer(sample)

    def close(self):
        self.inner.close()


def test_resume_and_report(tmp_path, resources):
    retriever = PassageRetriever(CORPUS)
    built = []

    def build(name):
        built.append(Counting(build_method(name, resources, retriever)))
        return built[-1]

    assert run_task(TASK, ["base", "rag"], build, tmp_path, progress=False) == {"base": 3, "rag": 3}
    recs = read_records(results_path(tmp_path, TASK.name, "rag"))
    assert [r["id"] for r in recs] == ["e0", "e1", "l0"]
    r = recs[0]
    for key in ("question", "gold", "prediction", "answer", "em", "f1", "latency_s", "triggers",
                "active_experts", "generated_tokens", "prefill_tokens", "peak_rss_mb"):
        assert key in r, key
    assert r["retrieved"][0] == "k0" and recs[1]["acc"] in (0.0, 1.0)

    # second run: nothing recomputed, methods not even built
    built.clear()
    assert run_task(TASK, ["base", "rag"], build, tmp_path, progress=False) == {"base": 0, "rag": 0}
    assert built == []

    # a torn last line (crash mid-write) is dropped and that sample alone is redone
    path = results_path(tmp_path, TASK.name, "base")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:20])
    assert run_task(TASK, ["base"], build, tmp_path, progress=False) == {"base": 1}
    assert built[-1].calls == 1 and len(read_records(path)) == 3

    # a different corpus (another --limit on HotpotQA-like sets) recomputes; the newest record counts
    bigger = Task(TASK.name, TASK.samples[:1], [*CORPUS, KnowledgeUnit("k2", "Extra passage.")])
    assert run_task(bigger, ["rag"], build, tmp_path, progress=False) == {"rag": 1}
    assert len(read_records(results_path(tmp_path, TASK.name, "rag"))) == 4

    summary = write_report(tmp_path)
    s = summary["datasets"]["knowledge_conflicts"]
    assert s["base"]["n"] == 3 and s["base"]["n_quality"] == 2
    assert s["base"]["locality"] == 1.0 and s["rag"]["n_locality"] == 1 and s["rag"]["n"] == 3
    for key in ("em", "f1", "acc", "efficacy", "latency_s_mean", "peak_rss_mb"):
        assert s["rag"][key] is not None, key
    assert (tmp_path / "tables.md").read_text().count("| rag |") == 5  # tables 1, 1b, 2, 3, samples per cell
    assert (tmp_path / "quality_vs_latency.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    retriever.close()


def test_summary_from_handmade_records(tmp_path):
    d = tmp_path / "squad"
    d.mkdir()
    rec = {"id": "a", "kind": "span", "split": None, "em": 1.0, "f1": 1.0, "contains": 1.0,
           "answer": "x", "latency_s": 2.0, "generated_tokens": 3, "prefill_tokens": 10,
           "triggers": 1, "peak_rss_mb": 100.0}
    lines = [rec, {**rec, "id": "b", "em": 0.0, "f1": 0.5, "latency_s": 4.0, "peak_rss_mb": 300.0}]
    (d / "dmoe.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = summarize(tmp_path)["datasets"]["squad"]["dmoe"]
    assert s["em"] == 0.5 and s["f1"] == 0.75 and s["latency_s_mean"] == 3.0
    assert s["peak_rss_mb"] == 200.0 and s["peak_rss_mb_max"] == 300.0 and "acc" not in s
    assert "| dmoe | 50.0 | 75.0 |" in quality_table(summarize(tmp_path))
    # the CLI rebuilds the report without loading a model
    assert main(["eval", "--report-only", "--out", str(tmp_path), "--datasets", "squad"]) == 0
    assert (tmp_path / "tables.md").is_file()
    assert main(["eval", "--methods", "nope", "--out", str(tmp_path)]) == 2


def test_prediction_is_frozen():
    p = Prediction("x", 0.1, 1, 2)
    with pytest.raises(AttributeError):
        p.text = "y"  # type: ignore[misc]


def test_methods_interleave_per_sample_and_shards_split(tmp_path, resources):
    order = []

    class Recording(Counting):
        def answer(self, sample):
            order.append((sample.id, self.name))
            return super().answer(sample)

    retriever = PassageRetriever(CORPUS)
    build = lambda name: Recording(build_method(name, resources, retriever))  # noqa: E731
    part = Task(TASK.name, shard(TASK.samples, 0, 2), CORPUS)
    assert [s.id for s in part.samples] == ["e0", "l0"]
    assert part.corpus_fingerprint == TASK.corpus_fingerprint  # a shard keeps the whole corpus
    assert run_task(part, ["base", "rag"], build, tmp_path, progress=False) == {"base": 2, "rag": 2}
    assert order == [("e0", "base"), ("e0", "rag"), ("l0", "base"), ("l0", "rag")]
    # the other shard fills in the rest; together they answer every sample once
    order.clear()
    rest = Task(TASK.name, shard(TASK.samples, 1, 2), CORPUS)
    assert run_task(rest, ["base"], build, tmp_path, progress=False) == {"base": 1}
    assert order == [("e1", "base")]
    with pytest.raises(ValueError, match="K/N"):
        shard(TASK.samples, 2, 2)
    with pytest.raises(SystemExit):
        main(["eval", "--shard", "3/2", "--out", str(tmp_path)])
    retriever.close()


def test_batched_run_records_the_same_answers(tmp_path, resources):
    retriever = PassageRetriever(CORPUS)
    build = lambda name: build_method(name, resources, retriever)  # noqa: E731
    methods = ["base", "rag", "flare"]  # flare has no answer_batch: answered one by one
    assert run_task(TASK, methods, build, tmp_path / "b1", progress=False) == dict.fromkeys(methods, 3)
    assert run_task(TASK, methods, build, tmp_path / "b2", progress=False, batch_size=2) == \
        dict.fromkeys(methods, 3)
    for m in methods:
        one, two = (read_records(results_path(tmp_path / d, TASK.name, m)) for d in ("b1", "b2"))
        assert [(r["id"], r["prediction"], r["generated_tokens"]) for r in one] == \
            [(r["id"], r["prediction"], r["generated_tokens"]) for r in two]
        assert [r["extra"].get("batch_size") for r in two] == \
            ([None] * 3 if m == "flare" else [2, 2, None])  # the last batch holds one sample
    with pytest.raises(ValueError, match="batch_size"):
        run_task(TASK, methods, build, tmp_path / "b0", progress=False, batch_size=0)
    with pytest.raises(SystemExit):
        main(["eval", "--batch-size", "0", "--out", str(tmp_path)])
    retriever.close()


def test_a_results_directory_keeps_one_weights_mode(tmp_path):
    from dmoe.eval.runner import check_weights, log_invocation

    check_weights(tmp_path, "fp16")  # nothing there yet
    log_invocation(tmp_path, {"argv": ["dmoe", "eval"]})  # logged before weights modes: fp32
    check_weights(tmp_path, "fp32")
    with pytest.raises(ValueError, match="--weights fp32"):
        check_weights(tmp_path, "fp16")
    log_invocation(tmp_path / "b", {"weights": "fp16"})
    check_weights(tmp_path / "b", "fp16")
    log_invocation(tmp_path / "gpu", {"device": "cuda:0"})  # the old CUDA default was bf16
    check_weights(tmp_path / "gpu", "bf16")


def test_diagnostics_from_handmade_records(tmp_path):
    """Paired splits, the sign test, routing shares and latency ratios, counted by hand."""
    d = tmp_path / "knowledge_conflicts"
    d.mkdir()

    def rec(i, split, contains, answer="x", active=(), latency=1.0, tokens=1):
        return {"id": f"{split[0]}{i}", "kind": "span", "split": split, "em": 0.0, "f1": 0.0,
                "contains": contains, "answer": answer, "latency_s": latency,
                "generated_tokens": tokens, "prefill_tokens": 1, "triggers": 0,
                "active_experts": list(active), "gold_unit_ids": [f"u{i}"] if split == "efficacy"
                else []}

    files = {
        "base": [rec(i, "efficacy", 0.0) for i in range(4)] + [rec(0, "locality", 0.0)],
        "rag": [rec(i, "efficacy", float(i == 3)) for i in range(4)]
               + [rec(0, "locality", 0.0, latency=3.0)],
        # own expert on e0, e1; a wrong one on e2; none on e3; an expert on the locality question
        "dmoe": [rec(0, "efficacy", 1.0, active=["u0"], latency=2.0, tokens=5),
                 rec(1, "efficacy", 0.0, active=["u9", "u1"], latency=3.0, tokens=3),
                 rec(2, "efficacy", 1.0, active=["u5"], latency=2.0), rec(3, "efficacy", 0.0),
                 rec(0, "locality", 0.0, answer="y", active=["u2"], latency=0.5)],
    }
    for m, lines in files.items():
        (d / f"{m}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = summarize(tmp_path)["datasets"]["knowledge_conflicts"]
    dm = s["dmoe"]
    assert dm["expert_active"] == 0.75 and dm["own_expert_active"] == 0.5 and dm["n_own_expert"] == 2
    assert dm["score_own_expert"] == 0.5 and dm["score_no_own_expert"] == 0.5
    assert dm["base_score_own_expert"] == 0.0  # base on e0 and e1
    assert dm["tokens_own_expert"] == 4.0 and dm["base_tokens_own_expert"] == 1.0
    assert dm["locality_expert_active"] == 1.0 and dm["locality"] == 0.0
    assert dm["paired"]["base"] == {"n": 4, "better": 2, "worse": 0, "sign_test_p": 0.5}
    assert dm["paired"]["rag"] == {"n": 4, "better": 2, "worse": 1, "sign_test_p": 1.0}
    assert dm["latency_vs_base_p50"] == 2.0  # ratios 2, 3, 2, 1, 0.5
    assert "own_expert_active" not in s["rag"] and "base" not in s["base"]["paired"]
    assert s["rag"]["latency_vs_base_p50"] == 1.0
    table = diagnostics_table(summarize(tmp_path))
    assert ("| knowledge_conflicts | dmoe | 75.0 | 50.0 | 50.0 (0.0) / 50.0 | 4.0 (1.0) | 100.0 "
            "| 2/0, 0.5 | 2/1, 1 | 2.00 |") in table


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) == 1.0
    assert sign_test_p(10, 0) == sign_test_p(0, 10) == 2 / 2 ** 10
    assert abs(sign_test_p(50, 29) - 0.0238) < 1e-4  # the knowledge_conflicts dmoe-vs-rag split


def test_spread_labels_moves_only_overlapping_labels_up():
    boxes = [(0, 0, 10, 2), (5, 1, 15, 3), (6, 1.5, 9, 2.5), (20, 0, 30, 2), (0, 9, 4, 10)]
    shifts = spread_labels(boxes, gap=0.5)
    assert shifts[0] == 0 and shifts[3] == 0 and shifts[4] == 0  # lowest, or apart from the rest
    assert shifts[1] == 1.5 and shifts[2] == 3.5  # above box 0, then above box 1 (+ gap)
    moved = [(x0, y0 + d, x1, y1 + d) for (x0, y0, x1, y1), d in zip(boxes, shifts, strict=True)]
    for i, a in enumerate(moved):
        for b in moved[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_merge_puts_shards_together_idempotently(tmp_path, capsys):
    def write(root, method, records, weights="fp16"):
        d = root / "squad"
        d.mkdir(parents=True, exist_ok=True)
        with (d / f"{method}.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with (root / "runs.jsonl").open("a") as f:
            f.write(json.dumps({"command": str(root), "weights": weights}) + "\n")

    rec = {"id": "a", "kind": "span", "split": None, "em": 0.0, "f1": 0.0, "contains": 0.0,
           "answer": "x", "prediction": "x", "gold": ["y"], "latency_s": 1.0,
           "generated_tokens": 1, "prefill_tokens": 1, "triggers": 0}
    s0, s1, out = tmp_path / "s0", tmp_path / "s1", tmp_path / "out"
    write(s0, "base", [rec, {**rec, "id": "c"}])
    write(s1, "base", [{**rec, "id": "b"}])
    write(s1, "rag", [{**rec, "id": "b", "prediction": "y", "answer": "y"}])
    assert merge_results([s0, s1], out) == {"squad/base": 3, "squad/rag": 1}
    assert [r["id"] for r in read_records(results_path(out, "squad", "base"))] == ["a", "c", "b"]
    assert len(read_records(out / "runs.jsonl")) == 2
    assert merge_results([s0, s1], out) == {}  # idempotent
    # a torn line at the end of the destination is cut; a rerun's newer record wins
    with results_path(out, "squad", "base").open("a") as f:
        f.write('{"id": "torn')
    write(s1, "base", [{**rec, "id": "a", "prediction": "y", "answer": "y"}])
    assert merge_results([s1], out) == {"squad/base": 1}
    latest = {r["id"]: r for r in latest_records(results_path(out, "squad", "base"))}
    assert len(latest) == 3 and latest["a"]["prediction"] == "y"
    # refused before writing: a missing source, merging into itself
    for bad, msg in (([s0, tmp_path / "nope"], "not a results directory"), ([out], "into itself")):
        with pytest.raises(ValueError, match=msg):
            merge_results(bad, out)
    # the CLI merges and rebuilds the report without a model
    assert main(["eval", "--merge", str(s0), str(s1), "--out", str(out)]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert summarize(out)["datasets"]["squad"]["rag"]["f1"] == 1.0
