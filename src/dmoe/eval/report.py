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

Diagnostics, from the same files:

- ``latency_vs_base_p50``: the median over samples of this method's latency over ``base``'s on
  the same sample (a ratio measured side by side, so less noisy than the means).
- For the methods that activate per-unit experts (dmoe, its controls, prag): ``expert_active`` and
  ``own_expert_active``, the shares of quality samples with some expert / one of the sample's
  ``gold_unit_ids`` among its active experts (eval banks name each expert after its unit);
  ``score_own_expert`` / ``score_no_own_expert``, the headline score over each group; on
  ``knowledge_conflicts`` also ``locality_expert_active``, the share of locality samples with an
  expert active. Where ``base`` answered them: ``base_score_own_expert``, base's headline score on
  the same own-expert samples, and ``tokens_own_expert`` / ``base_tokens_own_expert``, the mean
  generated tokens of each there (does the expert change what is said, or how long it runs?).
- ``paired``: against ``base`` and ``rag``, on the samples both answered, how many this method
  scores higher / lower on the headline metric (efficacy, ACC on yes/no sets, else F1) and the
  two-sided exact sign-test p-value of that split (ties dropped).
"""

from __future__ import annotations

import json
import math
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
    return _summarize_scored([rescore(r) for r in records], [rescore(r) for r in base or []])


def _summarize_scored(records: list[dict[str, Any]], base: list[dict[str, Any]]
                      ) -> dict[str, Any]:
    """``summarize_records`` of records already rescored."""
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


def headline(record: dict[str, Any]) -> float:
    """A scored record's headline metric: ACC on yes/no questions, else F1; on
    ``knowledge_conflicts`` efficacy samples (the only ones it is asked of) answer-contained."""
    if record.get("split") == "efficacy":
        return float(record["contains"])
    return float(record["acc"] if record.get("kind") == "yesno" else record["f1"])


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | each side has p = 1/2)."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(records: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample headline scores of ``records`` against ``anchor``'s on the same quality samples."""
    theirs = {r["id"]: headline(r) for r in anchor if r.get("split") != "locality"}
    ours = [(headline(r), theirs[r["id"]]) for r in records
            if r.get("split") != "locality" and r["id"] in theirs]
    better = sum(a > b for a, b in ours)
    worse = sum(a < b for a, b in ours)
    return {"n": len(ours), "better": better, "worse": worse,
            "sign_test_p": sign_test_p(better, worse)}


# methods whose active experts are per-unit experts (named after their units in eval banks)
UNIT_EXPERT_METHODS = ("prag", "prag_combine", "dmoe", "dmoe_random", "dmoe_shuffled", "dmoe_oracle")


def routing(records: list[dict[str, Any]], base: list[dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    """Which experts were active, against the samples' own units (see the module docstring)."""
    quality = [r for r in records if r.get("split") != "locality"]
    own = [r for r in quality if set(r.get("active_experts") or ()) & set(r.get("gold_unit_ids") or ())]
    own_ids = {r["id"] for r in own}
    rest = [r for r in quality if r["id"] not in own_ids]
    s = {"expert_active": _mean([float(bool(r.get("active_experts"))) for r in quality]),
         "own_expert_active": len(own) / len(quality) if quality else None,
         "n_own_expert": len(own),
         "score_own_expert": _mean([headline(r) for r in own]),
         "score_no_own_expert": _mean([headline(r) for r in rest])}
    theirs = {r["id"]: r for r in base or ()}
    if own and all(r["id"] in theirs for r in own):
        s["base_score_own_expert"] = _mean([headline(theirs[r["id"]]) for r in own])
        s["tokens_own_expert"] = _mean([r["generated_tokens"] for r in own])
        s["base_tokens_own_expert"] = _mean([theirs[r["id"]]["generated_tokens"] for r in own])
    loc = [r for r in records if r.get("split") == "locality"]
    if loc:
        s["locality_expert_active"] = _mean([float(bool(r.get("active_experts"))) for r in loc])
    return s


def _latency_vs(records: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> float | None:
    theirs = {r["id"]: r["latency_s"] for r in anchor}
    ratios = [r["latency_s"] / theirs[r["id"]] for r in records if theirs.get(r["id"])]
    return statistics.median(ratios) if ratios else None


def summarize(out: str | Path) -> dict[str, Any]:
    """``{"datasets": {dataset: {method: summary}}}`` for every results file under ``out``."""
    root = Path(out)
    datasets: dict[str, dict[str, Any]] = {}
    for ddir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {f.stem: latest_records(f) for f in ddir.glob("*.jsonl")}
        files = {k: v for k, v in files.items() if v}
        if not files:
            continue
        files = {m: [rescore(r) for r in files[m]] for m in _order(list(files), METHOD_NAMES)}
        base = files.get("base")
        methods = {m: _summarize_scored(recs, base or []) for m, recs in files.items()}
        for m, recs in files.items():
            s = methods[m]
            s["latency_vs_base_p50"] = _latency_vs(recs, base) if base else None
            if m in UNIT_EXPERT_METHODS:
                s.update(routing(recs, base))
            s["paired"] = {a: paired(recs, files[a]) for a in ("base", "rag")
                           if a in files and a != m}
        datasets[ddir.name] = methods
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


def diagnostics_table(summary: dict[str, Any]) -> str:
    """Per (dataset, method): routing shares, headline score with / without the own expert, the
    paired split against base and rag, and the median latency ratio to base."""
    head = ["Dataset", "Method", "expert active", "own expert active", "score: own (base) / not",
            "tokens: own (base)", "loc. expert active", "vs base (+/-, p)", "vs rag (+/-, p)",
            "latency / base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def vs(s: dict[str, Any], anchor: str) -> str:
        pr = s.get("paired", {}).get(anchor)
        return "–" if pr is None else f"{pr['better']}/{pr['worse']}, {pr['sign_test_p']:.3g}"

    for d, methods in summary["datasets"].items():
        for m, s in methods.items():
            if m == "base":
                continue
            ratio = s.get("latency_vs_base_p50")
            lines.append("| " + " | ".join([
                d, m, _fmt(s.get("expert_active"), 100), _fmt(s.get("own_expert_active"), 100),
                f"{_fmt(s.get('score_own_expert'), 100)} "
                f"({_fmt(s.get('base_score_own_expert'), 100)}) / "
                f"{_fmt(s.get('score_no_own_expert'), 100)}" if "own_expert_active" in s else "–",
                f"{_fmt(s.get('tokens_own_expert'))} ({_fmt(s.get('base_tokens_own_expert'))})"
                if "tokens_own_expert" in s else "–",
                _fmt(s.get("locality_expert_active"), 100), vs(s, "base"), vs(s, "rag"),
                "–" if ratio is None else f"{ratio:.2f}"]) + " |")
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
            + "\n\n## Table 3 — diagnostics (%: share of quality samples with any expert / their "
            "own expert active, headline score over each group (base's on the own-expert group in "
            "brackets), mean generated tokens on the own-expert group (base's), share of locality "
            "samples with an expert active; paired against base and rag on the headline metric: "
            "samples better / worse, two-sided exact sign-test p; median per-sample latency ratio "
            "to base)\n\n"
            + diagnostics_table(summary)
            + "\n\n## Samples per cell\n\n" + counts_table(summary) + "\n")
    path.write_text(text, encoding="utf-8")


def spread_labels(boxes: Sequence[tuple[float, float, float, float]],
                  gap: float = 0.0) -> list[float]:
    """How far up to move each label box ``(x0, y0, x1, y1)`` so that no two overlap.

    Boxes are placed from the lowest up; a box that overlaps one already placed (both in x and
    in y) moves to sit ``gap`` above it, until it overlaps none. Returns the upward shift of each
    box, in the boxes' units (0 for a box that stays).
    """
    placed: list[tuple[float, float, float, float]] = []
    shifts = [0.0] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0])):
        x0, y0, x1, y1 = boxes[i]
        y, moved = y0, True
        while moved:
            moved = False
            for px0, py0, px1, py1 in placed:
                if x0 < px1 and px0 < x1 and y < py1 + gap and py0 < y + (y1 - y0) + gap:
                    y, moved = py1 + gap, True
        placed.append((x0, y, x1, y + (y1 - y0)))
        shifts[i] = y - y0
    return shifts


def plot_quality_vs_latency(summary: dict[str, Any], path: Path) -> bool:
    """One panel per dataset: headline quality vs mean latency per method. False without matplotlib.

    Methods that land close together keep legible labels: each label that would overlap another
    moves up (``spread_labels``, measured in rendered pixels) with a thin line to its point.
    """
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
    panels = []
    for ax, (d, methods) in zip(axes[0], ds.items(), strict=True):
        key = "efficacy" if d == KC else "acc" if "acc" in next(iter(methods.values())) else "f1"
        points = []
        for m, s in methods.items():
            if s.get(key) is None or s.get("latency_s_mean") is None:
                continue
            color = f"C{METHOD_NAMES.index(m) % 10}" if m in METHOD_NAMES else "k"
            xy = (s["latency_s_mean"], 100 * s[key])
            ax.scatter(*xy, s=36, color=color)
            points.append((m, xy))
        ax.set_title(d)
        ax.set_xlabel("latency (s / question)")
        ax.set_ylabel(f"{key.upper()} (%)")
        ax.set_ylim(bottom=0, top=1.25 * max([xy[1] for _, xy in points] + [1.0]))
        ax.grid(alpha=0.3)
        panels.append((ax, points))
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    pt_per_px = 72 / fig.dpi
    leader = {"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 3}

    def label(ax: Any, m: str, xy: tuple[float, float], r: bool, up: float = 0.0,
              **kw: Any) -> Any:
        return ax.annotate(m, xy, fontsize=8, xytext=(-3 if r else 3, 3 + up),
                           textcoords="offset points", ha="right" if r else "left", **kw)

    for ax, points in panels:
        # labels of points in the right quarter of a panel go to their left, inside the figure
        right = [ax.transLimits.transform(xy)[0] > 0.75 for _, xy in points]
        texts = [label(ax, m, xy, r) for (m, xy), r in zip(points, right, strict=True)]
        boxes = [tuple(t.get_window_extent(renderer).bounds) for t in texts]
        shifts = spread_labels([(x, y, x + w, y + h) for x, y, w, h in boxes], gap=1.0)
        for t, (m, xy), r, shift in zip(texts, points, right, shifts, strict=True):
            if shift > 0:  # an annotation gets its leader line only when made, so make it again
                t.remove()
                label(ax, m, xy, r, shift * pt_per_px, annotation_clip=False,
                      arrowprops=leader)
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
