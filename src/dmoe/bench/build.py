"""Benchmark: expert training cost, fast batched path vs the plain PEFT reference, same run.

Units are real SQuAD dev paragraphs. Each unit's examples are built simply here (augmentation lives
elsewhere): PRAG-style ``(passage + question) -> answer`` pairs from the paragraph's own SQuAD
questions, optionally preceded by the passage itself as a language-modelling example. Both paths
train the same units on the same examples with the same config; the bench reports seconds per expert
(reference: median over units, each timed alone; fast: median over repeats of total / n_units),
their ratio, the largest weight difference between the two paths, and the file size of one expert
in each storage dtype::

    python -m dmoe.bench.build --json       # defaults: 8 units (2 also by the reference), 10 epochs
    python -m dmoe.bench.build --n-units 4 --mix passage+qa --json

Measured on the idle 2-core CPU, fp32, defaults (8 units x 3 QA, 10 epochs, shared-prefix trunk):
fast 0.41 s/expert vs reference 11.8 s/expert (28.7x wall, 28.7x CPU), max |Δw| 6.7e-5; without
the shared prefix (``--no-share-prefix``) 0.87 vs 11.0 s (12.6x), max |Δw| 2.2e-5. 102,120 B/expert
in float32, 51,432 in float16, 51,440 in bfloat16. Under a neighbour's load the ratio moves (13x to
28x was seen without the shared prefix), so compare only numbers from one run. On CPU the fast path
is bound by the trunk (once per example, or once per passage with the shared prefix) and, for
passage LM examples, by lm_head at every supervised position.

On one layer the fast path also runs with ``precision="bf16"`` (a bf16 copy of the frozen
weights), alternating with fp32 so each pair shares the machine's conditions; the bench reports
the median per-pair ratio and how far the experts move. Measured (``--mix passage+qa --repeats
3``, one thread beside a bank build): 1.83x, relative |ΔB| up to 0.58 (results/dev/README.md 8b).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmoe.augment.types import TrainingExample
from dmoe.base_model import load_base_model
from dmoe.experts.format import STORAGE_DTYPES, save_expert
from dmoe.experts.lora import LoraSpec
from dmoe.prompts import format_prompt
from dmoe.training.experts import TrainConfig, example_losses, train_fast, train_reference

SQUAD_FILE = "squad/squad_dev_v1.1.json"  # under the benchmark data dir (dmoe.eval.datasets)
MIXES = ("qa", "passage+qa")


def squad_jobs(tokenizer: Any, n_units: int, n_questions: int = 3, mix: str = "qa",
               path: Path | None = None) -> list[tuple[str, list[TrainingExample]]]:
    """``n_units`` paragraphs with at least ``n_questions`` questions, as training jobs."""
    from dmoe.eval.datasets import data_dir

    path = path or data_dir() / SQUAD_FILE
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    jobs = []
    for article in json.loads(path.read_text())["data"]:
        for k, para in enumerate(article["paragraphs"]):
            if len(para["qas"]) < n_questions:
                continue
            passage = para["context"]
            examples = [TrainingExample("", passage)] if mix == "passage+qa" else []
            for qa in para["qas"][:n_questions]:
                prompt = format_prompt(tokenizer, qa["question"], [passage])
                examples.append(TrainingExample(prompt, qa["answers"][0]["text"]))
            jobs.append((f"{article['title']}/{k}", examples))
            if len(jobs) == n_units:
                return jobs
    return jobs


def bench_training(n_units: int = 8, epochs: int = 10, lr: float = 5e-3, mix: str = "qa",
                   n_questions: int = 3, repeats: int = 2, n_reference: int = 2,
                   share_prefix: bool = True, model: str | None = None,
                   n_layers: int = 1, head_vocab: int = 0) -> dict[str, Any]:
    """Train the same units through both paths; timings, weight agreement and expert sizes.

    The fast path (``train_fast``; ``train_fast_layers`` for experts on ``n_layers`` > 1) trains
    all ``n_units`` together; the reference (slow) trains the first ``n_reference`` of them, one
    at a time, and the weight comparison covers those. On one layer the fast path also runs
    in bf16 and, with ``head_vocab`` K > 0, with the candidate head (``dmoe.training.candidates``),
    each alternating with fp32.
    """
    from dmoe.training.layers import train_fast_layers

    lm = load_base_model(model, training=True)
    tok = lm.tokenizer
    jobs = squad_jobs(tok, n_units, n_questions, mix)
    spec = LoraSpec(n_layers=n_layers)
    config = TrainConfig(spec=spec, lr=lr, epochs=epochs, loss_on="answer")

    def fast_path(jobs: Any, config: TrainConfig) -> list[Any]:
        if n_layers == 1:
            return train_fast(lm.model, tok, jobs, config, share_prefix=share_prefix)
        return train_fast_layers(lm.model, tok, jobs, config)

    # fp32 and (one layer: the only path that has them) bf16 compute and the candidate head,
    # alternating, so each pair of runs shares the machine's conditions
    variants = {"fp32": config}
    if n_layers == 1:
        variants["bf16"] = dataclasses.replace(config, precision="bf16")
        if head_vocab:
            variants["head_vocab"] = dataclasses.replace(config, head_vocab=head_vocab)
    for variant in variants.values():  # warm-up (and the bf16 copy of the weights, made once)
        fast_path(jobs[:1], dataclasses.replace(variant, epochs=1))
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    trained: dict[str, list[Any]] = {}
    for _ in range(repeats):
        for name, variant in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            trained[name] = fast_path(jobs, variant)
            wall[name].append((time.perf_counter() - t0) / len(jobs))
            cpu[name].append((time.process_time() - c0) / len(jobs))
    fast, fast_s, fast_cpu = trained["fp32"], wall["fp32"], cpu["fp32"]
    ref_s, ref_cpu, ref = [], [], []
    for job in jobs[:n_reference]:
        t0, c0 = time.perf_counter(), time.process_time()
        ref += train_reference(lm.model, tok, [job], config)
        ref_s.append(time.perf_counter() - t0)
        ref_cpu.append(time.process_time() - c0)
    diff = max((r.weights[k] - f.weights[k]).abs().max().item()
               for r, f in zip(ref, fast[:len(ref)], strict=True) for k in r.weights)
    b_max = max(r.weights[k].abs().max().item() for r in ref for k in r.weights if k.endswith("B"))
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for dtype in STORAGE_DTYPES:
            sizes[dtype] = save_expert(Path(d) / f"{dtype}.safetensors", fast[0], lm.fingerprint, dtype)
    against_fp32: dict[str, Any] = {}
    others = [name for name in trained if name != "fp32"]
    for name in others:  # what bf16 / the candidate head save, and how far they move the experts
        against_fp32 |= {
            f"s_per_expert_fast_{name}": round(statistics.median(wall[name]), 4),
            f"{name}_speedup_vs_fp32": round(statistics.median(
                f / b for f, b in zip(wall["fp32"], wall[name], strict=True)), 2),
            f"{name}_cpu_speedup_vs_fp32": round(statistics.median(
                f / b for f, b in zip(cpu["fp32"], cpu[name], strict=True)), 2),
            f"{name}_max_relative_B_diff": round(max(
                float((a.weights[k] - b.weights[k]).norm() / a.weights[k].norm())
                for a, b in zip(fast, trained[name], strict=True)
                for k in a.weights if k.endswith("B")), 4),
            f"runs_s_per_expert_fast_{name}": [round(x, 3) for x in wall[name]]}
    if "head_vocab" in trained:  # the candidate head is an approximation: the fit, on all V
        against_fp32 |= {"head_vocab": head_vocab, **example_fit(
            lm.model, tok, jobs, fast, trained["head_vocab"], config)}
    n_tokens = [sum(len(tok(e.prompt + e.target)["input_ids"]) for e in exs) for _, exs in jobs]
    fast_med, ref_med = statistics.median(fast_s), statistics.median(ref_s)
    variants_how = (f" (fp32 alternating with {' and '.join(others)}; their ratios: median of the per-pair "
                    f"ratios)" if others else "")
    return {
        "model": lm.source.name, "device": str(lm.device), "threads": torch.get_num_threads(),
        "n_units": len(jobs), "n_reference": len(ref), "n_layers": n_layers,
        "share_prefix": share_prefix and n_layers == 1, "mix": mix,
        "examples_per_unit": len(jobs[0][1]),
        "tokens_per_unit_median": statistics.median(n_tokens), "epochs": epochs, "lr": lr,
        "s_per_expert_fast": round(fast_med, 4), "s_per_expert_reference": round(ref_med, 4),
        "speedup": round(ref_med / fast_med, 1),
        "cpu_s_per_expert_fast": round(statistics.median(fast_cpu), 4),
        "cpu_s_per_expert_reference": round(statistics.median(ref_cpu), 4),
        "cpu_speedup": round(statistics.median(ref_cpu) / statistics.median(fast_cpu), 1),
        "runs_s_per_expert": {"fast": [round(x, 3) for x in fast_s],
                              "reference": [round(x, 3) for x in ref_s]},
        "max_abs_weight_diff": diff,
        "max_abs_B": b_max, "bytes_per_expert": sizes, "n_params": fast[0].n_params, **against_fp32,
        "how": (f"fast: median of {repeats} runs of "
                f"{'train_fast' if n_layers == 1 else 'train_fast_layers'} over all {len(jobs)} units "
                f"(after a warm-up), divided by n_units{variants_how}; reference: median over the first "
                f"{len(ref)} units of train_reference on that unit alone (PEFT, batch 1, full "
                f"forward); wall clock (time.perf_counter) and process CPU time (time.process_time, "
                f"steadier on a shared machine), {torch.get_num_threads()} torch threads"),
    }


def example_fit(model: Any, tokenizer: Any, jobs: Any, ref: Sequence[Any],
                       other: Sequence[Any], config: TrainConfig) -> dict[str, Any]:
    """How well ``other``'s experts fit their examples beside ``ref``'s and the base model's: the
    mean full-vocabulary cross-entropy over every example (``example_losses``, adapter forwards)."""
    means = {}
    for name, experts in (("base", [None] * len(jobs)), ("fp32", ref), ("other", other)):
        losses = [x for e, (_, exs) in zip(experts, jobs, strict=True)
                  for x in example_losses(model, tokenizer, e, exs, config)]
        means[name] = statistics.mean(losses)
    return {"example_loss_base": round(means["base"], 4), "example_loss_fp32": round(means["fp32"], 4),
            "example_loss_head_vocab": round(means["other"], 4)}


def bank_weights(bank_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every expert's weights in a bank, by id (each load verified against its row)."""
    from dmoe.experts.bank import ExpertBank

    with ExpertBank.open(bank_dir, readonly=True) as bank:
        return {i: bank.get(i).weights for i in bank.ids()}


def max_weight_diff(a: dict[str, dict[str, torch.Tensor]],
                    b: dict[str, dict[str, torch.Tensor]]) -> float:
    """The largest |a - b| over experts and tensors; the two must hold the same experts."""
    if a.keys() != b.keys():
        raise ValueError(f"the banks hold different experts: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(float((a[i][k] - b[i][k]).abs().max()) for i in a for k in a[i])


def bench_executors(n_units: int = 16, chunk_size: int = 4, workers: int | None = None,
                    threads_per_worker: int = 1, address: str | None = None,
                    model: str | None = None) -> dict[str, Any]:
    """``dmoe build`` of the same SQuAD paragraphs twice, locally and on Ray (``address``; None:
    a local cluster started here), with the shipped defaults; the experts must agree."""
    from dmoe.eval.datasets import data_dir
    from dmoe.training.build import BuildConfig, build
    from dmoe.training.ray_build import RayExecutor, require_ray, worker_model

    require_ray()
    lm = load_base_model(model, training=True)
    paragraphs = [(a["title"], p["context"]) for a in json.loads(
        (data_dir() / SQUAD_FILE).read_text())["data"] for p in a["paragraphs"]][:n_units]
    config = BuildConfig(chunk_size=chunk_size, passage_words=10_000)  # one unit per paragraph
    train_config = TrainConfig()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"p{i}", "title": t, "text": x}) + "\n"
                                  for i, (t, x) in enumerate(paragraphs)))
        t0 = time.perf_counter()
        local = build(corpus, Path(tmp) / "local", lm, config, train_config, progress=False,
                      log=lambda line: None)
        timings["local"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with RayExecutor(worker_model(model), Path(tmp) / "ray", config, train_config,
                         address=address, workers=workers,
                         threads_per_worker=threads_per_worker) as executor:
            t_up = time.perf_counter()
            remote = build(corpus, Path(tmp) / "ray", lm, config, train_config, progress=False,
                           log=lambda line: None, executor=executor)
            timings["ray"] = time.perf_counter() - t_up
            import ray

            cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        timings["ray_start"] = t_up - t0

        diff = max_weight_diff(bank_weights(Path(tmp) / "local"), bank_weights(Path(tmp) / "ray"))
    n = local.experts_trained
    return {
        "experts": n, "experts_ray": remote.experts_trained, "chunk_size": chunk_size,
        "max_abs_weight_diff_vs_local": diff,
        "s_per_expert_local": round(timings["local"] / n, 3),
        "s_per_expert_ray": round(timings["ray"] / n, 3),
        "ray_cluster_start_s": round(timings["ray_start"], 2), "ray_cluster": cluster,
        "local_threads": torch.get_num_threads(), "threads_per_worker": threads_per_worker,
        "how": ("one dmoe build per executor of the same SQuAD dev paragraphs (one unit each, "
                "extractive augmentation, the shipped recipe and TrainConfig), wall clock "
                "(time.perf_counter) from corpus to committed and indexed bank; the Ray time "
                "excludes starting the cluster (ray_cluster_start_s) but includes each actor "
                "loading the model; weights compared expert by expert"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-units", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--mix", choices=MIXES, default="qa")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-reference", type=int, default=2, help="units also trained by the reference")
    ap.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                    help="run every example's full prompt through the trunk (see train_fast)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--head-vocab", type=int, default=0, metavar="K",
                    help="also time the candidate head at this K (0: not timed)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    r = bench_training(args.n_units, args.epochs, args.lr, args.mix, args.questions, args.repeats,
                       args.n_reference, args.share_prefix, args.model,
                       head_vocab=args.head_vocab)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        for k, v in r.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
