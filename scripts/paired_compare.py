"""Paired comparison of two ``dmoe eval`` result directories over the same questions.

For each (dataset, method) present in both: the questions answered in both (by id), the share
whose answer text is identical, each side's main metric (F1; ACC on StrategyQA; efficacy =
``contains`` on knowledge_conflicts' efficacy questions), their paired difference (candidate -
reference), and its 95% bootstrap CI (10,000 resamples of the paired questions, seeded).
Locality questions of knowledge_conflicts count towards "same answer" only.

    python scripts/paired_compare.py --reference results/dev/hotpotqa \\
        --candidate /tmp/dev/weights/hotpot-int8 --methods base,rag,dmoe --json out.json

Prints a Markdown table (and writes the rows as JSON with --json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dmoe.eval.report import KC, rescore
from dmoe.eval.runner import latest_records


def main_metric(dataset: str, records: list[dict[str, Any]]) -> str:
    if dataset == KC:
        return "contains"
    return "acc" if any(r.get("kind") == "yesno" for r in records) else "f1"


def bootstrap_ci(diffs: list[float], n_resamples: int = 10_000, seed: int = 0
                 ) -> tuple[float, float]:
    """95% percentile CI of the mean of ``diffs`` (resampled with replacement)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(diffs, dtype=torch.float64)
    idx = torch.randint(len(d), (n_resamples, len(d)), generator=g)
    means = d[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def compare(ref_dir: Path, cand_dir: Path, dataset: str, method: str) -> dict[str, Any] | None:
    ref_path, cand_path = (d / dataset / f"{method}.jsonl" for d in (ref_dir, cand_dir))
    if not (ref_path.exists() and cand_path.exists()):
        return None
    ref = {r["id"]: rescore(r) for r in latest_records(ref_path)}
    cand = {r["id"]: rescore(r) for r in latest_records(cand_path)}
    ids = [i for i in ref if i in cand]
    if not ids:
        return None
    metric = main_metric(dataset, list(ref.values()))
    quality = [i for i in ids if ref[i].get("split") != "locality"]
    diffs = [float(cand[i][metric]) - float(ref[i][metric]) for i in quality]
    lo, hi = bootstrap_ci(diffs)
    mean = lambda side: sum(float(side[i][metric]) for i in quality) / len(quality)  # noqa: E731
    return {"dataset": dataset, "method": method, "n": len(ids), "n_quality": len(quality),
            "same_answer": round(sum(ref[i]["answer"] == cand[i]["answer"] for i in ids)
                                 / len(ids), 4),
            "metric": "efficacy" if dataset == KC else metric,
            "reference": round(mean(ref), 4), "candidate": round(mean(cand), 4),
            "diff": round(sum(diffs) / len(diffs), 4),
            "ci95": [round(lo, 4), round(hi, 4)], "ci_contains_0": lo <= 0 <= hi}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="results directory A")
    ap.add_argument("--candidate", required=True, type=Path, help="results directory B")
    ap.add_argument("--methods", default="base,rag,dmoe", help="comma-separated")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    datasets = sorted(p.name for p in args.candidate.iterdir() if p.is_dir())
    rows = [row for d in datasets for m in args.methods.split(",")
            if (row := compare(args.reference, args.candidate, d, m.strip())) is not None]
    if not rows:
        raise SystemExit(f"no (dataset, method) answered in both {args.reference} and "
                         f"{args.candidate}")
    print("| dataset | method | n | same answer | metric | reference | candidate | diff "
          "| 95% CI | CI holds 0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['method']} | {r['n']} | {100 * r['same_answer']:.0f}% | "
              f"{r['metric']} | {100 * r['reference']:.1f} | {100 * r['candidate']:.1f} | "
              f"{100 * r['diff']:+.1f} | [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}] | "
              f"{'yes' if r['ci_contains_0'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
