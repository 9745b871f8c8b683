"""``dmoe ask``: answer one question, streaming tokens; with ``--bank``, DMoE experts are routed."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dmoe.commands.common import add_decode_args, add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer a question (with DMoE experts when a bank is given)",
        description="Answer one question, streaming tokens to stdout. With --bank, experts are "
                    "routed by BM25 whenever the next-token entropy exceeds --tau.\n\n"
                    "examples:\n  dmoe ask \"What is the capital of France?\"\n"
                    "  dmoe ask \"Who founded Velmora?\" --bank runs/demo-bank --show-experts",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", help="the question to answer")
    p.add_argument("--bank", default=os.environ.get("DMOE_BANK"),
                   help="expert bank directory (default: $DMOE_BANK; none = base model)")
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--show-experts", action="store_true",
                   help="after the answer, list which experts were active for which tokens")
    p.set_defaults(func=run)


class StreamPrinter:
    """An ``on_token`` callback that prints the decoded answer as it grows."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, record: Any) -> None:
        self.ids.append(record.token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def describe_spans(gen: Any, tokenizer: Any, kb: Any) -> list[str]:
    """Lines like ``tokens 3-9 "Tamsin Oker" <- velmora#0 (Velmora), ...``."""
    from dmoe.engine.attribution import spans

    lines = []
    for s in spans(gen, tokenizer):
        names = []
        for expert_id in s.experts:
            title = kb.info(expert_id).title if kb is not None and kb.bank.exists(expert_id) else ""
            names.append(f"{expert_id} ({title})" if title else expert_id)
        who = ", ".join(names) if names else "no experts"
        mark = " [trigger]" if s.triggered else ""
        lines.append(f"  tokens {s.start}-{s.end - 1}{mark} {s.text!r} <- {who}")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    from dmoe.base_model import load_base_model
    from dmoe.engine.decode import DecodeConfig, Engine
    from dmoe.engine.triggers import make_trigger
    from dmoe.experts.bank import expert_layers
    from dmoe.experts.lora import ExpertAdapter, LoraSpec
    from dmoe.knowledge import KnowledgeBase
    from dmoe.prompts import encode_prompt

    if not args.question.strip():
        raise ValueError("the question is empty")
    lm = load_base_model(args.model, args.device, args.weights,
                         float_mlps=expert_layers(args.bank))
    kb = KnowledgeBase.open(args.bank, lm.fingerprint, readonly=True) if args.bank else None
    trigger = make_trigger(args.trigger, args.tau, args.trigger_rate, args.seed)
    engine = (kb.engine(lm, trigger) if kb is not None
              else Engine(lm.model, lm.tokenizer, ExpertAdapter(lm.model, LoraSpec())))
    ids = torch.tensor([encode_prompt(lm.tokenizer, args.question)])
    printer = StreamPrinter(lm.tokenizer)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                       min_score=args.min_score, min_relevance=args.min_relevance,
                       route_at_start=args.route_at_start, composition=args.composition,
                       composition_scale=args.composition_scale,
                       no_repeat_ngram=args.no_repeat_ngram)
    gen = engine.generate(ids, args.question, cfg, on_token=printer)
    sys.stdout.write(gen.text[len(printer.printed):] + "\n")
    if args.show_experts:
        print(f"[{len(gen.token_ids)} tokens, {gen.n_triggers} triggers"
              + ("" if kb is not None else "; no expert bank given") + "]")
        for line in describe_spans(gen, lm.tokenizer, kb):
            print(line)
    if kb is not None:
        kb.close()
    return 0
