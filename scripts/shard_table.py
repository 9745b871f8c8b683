"""Per-shard view of one dataset in a ``dmoe eval`` results folder built from ``--offset`` shards.

A headline results folder grows one shard of questions per session (``--offset 50k --limit 50``),
and ``summary.json`` pools them. This prints, per method, the main metric (F1; ACC on yes/no
sets) and the answer-contained share of each shard and of all of them, with n, so a shard's
number can be read beside the pooled one. The shard of a record is its question's position in the
dataset's order (``load_task``), not the record's position in the file. It also splits each
method by yes/no questions (gold "yes"/"no") against the rest, which HotpotQA's comparison
questions need.

    python scripts/shard_table.py results/smollm2-cpu --dataset hotpotqa --shard-size 50 \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from dmoe.eval.datasets import load_task
from dmoe.eval.metrics import yes_no_golds
from dmoe.eval.report import rescore
from dmoe.eval.runner import latest_records


def _mean(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.1f}" if values else "–"


def _cell(records: list[dict[str, Any]], metric: str) -> str:
    if not records:
        return "–"
    return (f"{_mean([r[metric] for r in records])} / "
            f"{_mean([r['contains'] for r in records])} ({len(records)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a dmoe eval results folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    order = {s.id: i for i, s in enumerate(load_task(args.dataset, args.data_dir, limit=None)
                                           .samples)}
    files = sorted((args.results / args.dataset).glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no records under {args.results / args.dataset}")
    rows, shards = {}, set()
    for path in files:
        records = [rescore(r) for r in latest_records(path)]
        unknown = [r["id"] for r in records if r["id"] not in order]
        if unknown:
            raise SystemExit(f"{path}: {len(unknown)} ids not in {args.dataset}, e.g. {unknown[0]}")
        by_shard: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_shard[order[r["id"]] // args.shard_size].append(r)
        shards |= set(by_shard)
        rows[path.stem] = (records, by_shard)
    metric = "acc" if any(r.get("kind") == "yesno" for rs, _ in rows.values() for r in rs) else "f1"
    cols = sorted(shards)
    head = [f"q {k * args.shard_size}-{(k + 1) * args.shard_size - 1}" for k in cols]
    print(f"{args.dataset}: {metric} / contained % (n), per shard of {args.shard_size} questions\n")
    print("| method | " + " | ".join(head) + " | all | yes/no | other |")
    print("|---|" + "---|" * (len(cols) + 3))
    for method, (records, by_shard) in rows.items():
        cells = [_cell(by_shard.get(k, []), metric) for k in cols]
        yes_no = [r for r in records if yes_no_golds(r["gold"])]
        other = [r for r in records if not yes_no_golds(r["gold"])]
        print(f"| {method} | " + " | ".join(cells) + f" | {_cell(records, metric)} | "
              f"{_cell(yes_no, metric)} | {_cell(other, metric)} |")


if __name__ == "__main__":
    main()
