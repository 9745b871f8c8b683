"""Run methods over a task's samples into resumable per-sample JSONL files.

Layout of an output directory::

    OUT/<dataset>/<method>.jsonl   one JSON record per finished sample (appended, fsync'd)
    OUT/runs.jsonl                 one record per invocation (command, config, model, device)
    OUT/summary.json, OUT/tables.md, OUT/quality_vs_latency.png   (dmoe.eval.report)

Resume: a sample whose id already has a record in ``<method>.jsonl`` made over the same corpus
(``Task.corpus_fingerprint``, stored as ``corpus`` in each record) is skipped, so re-running the
same command after an interruption computes only what is missing. Where the corpus follows the
selection (HotpotQA, StrategyQA, knowledge_conflicts), a different ``--limit``/``--offset`` changes
it and those samples are recomputed; the newest record of an id is the one that counts
(``latest_records``). A torn last line (a crash during the write) is cut off before appending.

Methods run interleaved per sample (``run_task``); ``shard`` splits a selection between parallel
workers that write to separate output directories (``merge_results``, ``dmoe eval --merge``, puts
them together).
With ``batch_size`` B > 1, methods that can (``answer_batch``: every method that answers with
one greedy generation, i.e. all but FLARE) answer B samples as one batch: the same answers, and
each record's ``latency_s`` is the batch's wall time / B (``extra.batch_size`` = B) and its memory
the batch's.

This module knows nothing about how methods answer; it times nothing itself beyond what the
``Prediction`` reports, and measures memory around each ``answer`` call (``dmoe.eval.memory``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dmoe.baselines.protocol import Method, Prediction
from dmoe.eval import memory
from dmoe.eval.datasets import Sample, Task
from dmoe.eval.metrics import score


def results_path(out: Path, dataset: str, method: str) -> Path:
    return Path(out) / dataset / f"{method}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a results file (a torn last line is ignored)."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def latest_records(path: Path) -> list[dict[str, Any]]:
    """One record per sample id, the newest (last written) one, in first-seen order."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in read_records(path):
        by_id.pop(r["id"], None)
        by_id[r["id"]] = r
    return list(by_id.values())


def done_ids(path: Path, corpus: str) -> set[str]:
    """Ids already answered over the corpus with fingerprint ``corpus``."""
    return {r["id"] for r in read_records(path) if r.get("corpus") == corpus}


def _repair_tail(path: Path) -> None:
    """Cut a partial last line so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a finished sample survives a crash)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_record(task: Task, method: str, sample: Sample, pred: Prediction,
                mem: dict[str, Any]) -> dict[str, Any]:
    """The per-sample JSON record: inputs, gold, prediction, scores and costs."""
    return {
        "dataset": task.name, "method": method, "corpus": task.corpus_fingerprint, "id": sample.id, "question": sample.question,
        "gold": list(sample.answers), "kind": sample.kind, "split": sample.meta.get("split"),
        "prediction": pred.text, **score(pred.text, sample.answers, sample.kind),
        "latency_s": pred.latency_s, "generated_tokens": pred.generated_tokens,
        "prefill_tokens": pred.prefill_tokens, "triggers": pred.triggers,
        "active_experts": list(pred.active_experts), "retrieved": list(pred.retrieved),
        "gold_unit_ids": list(sample.gold_unit_ids), **mem, "extra": pred.extra,
    }


def shard(samples: list[Sample], index: int, count: int) -> list[Sample]:
    """Samples ``index, index + count, ...``: one of ``count`` disjoint parts of a selection, for
    parallel workers that keep the whole corpus (retrieval difficulty does not change)."""
    _check_shard(index, count)
    return samples[index::count]


def parse_shard(value: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``; ValueError unless 0 <= K < N."""
    k, _, n = value.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        raise ValueError(f"shard must be K/N with 0 <= K < N, got {value!r}") from None
    _check_shard(index, count)
    return index, count


def _check_shard(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be K/N with 0 <= K < N, got {index}/{count}")


def run_task(task: Task, methods: Iterable[str], build: Callable[[str], Method], out: Path,
             progress: bool = True, batch_size: int = 1) -> dict[str, int]:
    """Answer every not-yet-recorded sample of ``task`` with each method; return how many ran.

    Methods are interleaved per sample (sample 1 by every method, then sample 2, ...), so every
    method is timed under the same machine load over the run and an interrupted run leaves each
    method with about the same number of finished samples. A method with nothing left to do is not
    even built; every built method is closed at the end. ``batch_size``: see the module doc.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    todo: dict[str, set[str]] = {}
    for name in methods:
        path = results_path(out, task.name, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        done = done_ids(path, task.corpus_fingerprint)
        todo[name] = {s.id for s in task.samples if s.id not in done}
    ran = {name: 0 for name in todo}
    built: dict[str, Method] = {}
    try:
        for name, ids in todo.items():
            if ids:
                built[name] = build(name)
        pending = [s for s in task.samples if any(s.id in todo[n] for n in built)]
        bar = tqdm(total=len(pending), desc=f"{task.name} [{','.join(built)}]", unit="q",
                   disable=not progress or not built)
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            for name, method in built.items():
                samples = [s for s in chunk if s.id in todo[name]]
                answer_batch = getattr(method, "answer_batch", None) if len(samples) > 1 else None
                for group in [samples] if answer_batch else [[s] for s in samples]:
                    reset_ok = memory.reset_peak()
                    preds = answer_batch(group) if answer_batch else [method.answer(group[0])]
                    mem = {"peak_rss_mb": memory.peak_rss_mb(), "rss_mb": memory.rss_mb(),
                           "peak_rss_reset": reset_ok, "peak_gpu_mb": memory.peak_gpu_mb()}
                    for sample, pred in zip(group, preds, strict=True):
                        append_record(results_path(out, task.name, name),
                                      make_record(task, name, sample, pred, mem))
                        ran[name] += 1
            bar.update(len(chunk))
        bar.close()
    finally:
        for method in built.values():
            method.close()
    return ran


def log_invocation(out: Path, info: dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    append_record(Path(out) / "runs.jsonl", info)


def weights_of(out: Path) -> set[str]:
    """The weights modes a results directory's answers were made with (``runs.jsonl``; runs
    logged before weights modes existed ran the old default: fp32 on a CPU, bf16 on CUDA)."""
    return {r.get("weights") or ("bf16" if str(r.get("device")).startswith("cuda") else "fp32")
            for r in read_records(Path(out) / "runs.jsonl")}


def check_weights(out: Path, weights: str) -> None:
    """Refuse to resume a results directory answered with other weights: one directory, one
    weights mode."""
    before = weights_of(out)
    if before - {weights}:
        raise ValueError(f"{out} holds answers made with --weights {', '.join(sorted(before))}; "
                         f"resume it with the same weights, or write --weights {weights} "
                         f"answers to another --out")


def merge_results(sources: Iterable[Path], out: Path) -> dict[str, int]:
    """Append other results directories (``--shard`` workers', or a later run's) to ``out``.

    Every record of a source's ``<dataset>/<method>.jsonl`` and every line of its ``runs.jsonl``
    that ``out``'s file does not already hold (the same JSON) is appended, in source order and
    fsync'd, so a record merged later is the newer one (``latest_records``). Merging is
    idempotent, and an interrupted merge is finished by running it again. Each invocation's
    weights mode travels in its ``runs.jsonl`` line (a results folder may hold datasets answered
    in different modes; ``dmoe eval`` itself resumes a folder only in one). Returns the records
    added per ``dataset/method``.
    """
    sources, out = [Path(src) for src in sources], Path(out)
    for src in sources:
        if not src.is_dir():
            raise ValueError(f"{src} is not a results directory")
        if src.resolve() == out.resolve():
            raise ValueError(f"cannot merge {src} into itself")
    added: dict[str, int] = {}
    for src in sources:
        files = sorted(src.glob("*/*.jsonl")) + [src / "runs.jsonl"]
        for path in (f for f in files if f.is_file()):
            rel = path.relative_to(src)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _repair_tail(dest)
            have = {json.dumps(r, sort_keys=True) for r in read_records(dest)}
            for record in read_records(path):
                key = json.dumps(record, sort_keys=True)
                if key not in have:
                    append_record(dest, record)
                    have.add(key)
                    if rel.parent != Path("."):
                        name = f"{rel.parent}/{rel.stem}"
                        added[name] = added.get(name, 0) + 1
    return added
