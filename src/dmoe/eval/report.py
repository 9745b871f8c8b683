"""Summaries of a results directory: ``summary.json``, ``tables.md`` and a quality-vs-latency plot.

Everything is recomputed from the per-sample JSONL files, so a summary always describes exactly
what the directory holds (``n`` says how many samples each number averages); scores are recomputed
from each record's raw ``prediction`` with the current metrics.

Per (dataset, method): ``n``, ``em``, ``f1``, ``contains`` (and ``acc`` on yes/no sets), means of
``latency_s``, ``generated_tokens``, ``prefill_tokens``, ``triggers``; ``latency_s_p50``;
``peak_rss_mb`` (mean of the per-sample peaks) and ``peak_rss_mb_max``; ``peak_gpu_mb`` on GPU.
On ``knowledge_conflicts`` quality is over the efficacy samples only, plus
``efficacy`` = share of efficacy answers that contain the substituted answer (``contains``), and
``locality`` = share of locality answers equal (after SQuAD normalisation) to ``base``'s answer to
the same question in the same directory (None when ``base`` has not run them).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmoe.baselines.registry import METHOD_NAMES
from dmoe.eval.metrics import normalize_answer, score
from dmoe.eval.runner import latest_records

KC = "knowledge_conflicts"
DATASET_ORDER = ("hotpotqa", "squad", "strategyqa", "cwq", KC)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def _order(names: Sequence[str], preferred: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else len(preferred), n))


def rescore(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its scores recomputed from ``prediction`` and ``gold`` by the current
    ``dmoe.eval.metrics`` (so a scoring fix applies to old runs without regenerating)."""
    if "prediction" not in record or not record.get("gold"):
        return record
    return {**record, **score(record["prediction"], record["gold"], record.get("kind", "span"))}


def summarize_records(records: list[dict[str, Any]], base: list[dict[str, Any]] | None = None
                      ) -> dict[str, Any]:
    """Aggregate one (dataset, method) file; ``base`` = base's records for locality."""
    records = [rescore(r) for r in records]
    base = [rescore(r) for r in base or []]
    quality = [r for r in records if r.get("split") != "locality"]
    s: dict[str, Any] = {"n": len(records), "n_quality": len(quality)}
    for key in ("em", "f1", "contains"):
        s[key] = _mean([r[key] for r in quality])
    if any(r.get("kind") == "yesno" for r in quality):
        s["acc"] = _mean([r.get("acc") for r in quality])
    for key in ("latency_s", "generated_tokens", "prefill_tokens", "triggers"):
        s[f"{key}_mean"] = _mean([r[key] for r in records])
    lat = [r["latency_s"] for r in records]
    s["latency_s_p50"] = statistics.median(lat) if lat else None
    s["peak_rss_mb"] = _mean([r.get("peak_rss_mb") for r in records])
    peaks = [r["peak_rss_mb"] for r in records if r.get("peak_rss_mb") is not None]
    s["peak_rss_mb_max"] = max(peaks) if peaks else None
    s["peak_gpu_mb"] = _mean([r.get("peak_gpu_mb") for r in records])
    if any(r.get("split") for r in records):
        s["efficacy"] = s["contains"]
        s["n_efficacy"] = len(quality)
        loc = [r for r in records if r.get("split") == "locality"]
        base_answers = {r["id"]: r["answer"] for r in base or [] if r.get("split") == "locality"}
        same = [float(normalize_answer(r["answer"]) == normalize_answer(base_answers[r["id"]]))
                for r in loc if r["id"] in base_answers]
        s["locality"] = _mean(same)
        s["n_locality"] = len(same)
    return s


def summarize(out: str | Path) -> dict[str, Any]:
    """``{"datasets": {dataset: {method: summary}}}`` for every results file under ``out``."""
    root = Path(out)
    datasets: dict[str, dict[str, Any]] = {}
    for ddir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {f.stem: latest_records(f) for f in ddir.glob("*.jsonl")}
        files = {k: v for k, v in files.items() if v}
        if not files:
            continue
        base = files.get("base")
        datasets[ddir.name] = {m: summarize_records(files[m], base)
                               for m in _order(list(files), METHOD_NAMES)}
    ordered = {d: datasets[d] for d in _order(list(datasets), DATASET_ORDER)}
    return {"datasets": ordered}


def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def _methods(summary: dict[str, Any]) -> list[str]:
    names = {m for d in summary["datasets"].values() for m in d}
    return _order(list(names), METHOD_NAMES)


def quality_table(summary: dict[str, Any]) -> str:
    """Table 1 layout: one row per method; EM/F1 (or ACC; efficacy/locality on KC) per dataset."""
    ds = summary["datasets"]
    head, sub = ["Method"], [""]
    for d, methods in ds.items():
        any_m = next(iter(methods.values()))
        cols = (["Efficacy", "Locality"] if d == KC else ["ACC"] if "acc" in any_m else ["EM", "F1"])
        head += [d] + [""] * (len(cols) - 1)
        sub += cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(sub) + " |"]
    for m in _methods(summary):
        row = [m]
        for d, methods in ds.items():
            s = methods.get(m, {})
            if d == KC:
                row += [_fmt(s.get("efficacy"), 100), _fmt(s.get("locality"), 100)]
            elif "acc" in next(iter(methods.values())):
                row += [_fmt(s.get("acc"), 100)]
            else:
                row += [_fmt(s.get("em"), 100), _fmt(s.get("f1"), 100)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def efficiency_table(summary: dict[str, Any]) -> str:
    """Table 2 layout: latency (s/sample) and peak RSS (MB) per dataset, plus token counts."""
    ds = summary["datasets"]
    head = ["Method"] + [f"{d} s/q" for d in ds] + [f"{d} MB" for d in ds] + [
        "gen tok", "prefill tok", "triggers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in _methods(summary):
        per = [ds[d].get(m, {}) for d in ds]
        row = [m] + [_fmt(s.get("latency_s_mean"), digits=2) for s in per]
        row += [_fmt(s.get("peak_rss_mb"), digits=0) for s in per]
        for key in ("generated_tokens_mean", "prefill_tokens_mean", "triggers_mean"):
            row.append(_fmt(_mean([s.get(key) for s in per]), digits=1))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def metric_table(summary: dict[str, Any], key: str) -> str:
    """One column per dataset with ``key`` (x100) per method."""
    ds = summary["datasets"]
    lines = ["| Method | " + " | ".join(ds) + " |", "|" + "---|" * (len(ds) + 1)]
    for m in _methods(summary):
        lines.append(f"| {m} | " + " | ".join(_fmt(ds[d].get(m, {}).get(key), 100) for d in ds)
                     + " |")
    return "\n".join(lines)


def counts_table(summary: dict[str, Any]) -> str:
    ds = summary["datasets"]
    lines = ["| Method | " + " | ".join(ds) + " |", "|" + "---|" * (len(ds) + 1)]
    for m in _methods(summary):
        lines.append(f"| {m} | " + " | ".join(str(ds[d].get(m, {}).get("n", 0)) for d in ds) + " |")
    return "\n".join(lines)


def write_tables(summary: dict[str, Any], path: Path) -> None:
    text = ("# Evaluation results\n\n"
            "## Table 1 — quality (%; EM/F1 SQuAD-normalised, ACC on yes/no sets; "
            "knowledge_conflicts: efficacy / locality)\n\n" + quality_table(summary) + "\n\n"
            "## Table 1b — answer-contained accuracy (%; the gold alias occurs in the answer, "
            "SQuAD-normalised; lenient, for verbose small models)\n\n" + metric_table(summary, "contains")
            + "\n\n"
            "## Table 2 — efficiency (mean wall latency per question, mean per-sample peak RSS; "
            "token counts and triggers averaged over datasets)\n\n" + efficiency_table(summary)
            + "\n\n## Samples per cell\n\n" + counts_table(summary) + "\n")
    path.write_text(text, encoding="utf-8")


def plot_quality_vs_latency(summary: dict[str, Any], path: Path) -> bool:
    """One panel per dataset: headline quality vs mean latency per method. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ds = summary["datasets"]
    if not ds:
        return False
    fig, axes = plt.subplots(1, len(ds), figsize=(4.2 * len(ds), 3.8), squeeze=False)
    for ax, (d, methods) in zip(axes[0], ds.items(), strict=True):
        key = "efficacy" if d == KC else "acc" if "acc" in next(iter(methods.values())) else "f1"
        for m, s in methods.items():
            if s.get(key) is None or s.get("latency_s_mean") is None:
                continue
            color = f"C{METHOD_NAMES.index(m) % 10}" if m in METHOD_NAMES else "k"
            ax.scatter(s["latency_s_mean"], 100 * s[key], s=36, color=color)
            ax.annotate(m, (s["latency_s_mean"], 100 * s[key]), fontsize=8,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_title(d)
        ax.set_xlabel("latency (s / question)")
        ax.set_ylabel(f"{key.upper()} (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: str | Path) -> dict[str, Any]:
    """Write ``summary.json``, ``tables.md`` and ``quality_vs_latency.png`` into ``out``."""
    root = Path(out)
    summary = summarize(root)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_tables(summary, root / "tables.md")
    plot_quality_vs_latency(summary, root / "quality_vs_latency.png")
    return summary
