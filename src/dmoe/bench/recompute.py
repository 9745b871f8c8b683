"""The cost of a trigger with experts on the last N layers: a partial recompute against a re-prefill.

    dmoe bench recompute --json

With experts on N > 1 layers a swap makes the K/V of the expert layers stale. ``kv_policy``
``recompute`` re-prefills the whole sequence; ``partial`` re-runs only the N expert layers from the
stored residual stream entering the first of them (``Engine._recompute_expert_layers``). Per N:
one prefill of ``prompt_tokens`` random token ids with no expert active, then a swap to one random
expert (std 0.02) on the last N layers, then each recompute ``repeats`` times, interleaved; the
medians, their ratio against the N/L the layer count predicts, and the max abs difference between
the two recomputes' logits (they must agree: the partial one is exact).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from dmoe.base_model import load_base_model
from dmoe.engine.decode import Engine, new_cache
from dmoe.experts.lora import ExpertAdapter, LoraSpec, random_expert


@torch.inference_mode()
def bench_recompute(model: str | None = None, n_layers: tuple[int, ...] = (2, 4, 8),
                    prompt_tokens: int = 256, repeats: int = 5, weights: str | None = "fp32",
                    seed: int = 0) -> dict[str, Any]:
    lm = load_base_model(model, "cpu", weights)
    n_model_layers = lm.model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.model.config.vocab_size, (1, prompt_tokens), generator=g)
    arms = {}
    for n in n_layers:
        spec = LoraSpec(n_layers=n)
        adapter = ExpertAdapter(lm.model, spec)
        engine = Engine(lm.model, lm.tokenizer, adapter)
        try:
            engine._residuals = []  # keep the residual stream, as generate() does for "partial"
            cache = new_cache()
            engine._forward(ids, cache)
            stream = engine._residuals
            adapter.activate([random_expert("e", adapter.mlp_shapes, spec, g, std=0.02)])
            full_s, partial_s = [], []
            for _ in range(repeats):
                engine._residuals = None  # a re-prefill is not new positions
                t0 = time.perf_counter()
                full = engine._forward(ids, new_cache())
                full_s.append(time.perf_counter() - t0)
                engine._residuals = list(stream)
                t0 = time.perf_counter()
                partial = engine._recompute_expert_layers(cache)
                partial_s.append(time.perf_counter() - t0)
            diff = float((full - partial).abs().max())
        finally:
            engine.close()
            adapter.detach()
        full_ms, partial_ms = statistics.median(full_s) * 1e3, statistics.median(partial_s) * 1e3
        arms[str(n)] = {"reprefill_ms": round(full_ms, 1), "partial_ms": round(partial_ms, 1),
                        "partial_over_reprefill": round(partial_ms / full_ms, 3),
                        "layers_ratio": round(n / n_model_layers, 3),
                        "max_abs_logit_diff": diff}
    return {"model": lm.source.name, "weights": lm.weights, "layers": n_model_layers,
            "prompt_tokens": prompt_tokens, "repeats": repeats, "by_expert_layers": arms,
            "how": "medians of interleaved repeats after one prefill; see dmoe.bench.recompute"}
