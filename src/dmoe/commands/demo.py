"""``dmoe demo``: the main job on the bundled corpus — build a bank, answer with and without it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmoe.commands.common import add_model_args

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build a bank from the bundled corpus and answer with/without experts",
        description="Builds an expert bank from examples/demo_corpus.jsonl (invented facts no model "
                    "can know), then answers examples/demo_questions.jsonl with the base model "
                    "and with DMoE experts, showing which experts were active for which tokens. "
                    "A second run reuses the bank.\n\nexample:\n  dmoe demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(EXAMPLES / "demo_corpus.jsonl"))
    p.add_argument("--questions", default=str(EXAMPLES / "demo_questions.jsonl"))
    p.add_argument("--bank", default="runs/demo-bank", help="bank directory (default runs/demo-bank)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: n, gold_contained_base, gold_contained_experts, "
                        "answers_with_loops, and every answer")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build with the shipped defaults (``BuildConfig``, ``TrainConfig``), answer with the shipped
    decoding defaults (``MethodConfig``: trigger, tau, experts per route, gate, composition)."""
    import dataclasses
    import sys

    import torch

    from dmoe.base_model import (
        load_base_model,
        pack_weights,
        pick_device,
        resolve_weights,
        training_weights,
    )
    from dmoe.baselines.generate import decode_config
    from dmoe.baselines.protocol import MethodConfig
    from dmoe.commands.ask import describe_spans
    from dmoe.engine.triggers import make_trigger
    from dmoe.eval.metrics import has_loop
    from dmoe.knowledge import KnowledgeBase
    from dmoe.prompts import encode_prompt
    from dmoe.training.build import BuildConfig, build
    from dmoe.training.experts import TrainConfig

    out = sys.stderr if args.json else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    device = pick_device(args.device)
    answer_weights = resolve_weights(args.weights, device)  # trains on float, may answer packed
    lm = load_base_model(args.model, args.device, training_weights(args.weights, device),
                         training=True)
    say(f"== 1) building the expert bank {args.bank} from {args.corpus}")
    summary = build(args.corpus, args.bank, lm, BuildConfig(), TrainConfig(), log=say,
                    progress=not args.json)
    say(f"   {summary.bank_size} experts ({summary.experts_trained} trained now, "
        f"{summary.experts_reused} reused), {summary.bytes_per_expert / 1024:.0f} KiB each")

    if answer_weights != lm.weights:
        pack_weights(lm, answer_weights)
    method = MethodConfig(max_new_tokens=args.max_new_tokens)
    cfg = dataclasses.replace(decode_config(method), top_k=method.dmoe_top_k or method.top_k)
    kb = KnowledgeBase.open(args.bank, lm.fingerprint, readonly=True)
    engine = kb.engine(lm, make_trigger(method.trigger, method.tau, method.trigger_rate,
                                        method.seed))
    rows = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line]
    say(f"\n== 2) answering {len(rows)} questions without and with experts (tau={method.tau}, "
        f"experts per route={cfg.top_k}, route at start={cfg.route_at_start}, "
        f"min relevance={cfg.min_relevance}, composition={cfg.composition})")
    answers = []
    for row in rows:
        ids = torch.tensor([encode_prompt(lm.tokenizer, row["question"])])
        base = engine.generate(ids, row["question"], cfg, routing=False)  # the plain base model
        gen = engine.generate(ids, row["question"], cfg)
        ok = {k: any(a.lower() in g.text.lower() for a in row["answers"])
              for k, g in (("base", base), ("dmoe", gen))}
        answers.append({"question": row["question"], "gold": row["answers"], "base": base.text,
                        "experts": gen.text, "base_ok": ok["base"], "experts_ok": ok["dmoe"],
                        "active": sorted({e for r in gen.records for e in r.active})})
        say(f"\nQ: {row['question']}   (gold: {row['answers'][0]})")
        say(f"  base model : {base.text.strip()!r}{'  ✓' if ok['base'] else ''}")
        say(f"  with experts: {gen.text.strip()!r}{'  ✓' if ok['dmoe'] else ''}")
        for line in describe_spans(gen, lm.tokenizer, kb):
            say("  " + line)
    kb.close()
    result = {"n": len(answers),
              "gold_contained_base": sum(a["base_ok"] for a in answers),
              "gold_contained_experts": sum(a["experts_ok"] for a in answers),
              "answers_with_loops": sum(has_loop(a["experts"]) for a in answers),
              "answers": answers}
    say(f"\n== gold answer contained: base model {result['gold_contained_base']}/{len(answers)}, "
        f"with experts {result['gold_contained_experts']}/{len(answers)}; answers with loops: "
        f"{result['answers_with_loops']}")
    if args.json:
        print(json.dumps(result))
    return 0
