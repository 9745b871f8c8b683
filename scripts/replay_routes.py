"""Route replay on a knowledge_conflicts slice: which expert dmoe's router admits first under each
relevance-gate policy, without training any expert (the method: ``dmoe.eval.replay``).

Reads top to bottom: index the routing surrogates of a bank's passages (as
``scripts/build_eval_bank.py`` stores them), decode the passages' own questions and as many
unrelated ones (their passages not indexed) once each, recording every route, then score:

- ``unrelated admitted``: the share of unrelated questions that admit an expert. It bounds what
  locality loses (an admitted expert nearly always changes the answer).
- ``own expert first``: the share of the passages' questions whose first admitted expert is their
  own (what the gate lets through; the expert then states the fact or not); ``other expert
  first``: another passage's.

Policies: one relevance gate for routes whose query is the question alone (the route at start, a
trigger before any token) and one for routes whose query carries generated text; the shipped
engine uses one gate for both, and a text gate of inf routes on the question only. The default
slice is a DEV slice, disjoint from the evaluated questions (0-299 and the file's last 300), of
the evaluated bank's size; unrelated questions come from the file's middle.

    PYTHONPATH=src python scripts/replay_routes.py --offset 300 --limit 300 \
        --unrelated-offset 8000 --n-unrelated 300 --out replay.json          # the dev table
    PYTHONPATH=src python scripts/replay_routes.py --offset 0 --limit 300 --unrelated-offset end \
        --check results/smollm2-cpu --out check.json    # the replay against a real run's records

``--check`` tests the replay, it tunes nothing: it prints only the agreement at the shipped
settings with an eval run of the same questions.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dmoe.base_model import load_base_model
from dmoe.baselines.protocol import MethodConfig
from dmoe.eval.datasets import load_task
from dmoe.eval.replay import check, replay, replay_runner, score
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.routing.bm25 import BM25Index, BM25Router
from dmoe.training.task_bank import expert_jobs


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
    runner = replay_runner(lm.model, lm.tokenizer, ExpertAdapter(lm.model, LoraSpec()), router,
                           config)
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
