"""Ablations: one knob of DMoE swept over arms, each arm a resumable eval run, one summary.

    dmoe ablate tau --dataset knowledge_conflicts --limit 100 --bank BANK --out results/ablations

Layout under ``OUT/NAME/``::

    runs/<arm>/<dataset>/<method>.jsonl   each arm's per-question records (``dmoe eval``'s format;
                                          rerunning resumes every arm where it stopped)
    runs/base/<dataset>/base.jsonl        the base model, once: the reference row and the answers
                                          knowledge_conflicts' locality is measured against
    summary.json                          {"ablation", "datasets": {dataset: {"arms": [...]}}}
    table.md                              one row per arm: quality, latency, trigger rate
    plot.png                              swept value against quality and latency

    banks/<variant>/                      the banks arms route over instead of --bank (``dtype``:
                                          --bank converted; ``rank``, ``placement``: trained on the
                                          evaluated questions' passages); not results: ``--work``
                                          puts them elsewhere
    runs/<arm>/<dataset>/bank.json        such an arm's bank for that dataset: path, experts,
                                          bytes per expert

Each arm is the shipped configuration with a few ``MethodConfig`` overrides (``ARMS``); nothing is
tuned here: these runs are measurements. The ``trigger`` ablation's ``random`` arm fires at the
rate the ``entropy`` arm measured (triggers per generated token), so the two differ only in *when*
they route. ``rank`` keeps the shipped ``alpha / rank`` = 4, so every rank starts from the same
update scale.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe.eval.report import KC, UNIT_EXPERT_METHODS, routing, summarize_records
from dmoe.eval.runner import latest_records
from dmoe.experts.lora import LoraSpec

INF = math.inf


@dataclass(frozen=True)
class Arm:
    """One configuration of an ablation: a label, its x value, the method and its overrides."""

    label: str
    value: float | str
    method: str = "dmoe"
    overrides: tuple[str, ...] = ()
    distractors: float | None = None  # bank_size: the fraction of other experts the router sees
    router: str | None = None  # router: this one replaces BM25 over the same bank ("dense")
    dtype: str | None = None  # dtype: the bank's experts stored in this dtype
    spec: LoraSpec | None = None  # rank, placement: a bank of this shape, trained for the arm
    # computed from earlier arms' records when the arm starts (the trigger ablation's matched rate)
    derive: Callable[[Path, str], tuple[str, ...]] | None = field(default=None, compare=False)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)

    @property
    def bank_variant(self) -> str | None:
        """The folder name of this arm's own bank (arms of one shape share it), or None."""
        if self.spec is not None:
            return f"rank{self.spec.rank}-alpha{self.spec.alpha:g}-layers{self.spec.n_layers}"
        return self.dtype


def _matched_rate(runs: Path, dataset: str) -> tuple[str, ...]:
    """``trigger_rate`` = the entropy arm's triggers per generated token (0.1 before it ran)."""
    rate = trigger_rate(latest_records(runs / "trigger=entropy" / dataset / "dmoe.jsonl"))
    return (f"trigger_rate={rate if rate is not None else 0.1}",)


ARMS: dict[str, list[Arm]] = {
    "tau": [Arm(f"tau={t:g}", t, overrides=(f"tau={t}",)) for t in (0.5, 1, 1.5, 2, 2.5, 3, INF)],
    "top_k": [Arm(f"k={k},{c}", k, overrides=(f"dmoe_top_k={k}", f"composition={c}"))
              for c in ("cat", "softmax") for k in (1, 2, 3, 5)],
    "trigger": [Arm(f"trigger={t}", t, overrides=(f"trigger={t}",))
                for t in ("entropy", "always", "never")]
    + [Arm("trigger=random", "random", overrides=("trigger=random",), derive=_matched_rate)],
    "router": [Arm("router=bm25", "bm25"), Arm("router=dense", "dense", router="dense"),
               Arm("router=oracle", "oracle", method="dmoe_oracle"),
               Arm("router=random", "random", method="dmoe_random"),
               Arm("router=shuffled", "shuffled", method="dmoe_shuffled")],
    "bank_size": [Arm(f"distractors={f:g}", f, distractors=f) for f in (0.1, 0.2, 0.5, 1.0)],
    "dtype": [Arm(f"dtype={d}", d, dtype=d) for d in ("float32", "bfloat16", "float16", "int8")],
    "rank": [Arm(f"rank={r}", r, spec=LoraSpec(rank=r, alpha=4.0 * r)) for r in (1, 2, 4, 8, 16)],
    # experts on the last n layers; with n > 1 a trigger changes earlier positions' K/V, and the
    # kv_policy arms say what is done about it (n = 1: nothing to do, the cache stays exact)
    "placement": [Arm("layers=1", 1, spec=LoraSpec(n_layers=1))]
    + [Arm(f"layers={n},{p}", n, spec=LoraSpec(n_layers=n), overrides=(f"kv_policy={p}",))
       for n in (2, 4, 8) for p in ("recompute", "partial", "stale")],
}
NAMES = tuple(ARMS)


def trigger_rate(records: list[dict[str, Any]]) -> float | None:
    """Triggers per generated token over ``records`` (None without tokens)."""
    tokens = sum(r.get("generated_tokens", 0) for r in records)
    return sum(r.get("triggers", 0) for r in records) / tokens if tokens else None


def cut_bank(expert_ids: Sequence[str], own: set[str], fraction: float, seed: int = 0
             ) -> list[str]:
    """The experts a ``bank_size`` arm routes over: every one in ``own`` (the evaluated
    questions' experts) plus a seeded ``fraction`` of the others (the distractors)."""
    others = sorted(set(expert_ids) - own)
    keep = random.Random(seed).sample(others, round(fraction * len(others)))
    return sorted(own & set(expert_ids)) + sorted(keep)


def arm_overrides(arm: Arm, runs: Path, dataset: str) -> tuple[str, ...]:
    return arm.overrides + (arm.derive(runs, dataset) if arm.derive else ())


def main_metric(dataset: str, summary: dict[str, Any]) -> tuple[str, float | None]:
    """The dataset's headline number: efficacy on knowledge_conflicts, ACC on yes/no, else F1."""
    if dataset == KC:
        return "efficacy", summary.get("efficacy")
    if "acc" in summary:
        return "acc", summary.get("acc")
    return "f1", summary.get("f1")


def summarize_ablation(out: Path, name: str) -> dict[str, Any]:
    """Read every arm's records under ``out/name/runs`` into the summary (see the module doc)."""
    root = out / name
    runs = root / "runs"
    datasets: dict[str, Any] = {}
    for dataset in sorted({p.name for p in runs.glob("*/*") if p.is_dir()}):
        base = latest_records(runs / "base" / dataset / "base.jsonl")
        rows = []
        for arm in [Arm("base", "base", method="base"), *ARMS[name]]:
            records = latest_records(runs / arm.slug / dataset / f"{arm.method}.jsonl")
            if not records:
                continue
            s = summarize_records(records, base)
            metric, value = main_metric(dataset, s)
            bank_file = runs / arm.slug / dataset / "bank.json"
            bank = json.loads(bank_file.read_text()) if bank_file.is_file() else {}
            rows.append({"arm": arm.label, "value": _json_value(arm.value), "method": arm.method,
                         "n": s["n"], "n_quality": s["n_quality"], "metric": metric,
                         "quality": value,
                         "locality": s.get("locality"), "em": s.get("em"), "f1": s.get("f1"),
                         "latency_s_mean": s["latency_s_mean"],
                         "trigger_rate": trigger_rate(records),
                         "own_expert_active": routing(records).get("own_expert_active")
                         if arm.method in UNIT_EXPERT_METHODS else None,
                         "prefill_tokens_mean": s["prefill_tokens_mean"],
                         "bytes_per_expert": bank.get("bytes_per_expert")})
        datasets[dataset] = {"arms": rows}
    return {"ablation": name, "datasets": datasets}


def _json_value(value: float | str) -> float | str:
    return "inf" if value == INF else value


def table(summary: dict[str, Any]) -> str:
    """One Markdown table per dataset (+ the share of questions whose own expert was active,
    prefill tokens for placement, bytes where measured)."""
    lines = [f"# Ablation: {summary['ablation']}", ""]
    for dataset, d in summary["datasets"].items():
        rows = d["arms"]
        metric = rows[0]["metric"] if rows else "quality"
        prefill = summary["ablation"] == "placement"  # what a trigger re-runs
        sizes = any(r.get("bytes_per_expert") for r in rows)
        head = (f"| arm | n | {metric} | locality | own expert active | latency s | triggers / token |"
                + (" prefill tokens |" if prefill else "") + (" bytes / expert |" if sizes else ""))
        lines += [f"## {dataset}", "", head, "|---" * head.count(" |") + "|"]
        for r in rows:
            lines.append(f"| {r['arm']} | {r['n']} | {_pct(r['quality'])} | "
                         f"{_pct(r['locality'])} | {_pct(r.get('own_expert_active'))} | "
                         f"{_num(r['latency_s_mean'], 2)} | "
                         f"{_num(r['trigger_rate'], 3)} |"
                         + (f" {_num(r['prefill_tokens_mean'], 1)} |" if prefill else "")
                         + (f" {_int(r.get('bytes_per_expert'))} |" if sizes else ""))
        lines.append("")
    return "\n".join(lines)


def _int(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Quality (left axis) and latency (right) per arm, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["datasets"].items())
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6 * max(len(datasets), 1), 4),
                             squeeze=False)
    for ax, (dataset, d) in zip(axes[0], datasets, strict=False):
        arms = [r for r in d["arms"] if r["method"] != "base"]
        numeric = all(isinstance(r["value"], (int, float)) or r["value"] == "inf" for r in arms)
        style = "-" if numeric else ""  # categories are not joined by lines
        x = list(range(len(arms)))
        metric = arms[0]["metric"] if arms else "quality"
        ax.plot(x, [100 * (r["quality"] or 0) for r in arms], "o" + style, color="tab:blue",
                label=metric)
        if any(r["locality"] is not None for r in arms):
            ax.plot(x, [100 * (r["locality"] or 0) for r in arms], "^" + style, color="tab:green",
                    label="locality")
        base = next((r for r in d["arms"] if r["method"] == "base"), None)
        if base is not None and base["quality"] is not None:
            ax.axhline(100 * base["quality"], color="tab:blue", ls=":", label=f"base {metric}")
        ax.set_xticks(x, [r["arm"].split("=", 1)[-1] for r in arms], rotation=30)
        ax.set_ylabel("%")
        n = min((r["n_quality"] for r in arms), default=0)
        ax.set_title(f"{summary['ablation']} on {dataset} ({n} questions per arm"
                     + (f" + {min(r['n'] for r in arms) - n} locality)" if dataset == KC else ")"))
        right = ax.twinx()
        right.plot(x, [r["latency_s_mean"] for r in arms], "s" + ("--" if numeric else ""),
                   color="tab:red", label="latency")
        right.set_ylabel("latency s / question", color="tab:red")
        ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_ablation(out: Path, name: str) -> dict[str, Any]:
    summary = summarize_ablation(out, name)
    root = out / name
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (root / "table.md").write_text(table(summary), encoding="utf-8")
    plot(summary, root / "plot.png")
    return summary
