"""Bank benchmark: a bank of N synthetic experts, opened and read the way ``dmoe serve`` does.

    dmoe bench bank --n 100000 --json

What is built (once per ``--path``; an interrupted build resumes where it stopped):

- experts of the packaged SmolLM2-135M's shape (rank-4 LoRA on the last layer's gate, up and down
  projections: 4 x (576 + 1536) x 3 = 25,344 parameters) with random weights, stored in the bank's
  dtype (``--dtype``, default float16: 51 kB a file), each with a synthetic ~250-word surrogate
  (``dmoe.bench.router.SyntheticCorpus``), written through the bank's own ``stage`` +
  ``commit_document`` (a document of ``--doc-size`` experts per transaction), and the router index
  built from the bank's surrogates in one commit;
- the same at ``--n-small`` (default 1,000) experts, for the memory ratio.

What is measured, each in a fresh process (``multiprocessing`` spawn) on each bank:

- ``open_s``: ``KnowledgeBase.open`` as ``dmoe serve`` runs it: lock, open the database, open the
  index, move away leftovers of interrupted writes (a listing of ``experts/``) and reconcile the
  index with the bank; ``bank_open_s`` is ``ExpertBank.open`` alone;
- ``expert_load_p*_ms_cold``: ``n_loads`` random distinct experts, each loaded through the
  server's expert cache (a miss: row lookup, file read, checksum, tensors) right after its file
  was evicted from the OS page cache (``posix_fadvise(DONTNEED)``); ``..._warm``: the same experts
  again straight from the bank, their files now in the page cache;
- ``rss_mb``: resident memory (VmRSS) of that process after opening, 200 routed queries and the
  loads (the base model, the same for any bank, is not loaded); ``peak_rss_mb``: its high-water
  mark; ``rss_ratio_100k_vs_1k``: ``rss_mb`` of the big bank over the small one's. VmRSS is the
  sum of ``rss_anon_mb`` (the process's own memory; ``rss_anon_ratio`` compares it) and
  ``rss_file_mb`` (file pages mapped into it: the router index is memory-mapped, so the index
  pages the queries touched count here; they are the kernel's page cache, shared and reclaimable);
  with ``model`` (``--with-model [SPEC]``) each process then also loads the base model, as a
  ``dmoe serve`` process holds it: ``rss_mb_with_model`` and ``rss_ratio_with_model``;
- ``list_dir_s``: one ``os.scandir`` of ``experts/``; ``bytes_per_expert``: file size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dmoe.bench.router import SyntheticCorpus, _ms, expert_id
from dmoe.experts.bank import ExpertBank
from dmoe.experts.lora import LoraSpec, random_expert
from dmoe.knowledge import INDEX_DIR, KnowledgeBase
from dmoe.routing.bm25 import BM25Index

FINGERPRINT = "bench-synthetic"
LAST_LAYER = 29  # SmolLM2-135M: 30 decoder layers
SHAPES = {(LAST_LAYER, "gate_proj"): (1536, 576), (LAST_LAYER, "up_proj"): (1536, 576),
          (LAST_LAYER, "down_proj"): (576, 1536)}


def build_bank(path: Path, n: int, *, dtype: str = "float16", doc_size: int = 10, seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """Fill ``path`` with ``n`` synthetic experts (resuming a partial bank); index them."""
    spec = LoraSpec()
    kb = KnowledgeBase.open_or_create(path, FINGERPRINT, "synthetic SmolLM2-135M shape", spec,
                                      dtype=dtype)
    try:
        bank = kb.bank
        corpus = SyntheticCorpus(n, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        done = len(bank)
        start = done - done % doc_size  # the last document is rewritten whole
        bar = tqdm(total=n, initial=start, desc=f"bank {path.name}", unit="expert",
                   disable=not progress, mininterval=2)
        t0 = time.perf_counter()
        for first in range(start, n, doc_size):
            doc_id = f"doc-{first // doc_size:07d}"
            staged = []
            for i in range(first, min(first + doc_size, n)):
                expert = random_expert(corpus.ids[i], SHAPES, spec, generator)
                staged.append(bank.stage(expert, unit_id=f"{doc_id}#{i - first}",
                                         content_hash=f"synthetic-{i}", settings_hash="synthetic",
                                         surrogate=corpus.surrogate(i), doc_id=doc_id))
            bank.commit_document(doc_id, staged)
            bar.update(len(staged))
        bar.close()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kb.sync()  # the index, from the bank's surrogates, in one commit
        return {"n": len(bank), "written": n - start, "write_s": round(write_s, 1),
                "index_s": round(time.perf_counter() - t0, 1)}
    finally:
        kb.close()


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _random_ids(n: int, count: int, seed: int) -> list[str]:
    """``count`` distinct random ids of a synthetic bank of ``n`` (``build_bank`` gives expert
    ``i`` the id ``expert_id(i)``)."""
    rng = np.random.default_rng(seed)
    return [expert_id(int(i)) for i in rng.choice(n, size=min(count, n), replace=False)]


def probe(path: str, n_loads: int, seed: int, model: str | None = None) -> dict[str, Any]:
    """One serving process's view of the bank at ``path`` (run in a fresh process); with
    ``model``, the process then loads that base model too, as ``dmoe serve`` holds it."""
    torch.set_num_threads(1)
    rss_start = _rss_mb()
    t0 = time.perf_counter()
    ExpertBank.open(path, FINGERPRINT, readonly=True).close()
    bank_open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kb = KnowledgeBase.open(path, FINGERPRINT)
    open_s = time.perf_counter() - t0
    try:
        rss_open = _rss_mb()
        n = len(kb.bank)
        corpus = SyntheticCorpus(1, seed=seed + 1)
        router = kb.router()
        route_ms = []
        for _ in range(200):
            text = " ".join(corpus.vocab[corpus.background(90)])
            t1 = time.perf_counter()
            router.route(text, 3)
            route_ms.append(time.perf_counter() - t1)
        ids = _random_ids(n, n_loads, seed)
        cold, warm = [], []
        for expert_id in ids:
            _evict(kb.bank.experts_dir / kb.bank.info(expert_id).file)
            t1 = time.perf_counter()
            kb.experts.get(expert_id)
            cold.append(time.perf_counter() - t1)
        for expert_id in ids:
            t1 = time.perf_counter()
            kb.bank.get(expert_id)
            warm.append(time.perf_counter() - t1)
        t0 = time.perf_counter()
        n_files = sum(1 for _ in os.scandir(kb.bank.experts_dir))
        list_dir_s = time.perf_counter() - t0
        result: dict[str, Any] = {"n": n, "open_s": round(open_s, 3), "bank_open_s": round(bank_open_s, 4),
                "expert_load_p50_ms_cold": _ms(cold, 50), "expert_load_p99_ms_cold": _ms(cold, 99),
                "expert_load_p50_ms_warm": _ms(warm, 50), "expert_load_p99_ms_warm": _ms(warm, 99),
                "route_p50_ms": _ms(route_ms, 50), "rss_mb": _rss_mb(),
                "rss_anon_mb": _rss_mb("RssAnon"), "rss_file_mb": _rss_mb("RssFile"),
                "peak_rss_mb": _rss_mb("VmHWM"), "rss_mb_after_open": rss_open,
                "rss_mb_at_start": rss_start, "list_dir_s": round(list_dir_s, 3),
                "n_files": n_files, "bytes_per_expert": kb.bank.info(ids[0]).bytes}
        if model is not None:  # after every bank number: the model adds the same to any bank
            from dmoe.base_model import load_base_model

            lm = load_base_model(model or None, "cpu")
            result.update(rss_mb_with_model=_rss_mb(), model_weights=lm.weights)
        return result
    finally:
        kb.close()


def _probe_fresh(path: Path, n_loads: int, seed: int, model: str | None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(probe, (str(path), n_loads, seed, model))


def bench_bank(n: int = 100_000, *, n_small: int = 1_000, n_loads: int = 1_000,
               dtype: str = "float16", doc_size: int = 10, seed: int = 0,
               path: str | Path | None = None, progress: bool = True,
               model: str | None = None) -> dict[str, Any]:
    """Build (or resume) banks of ``n`` and ``n_small`` synthetic experts under ``path`` and probe
    both; see the module docstring. Without ``path`` they go to a temporary directory, removed
    afterwards."""
    if n_small <= 0 or n < n_small or n_loads <= 0 or doc_size <= 0:
        raise ValueError(f"need 0 < n_small <= n and n_loads, doc_size > 0; got {n=}, "
                         f"{n_small=}, {n_loads=}, {doc_size=}")
    tmp = None if path is not None else tempfile.mkdtemp(prefix="dmoe-bench-bank-")
    root = Path(path if path is not None else tmp)  # type: ignore[arg-type]
    try:
        builds = {size: build_bank(root / f"bank-{size}", size, dtype=dtype, doc_size=doc_size,
                                   seed=seed, progress=progress) for size in (n_small, n)}
        small = _probe_fresh(root / f"bank-{n_small}", n_loads, seed, model)
        big = _probe_fresh(root / f"bank-{n}", n_loads, seed, model)
        if model is not None:
            big["rss_ratio_with_model"] = round(big["rss_mb_with_model"]
                                                / small["rss_mb_with_model"], 3)
        index = root / f"bank-{n}" / INDEX_DIR
        with BM25Index.open(index, readonly=True) as ix:
            index_bytes = ix.stats()["index_bytes"]
        return {
            "n_experts": n,
            **{k: v for k, v in big.items() if k != "n"},
            f"rss_ratio_{_short(n)}_vs_{_short(n_small)}": round(big["rss_mb"] / small["rss_mb"], 3),
            "rss_anon_ratio": round(big["rss_anon_mb"] / small["rss_anon_mb"], 3),
            "peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "index_bytes": index_bytes,
            "small": small,
            "build": {str(k): v for k, v in builds.items()},
            "layout": "one safetensors file per expert in experts/, rows in bank.sqlite",
            "method": {"dtype": dtype, "doc_size": doc_size, "n_loads": n_loads, "seed": seed,
                       "shape": "SmolLM2-135M last layer, rank 4 (gate, up, down)",
                       "cold": "file evicted from the page cache (posix_fadvise DONTNEED), "
                               "expert-cache miss",
                       "warm": "same experts again, files in the page cache, no expert cache",
                       "rss": "fresh process: open + 200 routed queries + the loads; no model"},
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _short(n: int) -> str:
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmoe.bench.bank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_bank(args.n)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
