"""Route replay: which expert dmoe's router admits first, measured without training any expert.

Until its first expert is admitted, dmoe decodes exactly what the base model decodes (no expert
active = the base model), and its triggers fire where the base model's entropy crosses tau. So
*whether* a question admits an expert, and *which* it admits first, is decided by the router on
the base model's own text. ``replay`` decodes each question once through dmoe's real engine,
trigger and router with an expert loader that loads nothing (every token is the base model's) and
records each route's top hit ungated; ``first_admitted`` then says, for any gate policy, which
expert a real run would admit first (None: it decodes as the base model throughout). A test holds
this equal to real runs with real experts; ``scripts/replay_routes.py`` uses it to choose the
relevance gate on a dev slice (``results/dev/README.md`` section 7).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dmoe.baselines.generate import Job, PromptRunner, decode_config
from dmoe.baselines.protocol import MethodConfig
from dmoe.engine.triggers import make_trigger
from dmoe.experts.lora import ExpertAdapter
from dmoe.routing.base import RouteHit, Router


def replay_runner(model: Any, tokenizer: Any, adapter: ExpertAdapter, router: Router,
                  config: MethodConfig) -> PromptRunner:
    """dmoe's engine and trigger with a loader that loads nothing: it decodes as the base model."""
    return PromptRunner(model, tokenizer, adapter, load_experts=lambda ids: [], router=router,
                        trigger=make_trigger(config.trigger, config.tau, config.trigger_rate,
                                             config.seed))


GATES = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


class RecordingRouter:
    """A router that remembers every (query, top hit) it answered, in call order."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.calls: list[tuple[str, RouteHit | None]] = []

    def route(self, query: str, k: int) -> list[RouteHit]:
        hits = self.inner.route(query, k)
        self.calls.append((query, hits[0] if hits else None))
        return hits


def replay(runner: PromptRunner, router: Router, questions: Sequence[str],
           config: MethodConfig, batch_size: int = 8, progress: bool = True
           ) -> list[dict[str, Any]]:
    """Per question: the base answer and every route's top hit (step order; the first is the
    route at start)."""
    cfg = dataclasses.replace(decode_config(config), top_k=1, min_relevance=0.0, min_score=0.0)
    out = []
    bar = tqdm(total=len(questions), desc="replay", unit="q", disable=not progress)
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


def check(records_dir: str | Path, efficacy: list[dict[str, Any]], unrelated: list[dict[str, Any]],
          gate: float) -> dict[str, Any]:
    """The replay against a ``dmoe eval`` run of the same questions at the shipped settings: a
    question admits an expert in the replay iff its record has an active expert; its first expert
    in the record is the replay's first admission."""
    from dmoe.eval.runner import latest_records, results_path

    recs = {r["id"]: r for r in latest_records(results_path(Path(records_dir), "knowledge_conflicts",
                                                            "dmoe"))}
    rows = [(r, recs[r["id"]]) for r in efficacy + unrelated if r["id"] in recs]
    firsts = [(first_admitted(r["routes"], gate, gate),
               (rec["active_experts"] or [None])[0]) for r, rec in rows]
    return {"n": len(rows), "admitted_agree": sum((a is None) == (b is None) for a, b in firsts),
            "first_expert_agree": sum(a == b for a, b in firsts)}
