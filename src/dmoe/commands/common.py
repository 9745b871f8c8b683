"""Argument groups shared by several commands (model selection, decoding knobs)."""

from __future__ import annotations

import argparse
import math

from dmoe.base_model import CPU_DEFAULT_WEIGHTS, WEIGHTS

WEIGHTS_CHOICES = ("auto", *WEIGHTS)


def finite_float(text: str) -> float:
    """An argparse ``type`` for a float that must be finite (``nan``/``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def weights_list(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated weights modes, e.g. ``fp32,int8``."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in WEIGHTS_CHOICES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes from {', '.join(WEIGHTS_CHOICES)}"
                                         f", got {text!r}")
    return modes


def add_model_args(p: argparse.ArgumentParser, several_weights: bool = False) -> None:
    """``--model``, ``--device``, ``--weights`` (``several_weights``: a comma-separated list of
    modes to compare, first = reference)."""
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=None, metavar="SPEC",
                   help="packaged alias: smollm2 (the default; SmolLM2-135M-Instruct) or "
                        "gemma3-270m (Gemma-3-270M base); or a local Hugging Face model "
                        "directory, or a .gguf file")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, "
                                                     "cuda:1 …")
    if several_weights:
        g.add_argument("--weights", default=("auto",), type=weights_list, metavar="W[,W...]",
                       help="weights modes measured side by side, the first is the reference "
                            f"(from {', '.join(WEIGHTS_CHOICES)}; e.g. fp32,int8; default auto)")
        return
    g.add_argument("--weights", default="auto", choices=WEIGHTS_CHOICES,
                   help="how the base model's weights are held: fp32; bf16; fp16 (on a CPU: fp16 "
                        "weights, fp32 compute, ~2x faster decoding); int8 (CPU; fast but changes "
                        "answers, see results/dev/weights.md). auto = bf16 on CUDA, on a CPU "
                        f"{CPU_DEFAULT_WEIGHTS} (fp32 where experts are trained). Experts train on "
                        "float weights only (default auto)")
    g.add_argument("--dtype", dest="weights", choices=["float32", "bfloat16", "float16"],
                   help=argparse.SUPPRESS)  # the flag's older name


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """Decoding flags; routing defaults are the engine's shipped ones (``DecodeConfig``)."""
    from dmoe.engine.decode import DecodeConfig as D
    from dmoe.engine.triggers import DEFAULT_TAU

    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation cap (default 64)")
    g.add_argument("--trigger", default="entropy", choices=["entropy", "always", "never", "random"],
                   help="when to re-route experts (default: entropy > tau)")
    g.add_argument("--tau", type=finite_float, default=DEFAULT_TAU,
                   help=f"entropy threshold in nats (default {DEFAULT_TAU})")
    g.add_argument("--trigger-rate", type=finite_float, default=0.1,
                   help="probability per step for --trigger random (default 0.1)")
    g.add_argument("--top-k", type=int, default=D.top_k,
                   help=f"experts per route (default {D.top_k}; the paper's is 3)")
    g.add_argument("--route-at-start", action=argparse.BooleanOptionalAction,
                   default=D.route_at_start,
                   help="also route on the question before the first token (default: "
                        f"{'on' if D.route_at_start else 'off'})")
    g.add_argument("--composition", default=D.composition, choices=["cat", "softmax"],
                   help="how k experts combine: cat = their exact sum (the paper), softmax = a "
                        "lambda-scaled convex mix by router relevance (default %(default)s)")
    g.add_argument("--composition-scale", type=finite_float, default=D.composition_scale,
                   metavar="LAMBDA", help="lambda of --composition softmax (default %(default)s)")
    g.add_argument("--no-repeat-ngram", type=int, default=D.no_repeat_ngram, metavar="N",
                   help="never repeat an n-gram of the generated text (greedy takes the best "
                        "other token; default %(default)s, 0 = plain greedy)")
    g.add_argument("--min-relevance", type=finite_float, default=D.min_relevance, metavar="R",
                   help="relevance gate: drop routed experts whose BM25 score is below R x the "
                        "query's maximum attainable score; none left = base model until the next "
                        f"trigger (default {D.min_relevance}, chosen on a dev slice by "
                        "scripts/replay_routes.py; 0 = off, the paper)")
    g.add_argument("--min-score", type=finite_float, default=0.0, metavar="S",
                   help="relevance gate on the raw BM25 score (default 0 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed for random trigger/router")
