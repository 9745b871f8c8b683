r"""How often does an expert make the model state its passage's fact when it is surely active?

The oracle-routed injection probe (experiment script, dev slices only). It takes ``--n``
counterfactual questions of ``knowledge_conflicts`` from ``--offset``. Each passage is augmented
(extractive) and trained into one expert per training variant. Every question is then answered with
its own expert active from the first token (``OracleRouter``, route at start, no gate). Routing is
taken out, so the variants compare what the training puts into an expert. ``dmoe bench injection``
measures the same thing with the real router, trigger and gate.

A variant is ``recipe[,key=value...]``. Keys:
- ``lr``, ``epochs``, ``rank``, ``alpha``, ``obj`` (ntp | distill): training;
- ``cont=1``: add a chat-frame continuation example ("Continue the passage: <first half>" ->
  second half);
- ``nrn=A/B/...``: answer once per ``no_repeat_ngram`` value with the same experts.

Printed per (variant, nrn): efficacy (the eval's answer contains the substituted entity), loops
(a 3-gram 3+ times), training seconds. ``--out DIR`` keeps every answer.

    PYTHONPATH=src python scripts/probe_oracle.py --offset 500 --n 40 \
        "recite_qa" "recite_qa,epochs=5,nrn=0/3/4" "recite_qa,obj=distill"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dmoe.augment import make_augmenter, training_examples
from dmoe.augment.types import TrainingExample
from dmoe.base_model import load_base_model
from dmoe.baselines.parametric import DmoeMethod
from dmoe.bench.injection import InjectionSetting, contains
from dmoe.eval.datasets import load_task
from dmoe.eval.metrics import has_loop
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.prompts import format_chat
from dmoe.routing.simple import OracleRouter
from dmoe.training.experts import TrainConfig, train_fast


def continuation_example(text: str, tokenizer: object) -> TrainingExample:
    words = text.split()
    half = len(words) // 2
    prompt = format_chat(tokenizer, [{"role": "user", "content": "Continue the passage: "
                                      + " ".join(words[:half])}])
    return TrainingExample(prompt=prompt, target=" ".join(words[half:]))


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    recipe, *pairs = text.split(",")
    return recipe, dict(p.split("=", 1) for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("variants", nargs="+", help="recipe[,key=value...] (see above)")
    ap.add_argument("--offset", type=int, default=500, help="first item (default 500: dev)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write every answer here, one JSON per row")
    args = ap.parse_args()

    lm = load_base_model(None, training=True)
    tok = lm.tokenizer
    task = load_task("knowledge_conflicts", offset=args.offset, limit=args.n, n_locality=0)
    units, samples = task.corpus, task.samples
    augs = make_augmenter("extractive").augment(units)
    adapter = ExpertAdapter(lm.model, LoraSpec())
    rows = []
    for variant in args.variants:
        recipe, opts = parse_variant(variant)
        t0 = time.perf_counter()
        jobs = []
        for u, a in zip(units, augs, strict=True):
            examples = training_examples(u, a, tok, recipe=recipe)  # type: ignore[arg-type]
            if opts.get("cont") == "1":
                examples.append(continuation_example(u.text, tok))
            jobs.append((u.id, examples))
        config = TrainConfig(spec=LoraSpec(rank=int(opts.get("rank", 4)),
                                           alpha=float(opts.get("alpha", 16))),
                             lr=float(opts.get("lr", TrainConfig.lr)),
                             epochs=int(opts.get("epochs", TrainConfig.epochs)),
                             objective=opts.get("obj", "ntp"))
        torch.manual_seed(0)
        bank = {e.id: e for e in train_fast(lm.model, tok, jobs, config)}
        train_s = time.perf_counter() - t0
        for nrn in opts.get("nrn", "0").split("/"):
            router = OracleRouter()
            # the bench's decoding (shipped defaults), no gate: the oracle's hits carry no relevance
            cfg = InjectionSetting(min_relevance=0.0, no_repeat_ngram=int(nrn)).method_config(
                args.max_new_tokens)
            method = DmoeMethod(lm.model, tok, adapter, lambda ids, b=bank: [b[i] for i in ids],
                                router, cfg)
            answers = []
            for s in samples:
                router.set_gold(s.gold_unit_ids)
                answers.append(method.answer(s).text)
            method.close()
            hits = [contains(t, s.answers) for t, s in zip(answers, samples, strict=True)]
            row = {"variant": variant, "no_repeat_ngram": int(nrn), "n": len(samples),
                   "efficacy": round(sum(hits) / len(samples), 4),
                   "loops": round(sum(map(has_loop, answers)) / len(samples), 4),
                   "train_s": round(train_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                name = f"{variant.replace(',', '_').replace('/', '-')}_nrn{nrn}.json"
                (args.out / name).write_text(json.dumps(
                    [{"q": s.question, "gold": s.answers[0], "hit": h, "answer": t}
                     for s, h, t in zip(samples, hits, answers, strict=True)], indent=1))


if __name__ == "__main__":
    main()
