"""Route replay: which expert dmoe's router admits first, measured without training any expert.

Until its first expert is admitted, dmoe decodes exactly what the base model decodes (no expert
active = the base model), and its triggers fire where the base model's entropy crosses tau. So
*whether* a question admits an expert, and *which* it admits first, is decided by the router on
the base model's own text. This script decodes every question once through dmoe's real engine,
trigger and BM25 router over a bank-sized corpus's routing surrogates, with an expert loader that
loads nothing (every token is the base model's), records each route's top hit ungated, and then
scores routing policies offline, exactly:

- ``unrelated``: questions whose passage is not indexed. The share that admits an expert is what
  locality loses at most (an admitted expert nearly always changes the answer).
- ``efficacy``: the indexed passages' own questions. The share whose first admitted expert is
  their own (what a policy can deliver; the expert then states the fact or not), and the share
  whose first admission is another passage's expert.

Policies: one relevance gate for routes whose query is the question alone (the route at start, a
trigger before any token) and one for routes whose query carries generated text; the shipped
engine uses one gate for both, and a text gate of inf routes on the question only. The corpus
is a knowledge_conflicts DEV slice, disjoint from the evaluated questions (0-299 and the file's
last 300), of the evaluated bank's size; unrelated questions come from the file's middle.

    PYTHONPATH=src python scripts/replay_routes.py --offset 300 --limit 300 \
        --unrelated-offset 8000 --n-unrelated 300 --out replay.json          # the dev table
    PYTHONPATH=src python scripts/replay_routes.py --offset 0 --limit 300 --unrelated-offset end \
        --check results/smollm2-cpu --out check.json    # the replay against a real run's records

``--check`` tests the replay, it tunes nothing: it prints only the agreement at the shipped
settings with an eval run of the same questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from dmoe.base_model import load_base_model
from dmoe.baselines.generate import Job, PromptRunner, decode_config
from dmoe.baselines.protocol import MethodConfig
from dmoe.engine.triggers import make_trigger
from dmoe.eval.datasets import load_task
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.routing.base import RouteHit
from dmoe.routing.bm25 import BM25Index, BM25Router
from dmoe.training.task_bank import expert_jobs

GATES = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


class RecordingRouter:
    """A router that remembers every (query, top hit) it answered, in call order."""

    def __init__(self, inner: BM25Router) -> None:
        self.inner = inner
        self.calls: list[tuple[str, RouteHit | None]] = []

    def route(self, query: str, k: int) -> list[RouteHit]:
        hits = self.inner.route(query, k)
        self.calls.append((query, hits[0] if hits else None))
        return hits


def replay(runner: PromptRunner, router: BM25Router, questions: Sequence[str],
           config: MethodConfig, batch_size: int) -> list[dict[str, Any]]:
    """Per question: the base answer and every route's top hit (step order; the first is the
    route at start)."""
    cfg = dataclasses.replace(decode_config(config), top_k=1, min_relevance=0.0, min_score=0.0)
    out = []
    bar = tqdm(total=len(questions), desc="replay", unit="q")
    for lo in range(0, len(questions), batch_size):
        chunk = questions[lo:lo + batch_size]
        recorders = [RecordingRouter(router) for _ in chunk]
        gens = runner.run_batch([Job(q, (), cfg, router=r) for q, r in zip(chunk, recorders,
                                                                           strict=True)])
        for q, rec, gen in zip(chunk, recorders, gens, strict=True):
            out.append({"question": q, "answer": gen.text, "routes": [
                {"expert": h.expert_id if h else None, "relevance": (h.relevance or 0.0) if h else 0.0,
                 "with_text": query != q.strip()} for query, h in rec.calls]})
        bar.update(len(chunk))
    bar.close()
    return out


def first_admitted(routes: Sequence[dict[str, Any]], question_gate: float,
                   text_gate: float) -> str | None:
    """The expert a policy admits first (None: the question decodes as the base model). A route
    whose query is the question alone (at start, or a trigger before any token) passes at
    ``question_gate``, one whose query carries generated text at ``text_gate`` (inf: never, i.e.
    routing on the question only)."""
    for r in routes:
        gate = text_gate if r["with_text"] else question_gate
        if r["expert"] is not None and r["relevance"] >= gate:
            return str(r["expert"])
    return None


def score(efficacy: list[dict[str, Any]], unrelated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (question gate, text gate) policy: own / other expert first, unrelated admitted."""
    rows = []
    for question_gate in GATES:
        for text_gate in [g for g in GATES if g >= question_gate] + [math.inf]:
            firsts = [first_admitted(r["routes"], question_gate, text_gate) for r in efficacy]
            rows.append({
                "question_gate": question_gate, "text_gate": text_gate,
                "own_first": sum(f == r["id"] for f, r in zip(firsts, efficacy, strict=True))
                / len(efficacy),
                "other_first": sum(f not in (None, r["id"]) for f, r in
                                   zip(firsts, efficacy, strict=True)) / len(efficacy),
                "unrelated_admitted": sum(first_admitted(r["routes"], question_gate, text_gate)
                                          is not None for r in unrelated) / len(unrelated)})
    return rows


def check(records_dir: str, efficacy: list[dict[str, Any]], unrelated: list[dict[str, Any]],
          gate: float) -> dict[str, Any]:
    """The replay against a ``dmoe eval`` run of the same questions at the shipped settings: a
    question admits an expert in the replay iff its record has an active expert; its first expert
    in the record is the replay's first admission."""
    from dmoe.eval.runner import latest_records, results_path

    recs = {r["id"]: r for r in latest_records(results_path(records_dir, "knowledge_conflicts",
                                                            "dmoe"))}
    rows = [(r, recs[r["id"]]) for r in efficacy + unrelated if r["id"] in recs]
    firsts = [(first_admitted(r["routes"], gate, gate),
               (rec["active_experts"] or [None])[0]) for r, rec in rows]
    return {"n": len(rows), "admitted_agree": sum((a is None) == (b is None) for a, b in firsts),
            "first_expert_agree": sum(a == b for a, b in firsts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--offset", type=int, default=300, help="first indexed passage / question")
    ap.add_argument("--limit", type=int, default=300, help="indexed passages (their questions)")
    ap.add_argument("--unrelated-offset", default="8000",
                    help="first unrelated question (its passage is not indexed), or 'end': the "
                         "file's last --limit questions, the eval's locality set")
    ap.add_argument("--n-unrelated", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default=None, metavar="SPEC")
    ap.add_argument("--check", metavar="DIR",
                    help="instead of the policy table: agreement with DIR's dmoe records of the "
                         "same questions at the shipped settings (a test of the replay itself)")
    ap.add_argument("--out", required=True, help="JSON: per-question routes and the results")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_base_model(args.model, "auto", "auto")
    config = MethodConfig()
    if args.unrelated_offset == "end":
        task = load_task("knowledge_conflicts", offset=args.offset, limit=args.limit)
        far = [s for s in task.samples if s.meta.get("split") == "locality"]
    else:
        task = load_task("knowledge_conflicts", offset=args.offset, limit=args.limit, n_locality=0)
        far_task = load_task("knowledge_conflicts", offset=int(args.unrelated_offset),
                             limit=args.n_unrelated, n_locality=0)
        if {u.id for u in far_task.corpus} & {u.id for u in task.corpus}:
            raise SystemExit("the unrelated questions' passages overlap the indexed ones")
        far = far_task.samples
    own = [s for s in task.samples if s.meta.get("split") == "efficacy"]
    index = BM25Index.in_memory()
    index.add_many((job.expert_id, job.surrogate) for job in expert_jobs(lm, task.corpus))
    router = BM25Router(index)
    runner = PromptRunner(lm.model, lm.tokenizer, ExpertAdapter(lm.model, LoraSpec()),
                          load_experts=lambda ids: [], router=router,
                          trigger=make_trigger(config.trigger, config.tau, config.trigger_rate,
                                               config.seed))
    efficacy, unrelated = ([{"id": s.id, **r} for s, r in zip(group, replay(
        runner, router, [s.question for s in group], config, args.batch_size), strict=True)]
        for group in (own, far))
    result: dict[str, Any] = {"settings": {**vars(args), "tau": config.tau,
                                           "gate": config.route_min_relevance}}
    if args.check:
        result["check"] = check(args.check, efficacy, unrelated, config.route_min_relevance)
        print(json.dumps(result["check"]))
    else:
        result["policies"] = score(efficacy, unrelated)
        print("| gate, question alone | gate, question + text | own expert first | "
              "other expert first | unrelated admitted |")
        print("|---|---|---|---|---|")
        for r in result["policies"]:
            print(f"| {r['question_gate']} | {r['text_gate']} | {100 * r['own_first']:.1f} | "
                  f"{100 * r['other_first']:.1f} | {100 * r['unrelated_admitted']:.1f} |")
    result["settings"]["seconds"] = time.perf_counter() - t0
    result["efficacy"], result["unrelated"] = efficacy, unrelated
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)

if __name__ == "__main__":
    main()
