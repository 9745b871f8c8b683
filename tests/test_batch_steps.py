"""scripts/batch_steps.py: batches recovered from shared latencies, cost split into steps."""

import json

from conftest import load_script


def _rec(qid, latency, tokens, size, triggers=0):
    return {"id": qid, "latency_s": latency, "generated_tokens": tokens, "triggers": triggers,
            "extra": {"batch_size": size}}


def test_batches_split_on_latency_and_size_and_steps_are_the_slowest_row(tmp_path):
    mod = load_script("batch_steps")
    # two batches of 2 with the same time (split by size), then a lone last row; in the file, an
    # older record of q0 ahead of them is superseded
    rows = [_rec("q0", 0.5, 10, 2), _rec("q1", 0.5, 4, 2, triggers=2), _rec("q2", 0.5, 5, 2),
            _rec("q3", 0.5, 5, 2), _rec("q4", 0.9, 3, 2)]
    assert [len(b) for b in mod.batches(rows)] == [2, 2, 1]
    got = mod.step_costs(rows, cap=10)
    assert got["batches"] == 3 and got["batches_at_cap"] == 1
    assert got["mean_batch_steps"] == round((10 + 5 + 3) / 3, 2)
    assert got["median_s_per_batch_step"] == 0.2  # 1.0/10, 1.0/5, 0.9/3
    path = tmp_path / "dmoe.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_rec("q0", 9.0, 1, 1)] + rows) + "\n")
    assert [r["latency_s"] for r in mod.latest_records(path)][:1] == [0.5]
    assert mod.main([str(tmp_path), "dmoe", "--cap", "10"]) == 0
    assert mod.main([str(tmp_path), "rag"]) == 2
