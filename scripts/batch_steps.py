"""Per-batch-step cost of batched ``dmoe eval`` answers: where a batched arm's latency comes from.

A record answered with ``--batch-size B`` carries ``latency_s`` = its batch's wall time / B, shared
by every row of the batch, and a batch lasts as long as its slowest row. So an arm's mean latency
is (batch steps) x (cost of one step, the rows' prefills spread over it); this script splits
the two. Batches are recovered from the answer file: consecutive records with the same
``latency_s``, at most ``extra.batch_size`` of them (the order ``dmoe eval`` writes; a merged
file is its shards' files one after another). For each
method it prints, as JSON: batches, how many ran to the token cap, the mean batch length in steps
(its longest row's generated tokens), the median seconds per batch step (batch time / steps,
prefills included: on a CPU a long RAG prompt shows up here) and the mean triggers per question.

    python scripts/batch_steps.py results/smollm2-cpu/squad base rag dmoe dmoe_shuffled
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from dmoe.eval.runner import latest_records, results_path


def batches(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive records sharing ``latency_s``, at most their ``extra.batch_size`` per batch."""
    out: list[list[dict[str, Any]]] = []
    for r in records:
        size = int((r.get("extra") or {}).get("batch_size") or 1)
        cur = out[-1] if out else None
        if cur and len(cur) < size and r["latency_s"] == cur[-1]["latency_s"]:
            cur.append(r)
        else:
            out.append([r])
    return out


def step_costs(records: list[dict[str, Any]], cap: int | None = None) -> dict[str, Any]:
    groups = batches(records)
    steps = [max(1, max(r["generated_tokens"] for r in g)) for g in groups]
    per_step = [g[0]["latency_s"] * len(g) / s for g, s in zip(groups, steps, strict=True)]
    cap = cap or max(steps)
    return {"questions": len(records), "batches": len(groups),
            "batches_at_cap": sum(s >= cap for s in steps), "cap": cap,
            "mean_batch_steps": round(statistics.mean(steps), 2),
            "median_s_per_batch_step": round(statistics.median(per_step), 5),
            "mean_s_per_question": round(statistics.mean(r["latency_s"] for r in records), 4),
            "mean_triggers": round(statistics.mean(r.get("triggers") or 0 for r in records), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a dataset folder of dmoe eval: <out>/<dataset>")
    ap.add_argument("methods", nargs="+", help="methods whose <method>.jsonl to read")
    ap.add_argument("--cap", type=int, default=None,
                    help="max_new_tokens of the run (default: the longest batch seen)")
    args = ap.parse_args(argv)
    out = {}
    for m in args.methods:
        path = results_path(args.folder.parent, args.folder.name, m)
        if not path.is_file():
            print(f"no answers for {m!r}: {path} is missing", file=sys.stderr)
            return 2
        out[m] = step_costs(latest_records(path), args.cap)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
