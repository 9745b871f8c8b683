"""Decode-speed benchmark: dmoe's engine with and without experts vs ``model.generate``.

How it measures (printed with the numbers):

- the same prompts for every arm, each arm generating exactly ``max_new_tokens`` tokens
  (EOS ignored) so the arms do identical work apart from what is being compared;
- arms interleaved per prompt and repetition (hf_generate, engine_no_experts, engine_dmoe) so
  machine noise hits all of them alike; one warm-up round is discarded;
- tokens/s per arm = median over runs of (generated tokens / wall time incl. prefill);
- ``engine_dmoe``: ``n_store`` random experts written to disk as expert files; the router returns k
  pseudo-random stored ids (from a hash of the query); the expert cache is disabled so every trigger loads its experts from disk;
  tau is set to a quantile of the base model's own entropies so that >= 10% of steps trigger;
- ``trigger_cost_in_decode_steps`` = median(trigger time incl. route + load + swap + recompute)
  / median(one-token decode step) over the dmoe runs.

Batched arms (``batch_sizes``, ``dmoe.engine.batch``): B copies of the prompt list's first B prompts
(cycled) run as one batch of exactly ``max_new_tokens`` tokens each; tokens/s = B * max_new_tokens /
wall time incl. every row's prefill, median over repeats, arms interleaved per repeat.
``ratio_dmoe_vs_no_experts_b8`` compares batch 8 with DMoE triggers (the same tau and store; each
row swaps at its own steps) to batch 8 without experts. ``batch_matches_single``: every row of
the largest batch's dmoe run decoded the same tokens as ``Engine.generate`` alone (the router
picks experts from a hash of the query, so both see the same routes in any call order).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from dmoe.engine.batch import BatchEngine, Request
from dmoe.engine.decode import DecodeConfig, Engine
from dmoe.engine.triggers import EntropyTrigger
from dmoe.experts.cache import ExpertCache, directory_loader
from dmoe.experts.format import save_expert
from dmoe.experts.lora import ExpertAdapter, LoraSpec, random_expert
from dmoe.prompts import encode_prompt
from dmoe.routing.base import FunctionRouter

PROMPTS = [
    "Describe the history of the city of Rome in a few sentences.",
    "Explain how photosynthesis works.",
    "Who was Marie Curie and what did she discover?",
    "What causes the seasons on Earth?",
    "Summarise the plot of Romeo and Juliet.",
    "How does a steam engine work?",
]


def _time(fn: Any, sync: bool) -> tuple[Any, float]:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_decode(model_spec: str | None = None, device: str | None = None,
                 max_new_tokens: int = 48, repeats: int = 3, n_store: int = 64, top_k: int = 3,
                 target_trigger_rate: float = 0.2, seed: int = 0,
                 batch_sizes: tuple[int, ...] = (1, 4, 8, 16)) -> dict[str, Any]:
    from dmoe.base_model import load_base_model

    lm = load_base_model(model_spec, device)
    model, tok = lm.model, lm.tokenizer
    sync = lm.device.type == "cuda"
    spec = LoraSpec()
    adapter = ExpertAdapter(model, spec)
    prompts = [torch.tensor([encode_prompt(tok, p)], device=lm.device) for p in PROMPTS]
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True, top_k=top_k, profile=True)

    with tempfile.TemporaryDirectory(prefix="dmoe-bench-") as store:
        g = torch.Generator().manual_seed(seed)
        ids = [f"x{i:04d}" for i in range(n_store)]
        for i in ids:
            save_expert(Path(store) / f"{i}.safetensors",
                        random_expert(i, adapter.mlp_shapes, spec, g, std=0.01), lm.fingerprint)
        loader = ExpertCache(directory_loader(store, lm.fingerprint), capacity=0)  # cold loads

        def pick(query: str, k: int) -> list[str]:  # pseudo-random, but the same in any order
            h = zlib.crc32(f"{seed}:{query}".encode())
            return [ids[(h + j * 7919) % n_store] for j in range(k)]

        router = FunctionRouter(pick)

        plain = Engine(model, tok, adapter)
        # tau from the base model's own entropy distribution -> about target_trigger_rate triggers
        entropies = [r.entropy for p in prompts for r in plain.generate(p, config=cfg).records]
        tau = sorted(entropies)[int(len(entropies) * (1 - target_trigger_rate))]
        plain.close()
        dmoe = Engine(model, tok, adapter, loader, router, EntropyTrigger(tau))

        def hf(p: torch.Tensor) -> int:
            out = model.generate(p, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
            return int(out.shape[1] - p.shape[1])

        rates: dict[str, list[float]] = {"hf_generate": [], "engine_no_experts": [],
                                         "engine_dmoe": []}
        step_s: list[float] = []
        trigger_s: list[float] = []
        n_steps = n_triggers = 0
        for rep in range(repeats + 1):
            for question, p in zip(PROMPTS, prompts, strict=True):
                adapter.activate([])
                n, dt = _time(lambda p=p: hf(p), sync)
                hf_rate = n / dt
                # same engine object, routing off = the no-experts arm
                gen, dt = _time(lambda p=p, q=question: dmoe.generate(p, q, cfg, routing=False),
                                sync)
                plain_rate = len(gen.token_ids) / dt
                gen, dt = _time(lambda p=p, q=question: dmoe.generate(p, q, cfg), sync)
                if rep == 0:
                    continue  # warm-up round
                rates["hf_generate"].append(hf_rate)
                rates["engine_no_experts"].append(plain_rate)
                rates["engine_dmoe"].append(len(gen.token_ids) / dt)
                step_s += gen.step_s
                trigger_s += gen.trigger_s
                n_steps += len(gen.records)
                n_triggers += gen.n_triggers
        adapter.activate([])
        batched = _bench_batches(dmoe, PROMPTS, prompts, cfg, batch_sizes, repeats, sync)

    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "model": lm.source.name, "device": str(lm.device), "dtype": str(model.dtype),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(PROMPTS), "repeats": repeats, "max_new_tokens": max_new_tokens,
        "tokens_per_s_hf_generate": round(med["hf_generate"], 2),
        "tokens_per_s_engine_no_experts": round(med["engine_no_experts"], 2),
        "tokens_per_s_engine_dmoe": round(med["engine_dmoe"], 2),
        "ratio_dmoe_vs_no_experts": round(med["engine_dmoe"] / med["engine_no_experts"], 3),
        "ratio_engine_vs_hf_generate": round(med["engine_no_experts"] / med["hf_generate"], 3),
        "trigger_cost_in_decode_steps": round(statistics.median(trigger_s)
                                              / statistics.median(step_s), 3),
        "median_trigger_ms": round(statistics.median(trigger_s) * 1e3, 3),
        "median_decode_step_ms": round(statistics.median(step_s) * 1e3, 3),
        "trigger_rate": round(n_triggers / n_steps, 3),
        "tau": round(tau, 3), "top_k": top_k, "n_stored_experts": n_store,
        **batched,
        "method": "median over prompts x repeats of tokens/wall-s incl. prefill; arms interleaved;"
                  " exactly max_new_tokens per run; expert cache off (disk load per trigger); "
                  "batches: B rows x max_new_tokens / wall-s of the whole batch",
    }


def _bench_batches(engine: Engine, questions: list[str], prompts: list[torch.Tensor],
                   cfg: DecodeConfig, sizes: tuple[int, ...], repeats: int,
                   sync: bool) -> dict[str, Any]:
    """Batched tokens/s per batch size (no experts), and batch 8 with DMoE triggers."""
    if not sizes:
        return {}
    batch = BatchEngine(engine, max_batch=max(sizes))

    def run(b: int, routing: bool) -> tuple[list[Any], float]:
        reqs = [Request(prompts[i % len(prompts)], questions[i % len(prompts)], cfg,
                        routing=routing) for i in range(b)]
        batch.max_batch = b
        return _time(lambda: batch.run(reqs), sync)

    rates: dict[str, list[float]] = {}
    dmoe_b = 8 if 8 in sizes else max(sizes)
    steps = fired = 0
    for rep in range(repeats + 1):
        for b in sizes:
            arms = [("batch", False)] + ([("dmoe_batch", True)] if b == dmoe_b else [])
            for arm, routing in arms:
                gens, dt = run(b, routing)
                if rep == 0:
                    continue  # warm-up round
                rates.setdefault(f"{arm}_{b}", []).append(b * cfg.max_new_tokens / dt)
                if routing:
                    steps += sum(len(g.records) for g in gens)
                    fired += sum(g.n_triggers for g in gens)
    # the largest batch's dmoe rows against the single-sequence engine
    gens, _ = run(max(sizes), True)
    singles = [engine.generate(prompts[i % len(prompts)], questions[i % len(prompts)], cfg)
               for i in range(max(sizes))]
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {f"tokens_per_s_batch_{b}": round(med[f"batch_{b}"], 2) for b in sizes}
    out[f"tokens_per_s_dmoe_batch_{dmoe_b}"] = round(med[f"dmoe_batch_{dmoe_b}"], 2)
    if 1 in sizes:
        out[f"throughput_ratio_b{dmoe_b}_vs_b1"] = round(med[f"batch_{dmoe_b}"] / med["batch_1"], 3)
    out[f"ratio_dmoe_vs_no_experts_b{dmoe_b}"] = round(
        med[f"dmoe_batch_{dmoe_b}"] / med[f"batch_{dmoe_b}"], 3)
    out[f"trigger_rate_dmoe_batch_{dmoe_b}"] = round(fired / max(steps, 1), 3)
    out["batch_matches_single"] = all(g.token_ids == s.token_ids
                                      for g, s in zip(gens, singles, strict=True))
    out["batch_sizes"] = list(sizes)
    return out
