"""Issue 13's checks on a headline ``summary.json``, one verdict per dataset and check, as JSON.

The checks, each read from the pooled summary (latest record per question):

- ``n``: every method of a dataset has at least ``--min-n`` questions (twice that on
  knowledge_conflicts, whose n counts efficacy and locality questions together);
- ``dmoe_ge_base`` and ``dmoe_ge_<m>`` for prag, sft_lora, poly_prag: dmoe's main metric
  (efficacy on knowledge_conflicts, ACC on yes/no sets, else F1) is at least theirs;
- ``dmoe_ge_rag_efficacy`` and ``dmoe_locality`` on knowledge_conflicts (locality >= 0.9);
- ``latency_le_rag``: dmoe's mean latency per question is at most RAG's.

A check whose inputs are missing (a method not run yet) is ``null``, never met. Each verdict
carries the numbers it compared, so a miss can be quoted with its margin.

    python scripts/check_headline.py results/smollm2-cpu/summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dmoe.eval.ablate import main_metric
from dmoe.eval.report import KC

METHODS = ("base", "rag", "flare", "prag", "prag_combine", "sft_lora", "poly_prag", "dmoe",
           "dmoe_random", "dmoe_shuffled")
BEATEN = ("base", "prag", "sft_lora", "poly_prag")


def _ge(a: float | None, b: float | None) -> dict[str, Any]:
    met = None if a is None or b is None else a >= b
    return {"met": met, "dmoe": a, "other": b}


def check_dataset(name: str, methods: dict[str, dict[str, Any]], min_n: int) -> dict[str, Any]:
    """The checks of one dataset's ``{method: summary}``."""
    need = 2 * min_n if name == KC else min_n
    ns = {m: methods.get(m, {}).get("n", 0) for m in METHODS}
    checks: dict[str, Any] = {"n": {"met": all(n >= need for n in ns.values()), "need": need,
                                    "min": min(ns.values()), "per_method": ns}}
    dmoe = methods.get("dmoe")
    key, ours = main_metric(name, dmoe) if dmoe else ("", None)
    for other in BEATEN:
        theirs = main_metric(name, methods[other])[1] if other in methods else None
        checks[f"dmoe_ge_{other}"] = {"metric": key, **_ge(ours, theirs)}
    if name == KC:
        rag_eff = methods.get("rag", {}).get("efficacy")
        checks["dmoe_ge_rag_efficacy"] = _ge(ours, rag_eff)
        loc = dmoe.get("locality") if dmoe else None
        checks["dmoe_locality"] = {"met": None if loc is None else loc >= 0.9, "dmoe": loc}
    lat = (dmoe or {}).get("latency_s_mean")
    rag_lat = methods.get("rag", {}).get("latency_s_mean")
    checks["latency_le_rag"] = {"met": None if lat is None or rag_lat is None else lat <= rag_lat,
                                "dmoe": lat, "other": rag_lat}
    return checks


def check_summary(summary: dict[str, Any], min_n: int = 300) -> dict[str, Any]:
    datasets = {name: check_dataset(name, methods, min_n)
                for name, methods in summary["datasets"].items()}
    verdicts = [c["met"] for checks in datasets.values() for c in checks.values()]
    return {"all_met": all(v is True for v in verdicts), "datasets": datasets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summary", type=Path, help="a results folder's summary.json")
    p.add_argument("--min-n", type=int, default=300, help="questions per method (default 300)")
    args = p.parse_args()
    if not args.summary.is_file():
        raise SystemExit(f"no such file: {args.summary}")
    print(json.dumps(check_summary(json.loads(args.summary.read_text()), args.min_n), indent=1))


if __name__ == "__main__":
    main()
