"""Calibrate the router's relevance gate (``route_min_score``) on data, without a language model.

Reads top to bottom: index the eval bank's routing surrogates (title + text + extractive paraphrase
+ cloze QA, exactly as ``scripts/build_eval_bank.py`` builds them) of a knowledge_conflicts DEV
slice, disjoint from the eval slice (eval: efficacy 0..300, locality = the file's last 100), then
score two groups of questions against it:

- efficacy: the dev slice's own questions (their passage is in the index);
- unrelated: questions from the middle of the file (their passages are not).

For each score feature (raw BM25 top-1 ``abs``; ``norm`` = top-1 / the query's maximum attainable
score Σ_t n_t·idf_t·(k1+1), i.e. ``RouteHit.relevance``; ``per_term`` = top-1 / analysed query terms) it prints quantiles of both
groups and, per candidate threshold, the share of efficacy questions kept (gold passage top-1 and
above the threshold) and the share of unrelated questions gated out (top-1 below it). The same is
repeated for queries that carry an answer-like continuation (question + the original answer, a
stand-in for generated text), and the chosen threshold is checked on HotpotQA and SQuAD corpora.

    PYTHONPATH=src python scripts/calibrate_router.py > calibration.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from dmoe.augment.extractive import ExtractiveAugmenter
from dmoe.corpus.units import KnowledgeUnit
from dmoe.eval.datasets import Sample, load_task
from dmoe.routing.bm25 import BM25Index, analyze

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
THRESHOLDS = {
    "abs": (0.0, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0, 25.0, 30.0),
    "norm": (0.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6),
    "per_term": (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0),
}


def surrogates(units: Sequence[KnowledgeUnit]) -> dict[str, str]:
    """``{unit id: routing surrogate}`` as the eval bank stores it."""
    augs = ExtractiveAugmenter().augment(units)
    return {u.id: "\n".join([u.title, u.text, a.paraphrase]
                            + [f"{qa.question} {qa.answer}" for qa in a.qa])
            for u, a in zip(units, augs, strict=True)}


def build_index(units: Sequence[KnowledgeUnit]) -> BM25Index:
    index = BM25Index.in_memory()
    index.add_many(surrogates(units).items())
    return index


def features(index: BM25Index, query: str, k: int = 3) -> dict[str, object]:
    hits = index.search(query, k)
    top = hits[0].score if hits else 0.0
    n_terms = len(analyze(query))
    return {"ids": [h.expert_id for h in hits], "abs": top,
            "norm": hits[0].relevance or 0.0 if hits else 0.0,
            "per_term": top / n_terms if n_terms else 0.0}


def quantiles(values: list[float]) -> dict[str, float]:
    xs = sorted(values)
    if not xs:
        return {}
    return {f"q{int(q * 100):02d}": round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)
            for q in QUANTILES} | {"mean": round(sum(xs) / len(xs), 3)}


def sweep(eff: list[dict[str, object]], gold: list[str], unrel: list[dict[str, object]],
          feature: str) -> list[dict[str, float]]:
    rows = []
    for t in THRESHOLDS[feature]:
        kept = sum(1 for f, g in zip(eff, gold, strict=True)
                   if f["ids"] and f["ids"][0] == g and float(f[feature]) >= t)  # type: ignore[index, arg-type]
        passed_eff = sum(1 for f in eff if float(f[feature]) >= t)  # type: ignore[arg-type]
        gated = sum(1 for f in unrel if float(f[feature]) < t)  # type: ignore[arg-type]
        rows.append({"threshold": t, "efficacy_gold_top1_kept": round(kept / len(eff), 3),
                     "efficacy_any_passes": round(passed_eff / len(eff), 3),
                     "unrelated_gated_out": round(gated / len(unrel), 3)})
    return rows


def report(index: BM25Index, eff: list[Sample], unrel: list[Sample],
           query_of: Callable[[Sample], str]) -> dict[str, object]:
    fe = [features(index, query_of(s)) for s in eff]
    fu = [features(index, query_of(s)) for s in unrel]
    gold = [s.gold_unit_ids[0] for s in eff]
    top1 = sum(1 for f, g in zip(fe, gold, strict=True) if f["ids"] and f["ids"][0] == g)  # type: ignore[index]
    out: dict[str, object] = {"efficacy_gold_top1": round(top1 / len(fe), 3)}
    for feat in THRESHOLDS:
        out[feat] = {
            "efficacy_quantiles": quantiles([float(f[feat]) for f in fe]),  # type: ignore[arg-type]
            "unrelated_quantiles": quantiles([float(f[feat]) for f in fu]),  # type: ignore[arg-type]
            "sweep": sweep(fe, gold, fu, feat),
        }
    return out


def transfer(name: str, limit: int, thresholds: dict[str, float]) -> dict[str, object]:
    """On another benchmark: share of questions whose top-1 passes and the gold passage's rank."""
    task = load_task(name, limit=limit)
    index = build_index(task.corpus)
    ranks, passes = [], {f: 0 for f in thresholds}
    hit_passes = {f: 0 for f in thresholds}  # of all top-3 hits, share passing the gate
    n_hits = 0
    for s in task.samples:
        f = features(index, s.question, k=3)
        ids: list[str] = f["ids"]  # type: ignore[assignment]
        ranks.append(min((ids.index(g) + 1 for g in s.gold_unit_ids if g in ids), default=0))
        n_terms = len(analyze(s.question))
        for h in index.search(s.question, 3):
            n_hits += 1
            value = {"abs": h.score, "norm": h.relevance or 0.0,
                     "per_term": h.score / n_terms if n_terms else 0.0}
            for feat, t in thresholds.items():
                hit_passes[feat] += value[feat] >= t
        for feat, t in thresholds.items():
            passes[feat] += float(f[feat]) >= t  # type: ignore[arg-type]
    n = len(task.samples)
    return {"n_questions": n, "n_corpus": len(task.corpus),
            "gold_rank_share": {str(r): round(ranks.count(r) / n, 3) for r in (1, 2, 3)}
            | {"not_in_top3": round(ranks.count(0) / n, 3)},
            "top1_passes": {f: round(passes[f] / n, 3) for f in thresholds},
            "top3_hits_pass": {f: round(hit_passes[f] / max(1, n_hits), 3) for f in thresholds}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dev-offset", type=int, default=300)
    ap.add_argument("--dev-limit", type=int, default=300)
    ap.add_argument("--unrelated-offset", type=int, default=8000)
    ap.add_argument("--unrelated-limit", type=int, default=300)
    ap.add_argument("--transfer-limit", type=int, default=300)
    ap.add_argument("--abs", type=float, default=10.0, help="chosen absolute threshold to transfer")
    ap.add_argument("--norm", type=float, default=0.4, help="chosen normalised threshold to transfer")
    ap.add_argument("--per-term", type=float, default=2.0)
    args = ap.parse_args()

    dev = load_task("knowledge_conflicts", offset=args.dev_offset, limit=args.dev_limit, n_locality=0)
    far = load_task("knowledge_conflicts", offset=args.unrelated_offset, limit=args.unrelated_limit,
                    n_locality=0)
    assert args.unrelated_offset >= args.dev_offset + args.dev_limit, "unrelated overlaps the dev"
    index = build_index(dev.corpus)
    eff = [s for s in dev.samples if s.meta["split"] == "efficacy"]
    unrel = far.samples
    passages = {u.id: u.text for u in dev.corpus + far.corpus}
    for s in eff + unrel:  # a long "generated text" stand-in: the start of the sample's own passage
        s.meta["passage"] = passages[s.id]
    chosen = {"abs": args.abs, "norm": args.norm, "per_term": args.per_term}
    out = {
        "dev": {"efficacy": f"kc {args.dev_offset}..{args.dev_offset + args.dev_limit}",
                "unrelated": f"kc {args.unrelated_offset}.."
                             f"{args.unrelated_offset + args.unrelated_limit}",
                "n_index": len(index)},
        "question_only": report(index, eff, unrel, lambda s: s.question),
        "question_plus_original_answer": report(
            index, eff, unrel, lambda s: f"{s.question} {' '.join(s.meta['original'][:1])}"),
        "question_plus_40_passage_words": report(
            index, eff, unrel, lambda s: f"{s.question} {' '.join(s.meta['passage'].split()[:40])}"),
        "chosen": chosen,
        "recommended": {"route_min_relevance": args.norm, "why": (
            "raw BM25 scores of unrelated queries grow with query length (generated text), so an "
            "absolute min_score that gates short questions lets long queries through; relevance "
            "(score / query max) falls with length for unrelated queries and keeps the gold")},
        "transfer": {name: transfer(name, args.transfer_limit, chosen)
                     for name in ("hotpotqa", "squad")},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
