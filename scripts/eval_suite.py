"""Every method on every benchmark in one go: train the artefacts, answer in parallel, merge, report.

Reads top to bottom:

1. **build**: for each dataset, the artefacts its parametric methods need, trained from that
   dataset's corpus by ``scripts/build_eval_bank.py`` (per-passage expert bank for dmoe/prag/
   prag_combine, one corpus-wide LoRA for sft_lora, a latent pool for poly_prag), into
   ``BANKS/<dataset>/``. CWQ's corpus (the Wikipedia pool) is a subset of StrategyQA's (its
   question facts + the same pool), so StrategyQA starts from a copy of CWQ's finished bank and only
   trains its own facts (the builder skips experts already there).
2. **answer**: ``dmoe eval`` workers, ``--shards`` per dataset, each answering every ``N``-th
   question of the selection with every method (interleaved per question) over the whole corpus,
   ``--workers`` at a time, each into ``OUT/shards/<dataset>-<k>/``.
3. **merge + report**: the shards' per-sample records are concatenated into
   ``OUT/<dataset>/<method>.jsonl`` and ``dmoe eval --report-only`` writes summary.json,
   tables.md and the plot.

Every step resumes: a bank build skips finished experts, a worker skips answered questions, the
merge is rebuilt from the shards. Logs go to ``OUT/logs/``. Timings of the phases are printed as
JSON at the end.

    PYTHONPATH=src python scripts/eval_suite.py --out results/run --banks /tmp/banks \
        --datasets knowledge_conflicts,squad --limit 300 --workers 8 --shards 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = "dmoe,prag,prag_combine,sft_lora,poly_prag,base,rag,flare"
ALL_DATASETS = "knowledge_conflicts,hotpotqa,squad,strategyqa,cwq"
NEEDS_BANK = {"dmoe", "prag", "prag_combine"}


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with output to ``log``; raise with the log's tail if it fails; return seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({code}); {log}:\n{tail}")
    return time.perf_counter() - t0


def artefacts(banks: Path, dataset: str) -> dict[str, Path]:
    d = banks / dataset
    return {"bank": d / "bank", "sft": d / "sft_lora.safetensors", "poly": d / "poly"}


def build(dataset: str, methods: set[str], args: argparse.Namespace, logs: Path) -> float:
    paths = artefacts(args.banks, dataset)
    cmd = [sys.executable, "scripts/build_eval_bank.py", "--dataset", dataset,
           "--limit", str(args.limit), "--offset", str(args.offset)]
    if methods & NEEDS_BANK:
        cmd += ["--bank", str(paths["bank"])]
    else:
        cmd += ["--no-bank"]
    if "sft_lora" in methods:
        cmd += ["--sft-lora", str(paths["sft"])]
    if "poly_prag" in methods:
        cmd += ["--poly", str(paths["poly"])]
    return run_logged(cmd, logs / f"build-{dataset}.log")


def answer(dataset: str, k: int, methods: list[str], args: argparse.Namespace, logs: Path) -> float:
    paths = artefacts(args.banks, dataset)
    cmd = [sys.executable, "-m", "dmoe.cli", "eval", "--methods", ",".join(methods),
           "--datasets", dataset, "--limit", str(args.limit), "--offset", str(args.offset),
           "--shard", f"{k}/{args.shards}", "--out", str(args.out / "shards" / f"{dataset}-{k}"),
           "--no-progress", *sum((["--set", s] for s in args.overrides), [])]
    if set(methods) & NEEDS_BANK:
        cmd += ["--bank", str(paths["bank"])]
    if "sft_lora" in methods:
        cmd += ["--sft-lora", str(paths["sft"])]
    if "poly_prag" in methods:
        cmd += ["--poly", str(paths["poly"])]
    return run_logged(cmd, logs / f"eval-{dataset}-{k}.log")


def merge(out: Path, datasets: list[str]) -> dict[str, int]:
    """Concatenate every shard's records into ``OUT/<dataset>/<method>.jsonl`` (atomic per file)."""
    counts: dict[str, int] = {}
    for dataset in datasets:
        shards = sorted((out / "shards").glob(f"{dataset}-*"))
        methods = sorted({p.stem for s in shards for p in (s / dataset).glob("*.jsonl")})
        for method in methods:
            lines = []
            for s in shards:
                p = s / dataset / f"{method}.jsonl"
                if p.is_file():
                    lines += [ln for ln in p.read_text(encoding="utf-8").splitlines(True)
                              if ln.endswith("\n")]
            dest = out / dataset / f"{method}.jsonl"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, dest)
            counts[f"{dataset}/{method}"] = len(lines)
    runs = [ln for s in sorted((out / "shards").glob("*")) if (s / "runs.jsonl").is_file()
            for ln in (s / "runs.jsonl").read_text(encoding="utf-8").splitlines(True)]
    (out / "runs.jsonl").write_text("".join(runs), encoding="utf-8")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="results directory")
    ap.add_argument("--banks", required=True, type=Path, help="where trained artefacts go")
    ap.add_argument("--methods", default=ALL_METHODS, help=f"default {ALL_METHODS}")
    ap.add_argument("--datasets", default=ALL_DATASETS, help=f"default {ALL_DATASETS}")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="eval workers at a time (default: half the CPU count)")
    ap.add_argument("--build-workers", type=int, default=2, help="bank builds at a time")
    ap.add_argument("--shards", type=int, default=1, help="workers per dataset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="method knob for every worker (dmoe eval --set)")
    ap.add_argument("--skip-build", action="store_true", help="use the artefacts already there")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    datasets = [d for d in args.datasets.split(",") if d]
    logs = args.out / "logs"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    trained = set(methods) & (NEEDS_BANK | {"sft_lora", "poly_prag"})
    if trained and not args.skip_build:
        first = [d for d in datasets if d != "strategyqa"]
        with ThreadPoolExecutor(args.build_workers) as pool:
            for d, s in zip(first, pool.map(lambda d: build(d, trained, args, logs), first),
                            strict=True):
                timings[f"build_{d}_s"] = round(s, 1)
        if "strategyqa" in datasets:
            cwq, sqa = artefacts(args.banks, "cwq")["bank"], artefacts(args.banks, "strategyqa")["bank"]
            if cwq.is_dir() and not sqa.exists():
                shutil.copytree(cwq, sqa)  # the Wikipedia pool's experts; only the facts are new
            timings["build_strategyqa_s"] = round(build("strategyqa", trained, args, logs), 1)
    timings["build_s"] = round(time.perf_counter() - t0, 1)

    t1 = time.perf_counter()
    jobs = [(d, k) for d in datasets for k in range(args.shards)]
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda job: answer(job[0], job[1], methods, args, logs), jobs))
    timings["answer_s"] = round(time.perf_counter() - t1, 1)

    counts = merge(args.out, datasets)
    run_logged([sys.executable, "-m", "dmoe.cli", "eval", "--report-only", "--out", str(args.out),
                "--datasets", ",".join(datasets)], logs / "report.log")
    print(json.dumps({"timings": timings, "records": counts}, indent=1))


if __name__ == "__main__":
    main()
