"""Probe: does one expert trained on a counterfactual passage make the model say the new fact?

For N NQ questions from ``knowledge_conflicts`` (the passage's answer entity swapped for another),
train one expert per passage on the passage text alone (LM loss, no question), then answer the
question greedily with that expert active and count answers that contain the substituted entity.
Baselines: the base model (no passage) and the passage in the prompt (RAG). Used to pick
``TrainConfig`` defaults (lr, epochs)::

    python -m dmoe.bench.injection --n 20 --grid 1e-5:1,1e-3:10,5e-3:10 --json

Measured (packaged SmolLM2-135M, CPU, 16 new tokens): ``--n 10 --grid 1e-5:1,5e-3:10,2e-2:5`` ->
0/10 injected for every setting; base 0/10, RAG 4/10 (the first 20: base 0/20, RAG 7/20);
``--grid 1e-2:20`` -> 1/10 (plus "alino Sánchez" for "Chalino Sánchez"), with visibly degraded
fluency. Weaker experts shift the answers toward the passage's wording without stating the fact.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from dmoe.augment.types import TrainingExample
from dmoe.base_model import load_base_model
from dmoe.experts.lora import ExpertAdapter, LoraSpec
from dmoe.prompts import format_prompt
from dmoe.training.experts import TrainConfig, train_fast

DATA_FILE = "knowledge_conflicts/nq_conflicts_bigbench.json"  # under dmoe.eval.datasets.data_dir()


def load_conflicts(n: int, path: Path | None = None, max_words: int = 150) -> list[dict[str, str]]:
    """First ``n`` examples with a passage of at most ``max_words`` words."""
    from dmoe.eval.datasets import data_dir

    path = path or data_dir() / DATA_FILE
    out = []
    for ex in json.loads(path.read_text())["examples"]:
        m = re.match(r"\s*Question:\s*(.*?)\s*\nContext:\s*(.*)", ex["input"], re.S)
        if m and len(m.group(2).split()) <= max_words:
            out.append({"question": m.group(1), "passage": m.group(2), "answer": ex["target"]})
        if len(out) == n:
            break
    return out


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def hit(text: str, gold: str) -> bool:
    return gold.lower() in text.lower()


def run(n: int, grid: list[tuple[float, int]], baselines: bool = True) -> dict[str, Any]:
    lm = load_base_model()
    model, tok = lm.model, lm.tokenizer
    items = load_conflicts(n)
    base = [answer(model, tok, format_prompt(tok, it["question"])) for it in items] if baselines else []
    rag = ([answer(model, tok, format_prompt(tok, it["question"], [it["passage"]])) for it in items]
           if baselines else [])
    print(f"base {sum(map(hit, base, [i['answer'] for i in items]))}/{len(items)}, "
          f"rag {sum(map(hit, rag, [i['answer'] for i in items]))}/{len(items)}", flush=True)
    result: dict[str, Any] = {
        "n": len(items), "base_hits": sum(map(hit, base, [i["answer"] for i in items])),
        "rag_hits": sum(map(hit, rag, [i["answer"] for i in items])), "grid": []}
    spec = LoraSpec()
    for lr, epochs in grid:
        config = TrainConfig(spec=spec, lr=lr, epochs=epochs, loss_on="all")
        jobs = [(f"q{i}", [TrainingExample("", it["passage"])]) for i, it in enumerate(items)]
        t0 = time.perf_counter()
        experts = train_fast(model, tok, jobs, config)
        train_s = time.perf_counter() - t0
        adapter = ExpertAdapter(model, spec)
        answers = []
        for it, expert in zip(items, experts, strict=True):
            adapter.activate([expert])
            answers.append(answer(model, tok, format_prompt(tok, it["question"])))
        adapter.detach()
        hits = [hit(a, it["answer"]) for a, it in zip(answers, items, strict=True)]
        row = {"lr": lr, "epochs": epochs, "hits": sum(hits), "train_s": round(train_s, 1),
               "examples": [{"q": it["question"], "gold": it["answer"], "answer": a}
                            for it, a in list(zip(items, answers, strict=True))[:3]]}
        result["grid"].append(row)
        print(f"lr={lr:g} epochs={epochs}: {sum(hits)}/{len(items)} injected "
              f"(base {result['base_hits']}, rag {result['rag_hits']}), train {train_s:.1f}s",
              flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--grid", default="1e-5:1,1e-3:10,5e-3:5,5e-3:10,1e-2:10")
    ap.add_argument("--no-baselines", action="store_true", help="skip the base and RAG answers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    grid = [(float(a), int(b)) for a, b in (g.split(":") for g in args.grid.split(","))]
    torch.manual_seed(0)
    result = run(args.n, grid, baselines=not args.no_baselines)
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
