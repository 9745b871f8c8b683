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

Weights modes (``weights``, e.g. ``("fp32", "fp16", "int8")``; ``dmoe.quant``): one model per mode
is loaded, and every engine arm runs for each mode back to back inside the same prompt/repeat loop,
so the modes see the same machine noise. The first mode is the reference: its fields keep the
names above, every other mode's carry a ``_<mode>`` suffix, plus ``speedup_<mode>_vs_<first>`` =
its no-experts tokens/s over the reference's. All modes share tau (from the reference's entropies)
and the expert store (the fingerprint is the float weights'). ``hf_generate`` runs the reference.
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
                 batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
                 weights: tuple[str, ...] = ("auto",)) -> dict[str, Any]:
    from dmoe.base_model import load_base_model

    if not weights:
        raise ValueError("weights: give at least one mode")
    models = {}
    for mode in weights:
        lm = load_base_model(model_spec, device, mode)
        models[lm.weights] = lm
    if len(models) != len(weights):
        raise ValueError(f"weights {weights} name the same mode twice")
    modes = list(models)  # resolved names; the first is the reference
    lm = models[modes[0]]
    tok, sync = lm.tokenizer, lm.device.type == "cuda"
    spec = LoraSpec()
    adapters = {w: ExpertAdapter(m.model, spec) for w, m in models.items()}
    adapter = adapters[modes[0]]
    prompts = [torch.tensor([encode_prompt(tok, p)], device=lm.device) for p in PROMPTS]
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True, top_k=top_k, profile=True)

    with tempfile.TemporaryDirectory(prefix="dmoe-bench-") as store:
        g = torch.Generator().manual_seed(seed)
        ids = [f"x{i:04d}" for i in range(n_store)]
        for i in ids:  # the fingerprint is the float weights': one store serves every mode
            save_expert(Path(store) / f"{i}.safetensors",
                        random_expert(i, adapter.mlp_shapes, spec, g, std=0.01), lm.fingerprint)
        loader = ExpertCache(directory_loader(store, lm.fingerprint), capacity=0)  # cold loads

        def pick(query: str, k: int) -> list[str]:  # pseudo-random, but the same in any order
            h = zlib.crc32(f"{seed}:{query}".encode())
            return [ids[(h + j * 7919) % n_store] for j in range(k)]

        router = FunctionRouter(pick)

        plain = Engine(lm.model, tok, adapter)
        # tau from the reference model's own entropies -> about target_trigger_rate triggers
        entropies = [r.entropy for p in prompts for r in plain.generate(p, config=cfg).records]
        tau = sorted(entropies)[int(len(entropies) * (1 - target_trigger_rate))]
        plain.close()
        engines = {w: Engine(m.model, tok, adapters[w], loader, router, EntropyTrigger(tau))
                   for w, m in models.items()}

        def hf(p: torch.Tensor) -> int:
            out = lm.model.generate(p, max_new_tokens=max_new_tokens,
                                    min_new_tokens=max_new_tokens, do_sample=False)
            return int(out.shape[1] - p.shape[1])

        rates: dict[str, list[float]] = {"hf_generate": []}
        step_s: dict[str, list[float]] = {w: [] for w in modes}
        trigger_s: dict[str, list[float]] = {w: [] for w in modes}
        n_steps = dict.fromkeys(modes, 0)
        n_triggers = dict.fromkeys(modes, 0)
        for rep in range(repeats + 1):
            for question, p in zip(PROMPTS, prompts, strict=True):
                adapter.activate([])
                n, dt = _time(lambda p=p: hf(p), sync)
                if rep > 0:  # round 0 warms up
                    rates["hf_generate"].append(n / dt)
                for w, dmoe in engines.items():
                    # same engine object, routing off = the no-experts arm
                    gen, dt = _time(lambda p=p, q=question, e=dmoe:
                                    e.generate(p, q, cfg, routing=False), sync)
                    plain_rate = len(gen.token_ids) / dt
                    gen, dt = _time(lambda p=p, q=question, e=dmoe: e.generate(p, q, cfg), sync)
                    if rep == 0:
                        continue
                    rates.setdefault(f"engine_no_experts_{w}", []).append(plain_rate)
                    rates.setdefault(f"engine_dmoe_{w}", []).append(len(gen.token_ids) / dt)
                    step_s[w] += gen.step_s
                    trigger_s[w] += gen.trigger_s
                    n_steps[w] += len(gen.records)
                    n_triggers[w] += gen.n_triggers
        for a in adapters.values():
            a.activate([])
        batched = _bench_batches(engines, PROMPTS, prompts, cfg, batch_sizes, repeats, sync)

    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {
        "model": lm.source.name, "device": str(lm.device), "weights": modes,
        "torch_threads": torch.get_num_threads(),
        "prompts": len(PROMPTS), "repeats": repeats, "max_new_tokens": max_new_tokens,
        "tokens_per_s_hf_generate": round(med["hf_generate"], 2)}
    for w in modes:  # the reference mode's fields carry no suffix (as before modes existed)
        sfx = "" if w == modes[0] else f"_{w}"
        out.update({
            f"tokens_per_s_engine_no_experts{sfx}": round(med[f"engine_no_experts_{w}"], 2),
            f"tokens_per_s_engine_dmoe{sfx}": round(med[f"engine_dmoe_{w}"], 2),
            f"ratio_dmoe_vs_no_experts{sfx}": round(med[f"engine_dmoe_{w}"]
                                                   / med[f"engine_no_experts_{w}"], 3),
            f"trigger_cost_in_decode_steps{sfx}": round(statistics.median(trigger_s[w])
                                                        / statistics.median(step_s[w]), 3),
            f"median_trigger_ms{sfx}": round(statistics.median(trigger_s[w]) * 1e3, 3),
            f"median_decode_step_ms{sfx}": round(statistics.median(step_s[w]) * 1e3, 3),
            f"trigger_rate{sfx}": round(n_triggers[w] / n_steps[w], 3)})
        if sfx:
            out[f"speedup_{w}_vs_{modes[0]}"] = round(med[f"engine_no_experts_{w}"]
                                                      / med[f"engine_no_experts_{modes[0]}"], 3)
    out["ratio_engine_vs_hf_generate"] = round(med[f"engine_no_experts_{modes[0]}"]
                                               / med["hf_generate"], 3)
    return {**out, "tau": round(tau, 3), "top_k": top_k, "n_stored_experts": n_store, **batched,
            "method": "median over prompts x repeats of tokens/wall-s incl. prefill; arms (and "
                      "weights modes) interleaved; exactly max_new_tokens per run; expert cache "
                      "off (disk load per trigger); batches: B rows x max_new_tokens / wall-s of "
                      "the whole batch; hf_generate runs the reference mode"}


def _bench_batches(engines: dict[str, Engine], questions: list[str], prompts: list[torch.Tensor],
                   cfg: DecodeConfig, sizes: tuple[int, ...], repeats: int,
                   sync: bool) -> dict[str, Any]:
    """Batched tokens/s per batch size (no experts), and batch 8 with DMoE triggers, for each
    weights mode (the first mode's keys without a suffix)."""
    if not sizes:
        return {}
    modes = list(engines)
    batches = {w: BatchEngine(e, max_batch=max(sizes)) for w, e in engines.items()}

    def run(w: str, b: int, routing: bool) -> tuple[list[Any], float]:
        reqs = [Request(prompts[i % len(prompts)], questions[i % len(prompts)], cfg,
                        routing=routing) for i in range(b)]
        batches[w].max_batch = b
        return _time(lambda: batches[w].run(reqs), sync)

    rates: dict[str, list[float]] = {}
    dmoe_b = 8 if 8 in sizes else max(sizes)
    steps = dict.fromkeys(modes, 0)
    fired = dict.fromkeys(modes, 0)
    for rep in range(repeats + 1):
        for b in sizes:
            arms = [("batch", False)] + ([("dmoe_batch", True)] if b == dmoe_b else [])
            for arm, routing in arms:
                for w in modes:
                    gens, dt = run(w, b, routing)
                    if rep == 0:
                        continue  # warm-up round
                    rates.setdefault(f"{arm}_{b}_{w}", []).append(b * cfg.max_new_tokens / dt)
                    if routing:
                        steps[w] += sum(len(g.records) for g in gens)
                        fired[w] += sum(g.n_triggers for g in gens)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = {}
    for w in modes:
        sfx = "" if w == modes[0] else f"_{w}"
        # the largest batch's dmoe rows against the single-sequence engine
        gens, _ = run(w, max(sizes), True)
        singles = [engines[w].generate(prompts[i % len(prompts)], questions[i % len(prompts)],
                                       cfg) for i in range(max(sizes))]
        out.update({f"tokens_per_s_batch_{b}{sfx}": round(med[f"batch_{b}_{w}"], 2)
                    for b in sizes})
        out[f"tokens_per_s_dmoe_batch_{dmoe_b}{sfx}"] = round(med[f"dmoe_batch_{dmoe_b}_{w}"], 2)
        if 1 in sizes:
            out[f"throughput_ratio_b{dmoe_b}_vs_b1{sfx}"] = round(
                med[f"batch_{dmoe_b}_{w}"] / med[f"batch_1_{w}"], 3)
        out[f"ratio_dmoe_vs_no_experts_b{dmoe_b}{sfx}"] = round(
            med[f"dmoe_batch_{dmoe_b}_{w}"] / med[f"batch_{dmoe_b}_{w}"], 3)
        out[f"trigger_rate_dmoe_batch_{dmoe_b}{sfx}"] = round(fired[w] / max(steps[w], 1), 3)
        # int8's activation scale spans the call, so its rows may differ from single decoding
        out[f"batch_matches_single{sfx}"] = all(g.token_ids == s.token_ids
                                                for g, s in zip(gens, singles, strict=True))
    out["batch_sizes"] = list(sizes)
    return out
