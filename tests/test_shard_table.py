"""scripts/shard_table.py: a record's shard is its question's position in the dataset."""

import json
import sys
from types import SimpleNamespace

from conftest import load_script


def test_shards_follow_dataset_order_not_file_order(tmp_path, monkeypatch, capsys):
    mod = load_script("shard_table")
    ids = [f"q{i}" for i in range(4)]
    monkeypatch.setattr(mod, "load_task", lambda *a, **k: SimpleNamespace(
        samples=[SimpleNamespace(id=i) for i in ids]))
    rows = [("q3", "Paris", ["Paris"]), ("q0", "no", ["yes"]), ("q1", "Rome", ["Oslo"]),
            ("q2", "yes", ["yes"])]  # written out of order: shard 1's q3 first
    (tmp_path / "hotpotqa").mkdir()
    with (tmp_path / "hotpotqa" / "dmoe.jsonl").open("w") as f:
        for qid, pred, gold in rows:
            f.write(json.dumps({"id": qid, "prediction": pred, "gold": gold, "kind": "span",
                                "f1": -1.0, "contains": -1.0}) + "\n")  # rescored, not read
    monkeypatch.setattr(sys, "argv", ["shard_table", str(tmp_path), "--dataset", "hotpotqa",
                                      "--shard-size", "2"])
    mod.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dmoe"))
    # q0-q1 both wrong; q2-q3 both right; yes/no: q0 wrong, q2 right; other: q1 wrong, q3 right
    assert row == ("| dmoe | 0.0 / 0.0 (2) | 100.0 / 100.0 (2) | 50.0 / 50.0 (4) | "
                   "50.0 / 50.0 (2) | 50.0 / 50.0 (2) |")
