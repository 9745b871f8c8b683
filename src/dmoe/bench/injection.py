"""``dmoe bench injection``: do experts make the model state their passage's fact, and only then?

The probe behind the training defaults, run end to end with the real router and trigger:

1. ``n`` counterfactual NQ questions from ``knowledge_conflicts`` (default items 300-399, a dev
   slice disjoint from the evaluated 0-299 and from the locality questions at the file's end):
   each passage has its answer entity swapped, so the base model cannot know the new fact.
2. Their passages are augmented (extractive), turned into training examples by ``recipe`` and
   trained into one expert each (``dmoe.training.experts``), held in memory.
3. Arms, all greedy through the shared methods (``dmoe.baselines``, the eval's answer stops):
   ``base`` (no passage), ``rag`` (the passage's BM25 top-1 in the prompt), ``dmoe`` (entropy
   trigger + BM25 over the experts' surrogates, the shipped defaults unless overridden),
   ``dmoe_random`` (same trigger, random experts: the control) on the efficacy questions; ``base``
   and ``dmoe`` on ``n_unrelated`` unrelated NQ questions (default items 400-499, their passages
   not injected).

Printed: ``efficacy_*`` = share of answers containing the substituted answer; ``locality_dmoe`` =
share of unrelated answers identical to base's (after SQuAD normalisation); ``own_expert_active_rate``
= share of efficacy questions whose own expert was active for some answer token;
``loop_rate_dmoe`` = share of dmoe answers in which a 3-gram repeats 3 or more times.

``--grid`` runs several settings in one process (base and RAG answered once); each entry is
``key=value`` pairs joined by ``;``, e.g. ``--grid "recipe=prag;recipe=recite,epochs=20"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmoe.augment import make_augmenter, training_examples
from dmoe.augment.training import RECIPES
from dmoe.baselines.methods import BaseMethod, RagMethod
from dmoe.baselines.parametric import DmoeMethod
from dmoe.baselines.protocol import MethodConfig
from dmoe.baselines.retrieval import PassageRetriever
from dmoe.eval import metrics
from dmoe.eval.datasets import load_task
from dmoe.eval.metrics import extract_answer, has_loop, normalize_answer
from dmoe.experts.lora import Composition, Expert, ExpertAdapter, LoraSpec
from dmoe.routing.bm25 import BM25Index, BM25Router
from dmoe.routing.simple import RandomRouter
from dmoe.samples import Sample
from dmoe.training.build import BuildConfig, surrogate_text
from dmoe.training.experts import TrainConfig, train_fast


@dataclass(frozen=True)
class InjectionSetting:
    """One arm of the sweep: how experts are trained and how DMoE routes them (defaults: the
    shipped ones, read from ``BuildConfig``, ``TrainConfig`` and ``MethodConfig``)."""

    recipe: str = BuildConfig.recipe  # training examples per unit (dmoe.augment.training)
    objective: str = TrainConfig.objective  # "ntp" | "distill" (KL to the model reading it)
    augmenter: str = "extractive"  # "extractive" (cloze QA) | "spans" (model-written questions)
    lr: float = TrainConfig.lr
    epochs: int = TrainConfig.epochs
    precision: str = TrainConfig.precision  # "fp32" | "bf16" training compute
    head_vocab: int = TrainConfig.head_vocab  # 0: full output head; K: the candidate head
    rank: int = LoraSpec.rank
    alpha: float = LoraSpec.alpha
    tau: float = MethodConfig.tau
    route_at_start: bool = MethodConfig.route_at_start
    top_k: int = MethodConfig.dmoe_top_k
    composition: Composition = MethodConfig.composition
    composition_temperature: float = MethodConfig.composition_temperature
    composition_scale: float = MethodConfig.composition_scale
    min_relevance: float = MethodConfig.route_min_relevance
    no_repeat_ngram: int = MethodConfig.no_repeat_ngram

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(spec=LoraSpec(rank=self.rank, alpha=self.alpha), lr=self.lr,
                           epochs=self.epochs, objective=self.objective, precision=self.precision,
                           head_vocab=self.head_vocab)

    def method_config(self, max_new_tokens: int) -> MethodConfig:
        return MethodConfig(max_new_tokens=max_new_tokens, tau=self.tau,
                            dmoe_top_k=self.top_k,
                            top_k=1, route_at_start=self.route_at_start,
                            route_min_relevance=self.min_relevance, composition=self.composition,
                            composition_temperature=self.composition_temperature,
                            composition_scale=self.composition_scale,
                            no_repeat_ngram=self.no_repeat_ngram)

    def with_overrides(self, text: str) -> InjectionSetting:
        """``"recipe=recite,lr=1e-3"`` -> a new setting (values parsed by the field's type)."""
        changes: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            key, _, raw = pair.partition("=")
            current = getattr(self, key.strip(), None)
            if current is None or not _:
                raise ValueError(f"bad setting {pair!r}; keys: "
                                 f"{', '.join(f.name for f in dataclasses.fields(self))}")
            if isinstance(current, bool):
                changes[key.strip()] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                changes[key.strip()] = type(current)(raw.strip())
        return dataclasses.replace(self, **changes)


def contains(generation: str, gold: Sequence[str]) -> bool:
    """The eval's ``contains`` on the eval's answer (first line, first sentence)."""
    return bool(metrics.contains(extract_answer(generation), gold))


def same_answer(a: str, b: str) -> bool:
    return normalize_answer(extract_answer(a)) == normalize_answer(extract_answer(b))


def _answers(method: Any, samples: Sequence[Sample], batch_size: int = 1) -> list[Any]:
    """Every sample's prediction, ``batch_size`` at a time (the same answers at any size)."""
    try:
        if batch_size == 1:
            return [method.answer(s) for s in samples]
        return [p for i in range(0, len(samples), batch_size)
                for p in method.answer_batch(samples[i:i + batch_size])]
    finally:
        method.close()


def train_experts(lm: Any, units: Sequence[Any], augs: Sequence[Any],
                  setting: InjectionSetting) -> dict[str, Expert]:
    jobs = [(u.id, training_examples(u, a, lm.tokenizer, recipe=setting.recipe))  # type: ignore[arg-type]
            for u, a in zip(units, augs, strict=True)]
    experts = train_fast(lm.model, lm.tokenizer, jobs, setting.train_config())
    return {e.id: e for e in experts}


def run(lm: Any, settings: Sequence[InjectionSetting], n: int = 100, offset: int = 300,
        n_unrelated: int = 100, unrelated_offset: int = 400, max_new_tokens: int = 32,
        log: Any = print, cache_dir: Path | None = None, batch_size: int = 8,
        train_lm: Any = None) -> dict[str, Any]:
    """Answer the slice with every arm under each setting (module docstring). The settings-free
    arms (base, RAG) are kept in ``cache_dir`` when given, keyed by model, weights, slice and
    decoding. ``batch_size`` questions decode together (``dmoe.engine.batch``; with float
    weights the answers do not depend on it). Experts train on ``train_lm`` (default ``lm``;
    needed when ``lm`` holds packed fp16/int8 CPU weights)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    task = load_task("knowledge_conflicts", offset=offset, limit=n, n_locality=0)
    unrelated = [dataclasses.replace(s, gold_unit_ids=()) for s in load_task(
        "knowledge_conflicts", offset=unrelated_offset, limit=n_unrelated, n_locality=0).samples]
    units, samples = task.corpus, task.samples
    retriever = PassageRetriever(units)
    m, tok = lm.model, lm.tokenizer
    adapter = ExpertAdapter(m, LoraSpec())
    plain = MethodConfig(max_new_tokens=max_new_tokens, top_k=1)
    b = batch_size
    arms = {"base": lambda: _answers(BaseMethod(m, tok, adapter, plain), samples, b),
            "base_unrelated": lambda: _answers(BaseMethod(m, tok, adapter, plain), unrelated, b),
            "rag": lambda: _answers(RagMethod(m, tok, adapter, retriever, plain), samples, b),
            "rag_top3": lambda: _answers(RagMethod(m, tok, adapter, retriever,
                                                   dataclasses.replace(plain, top_k=3)),
                                         samples, b)}
    decoding = hashlib.sha256(repr(plain).encode()).hexdigest()[:8]  # max_new_tokens, greedy, ...
    weights = "" if lm.weights == "fp32" else f"-{lm.weights}"  # fp32 keys predate the modes
    key = (f"{lm.fingerprint}{weights}-{offset}-{len(samples)}-{unrelated_offset}-"
           f"{len(unrelated)}-{decoding}")
    texts = _cached_baselines(cache_dir, key, arms)
    base, base_unrel, rag, rag3 = (texts[a] for a in arms)
    gold = [s.answers for s in samples]
    out: dict[str, Any] = {
        "weights": lm.weights, "n": len(samples), "n_unrelated": len(unrelated),
        "slice": f"knowledge_conflicts {offset}-{offset + len(samples) - 1} (+ unrelated "
                 f"{unrelated_offset}-{unrelated_offset + len(unrelated) - 1})",
        "max_new_tokens": max_new_tokens,
        "efficacy_base": _rate(contains(t, g) for t, g in zip(base, gold, strict=True)),
        "efficacy_rag": _rate(contains(t, g) for t, g in zip(rag, gold, strict=True)),
        "efficacy_rag_top3": _rate(contains(t, g) for t, g in zip(rag3, gold, strict=True)),
        "settings": []}
    log(f"base {out['efficacy_base']:.2f}, rag top-1 {out['efficacy_rag']:.2f}, rag top-3 "
        f"{out['efficacy_rag_top3']:.2f} (n={len(samples)})")
    trained: dict[tuple[Any, ...], dict[str, Expert]] = {}
    augmented: dict[str, tuple[list[Any], BM25Router, float]] = {}
    for setting in settings:
        t0 = time.perf_counter()
        if setting.augmenter not in augmented:  # augmentations and the router over surrogates
            augs = make_augmenter(setting.augmenter, loaded=train_lm or lm).augment(units)
            index = BM25Index.in_memory()
            index.add_many((u.id, surrogate_text(u, a)) for u, a in zip(units, augs, strict=True))
            valid = _rate(a.meta.get("qa_valid", "0") != "0" for a in augs)
            augmented[setting.augmenter] = (augs, BM25Router(index), valid)
        augs, router, valid_units = augmented[setting.augmenter]
        trained_as = (setting.augmenter, setting.recipe, setting.objective, setting.lr,
                      setting.epochs, setting.rank, setting.alpha, setting.precision,
                      setting.head_vocab)
        if trained_as not in trained:  # keep one bank in memory
            trained = {trained_as: train_experts(train_lm or lm, units, augs, setting)}
        bank = trained[trained_as]
        train_s = time.perf_counter() - t0
        cfg = setting.method_config(max_new_tokens)
        loader = lambda ids, bank=bank: [bank[i] for i in ids]  # noqa: E731
        dm = _answers(DmoeMethod(m, tok, adapter, loader, router, cfg), samples, b)
        dm_unrel = _answers(DmoeMethod(m, tok, adapter, loader, router, cfg), unrelated, b)
        rnd = _answers(DmoeMethod(m, tok, adapter, loader, RandomRouter(bank, seed=1), cfg),
                       samples, b)
        row = {**dataclasses.asdict(setting),
               "efficacy_dmoe": _rate(contains(p.text, g) for p, g in zip(dm, gold, strict=True)),
               "efficacy_dmoe_random": _rate(contains(p.text, g)
                                             for p, g in zip(rnd, gold, strict=True)),
               "locality_dmoe": _rate(same_answer(a.text, b)
                                      for a, b in zip(dm_unrel, base_unrel, strict=True)),
               "own_expert_active_rate": _rate(s.id in p.active_experts
                                               for p, s in zip(dm, samples, strict=True)),
               "unrelated_expert_active_rate": _rate(bool(p.active_experts) for p in dm_unrel),
               "loop_rate_dmoe": _rate(has_loop(p.text) for p in dm + dm_unrel),
               "units_with_model_questions": valid_units,
               "train_s": round(train_s, 1), "seconds": round(time.perf_counter() - t0, 1),
               "examples": [{"q": s.question, "gold": s.answers[0], "base": b, "rag": r,
                             "dmoe": d.text}
                            for s, b, r, d in list(zip(samples, base, rag, dm, strict=True))[:3]]}
        out["settings"].append(row)
        log(" ".join(f"{k}={v}" for k, v in row.items() if k != "examples"))
    adapter.detach()
    retriever.close()
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _cached_baselines(cache_dir: Path | None, key: str,
                      arms: dict[str, Any]) -> dict[str, list[str]]:
    """Each arm's answer texts, from ``cache_dir/baselines-KEY.json`` or computed (and stored)."""
    path = cache_dir / f"baselines-{key}.json" if cache_dir else None
    if path is not None and path.exists():
        return {k: list(v) for k, v in json.loads(path.read_text()).items()}
    texts = {name: [p.text for p in answer()] for name, answer in arms.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(texts))
        os.replace(tmp, path)
    return texts


def _rate(flags: Any) -> float:
    values = list(flags)
    return round(sum(map(bool, values)) / max(len(values), 1), 4)
