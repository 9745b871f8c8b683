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


def run_method(task: Task, method: Method, out: Path, progress: bool = True) -> int:
    """Answer every not-yet-recorded sample of ``task`` with ``method``; return how many ran."""
    path = results_path(out, task.name, method.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    done = done_ids(path, task.corpus_fingerprint)
    todo = [s for s in task.samples if s.id not in done]
    bar = tqdm(todo, desc=f"{task.name}/{method.name}", unit="q", disable=not progress,
               initial=len(task.samples) - len(todo), total=len(task.samples))
    for sample in bar:
        reset_ok = memory.reset_peak()
        pred = method.answer(sample)
        mem = {"peak_rss_mb": memory.peak_rss_mb(), "rss_mb": memory.rss_mb(),
               "peak_rss_reset": reset_ok, "peak_gpu_mb": memory.peak_gpu_mb()}
        append_record(path, make_record(task, method.name, sample, pred, mem))
    return len(todo)


def run_task(task: Task, methods: Iterable[str], build: Callable[[str], Method], out: Path,
             progress: bool = True) -> dict[str, int]:
    """Build each method for ``task`` (``build(name)``), run it, close it; samples run per method."""
    ran: dict[str, int] = {}
    for name in methods:
        done = done_ids(results_path(out, task.name, name), task.corpus_fingerprint)
        if all(s.id in done for s in task.samples):
            ran[name] = 0  # nothing to do: do not even build the method
            continue
        method = build(name)
        try:
            ran[name] = run_method(task, method, out, progress)
        finally:
            method.close()
    return ran


def log_invocation(out: Path, info: dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    append_record(Path(out) / "runs.jsonl", info)
