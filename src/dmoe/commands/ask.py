"""``dmoe ask``: answer one question, streaming tokens."""

from __future__ import annotations

import argparse
import sys

from dmoe.commands.common import add_decode_args, add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer a question with the base model (+ experts when a bank is given)",
        description="Answer one question, streaming tokens to stdout.\n\n"
                    "example:\n  dmoe ask \"What is the capital of France?\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", help="the question to answer")
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--show-experts", action="store_true",
                   help="after the answer, list which experts were active for which tokens")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dmoe.base_model import load_base_model
    from dmoe.engine.decode import DecodeConfig, Engine, TokenRecord
    from dmoe.experts.lora import ExpertAdapter, LoraSpec
    from dmoe.prompts import encode_prompt

    if not args.question.strip():
        raise ValueError("the question is empty")
    lm = load_base_model(args.model, args.device, args.dtype)
    adapter = ExpertAdapter(lm.model, LoraSpec())
    engine = Engine(lm.model, lm.tokenizer, adapter)
    ids = torch.tensor([encode_prompt(lm.tokenizer, args.question)])
    printed = ""
    generated: list[int] = []

    def stream(record: TokenRecord) -> None:
        nonlocal printed
        generated.append(record.token_id)
        text = lm.tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k)
    gen = engine.generate(ids, args.question, cfg, on_token=stream)
    sys.stdout.write(gen.text[len(printed):] + "\n")
    if args.show_experts:
        print(f"[{len(gen.token_ids)} tokens, {gen.n_triggers} triggers; no expert bank given]")
    return 0
