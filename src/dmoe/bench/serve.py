"""Serving benchmark: a real ``dmoe serve`` process on loopback, driven by the OpenAI client.

How it measures (printed with the numbers):

- the server is started as its own process (``dmoe serve`` on a free loopback port, a fresh empty
  bank, ``--max-batch``), so the load generator's threads do not share its interpreter;
- **throughput**: the same ``n_requests`` chat requests (``max_tokens`` each, greedy, EOS allowed)
  sent one after another (``serial``), then from ``concurrency`` client threads at once
  (``concurrent``); tokens/s = completion tokens (from ``usage``) / wall time of the whole phase;
- **latency**: ``n_probes`` short requests (``probe_tokens``) one after another with the server
  otherwise idle: p50 and p99 of their wall times;
- **during a build**: ``build_docs`` SQuAD paragraphs posted to ``/v1/knowledge`` (the server
  builds them in its worker process), then the same short requests one after another for as long
  as the job runs (so they sample the whole build: start-up, augmentation, training, commits;
  bounded by ``build_timeout``); p99 of their wall times over the idle p99;
- ``errors``: requests that raised or came back with an error (every phase); must be 0.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dmoe.bench.decode import PROMPTS
from dmoe.eval.datasets import data_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _squad_docs(n: int) -> list[dict[str, str]]:
    squad = json.loads((data_dir() / "squad/squad_dev_v1.1.json").read_text())
    docs = []
    for article in squad["data"]:
        for i, para in enumerate(article["paragraphs"][:2]):
            docs.append({"id": f"{article['title']}-{i}", "title": article["title"],
                         "text": para["context"]})
            if len(docs) == n:
                return docs
    return docs


class _Server:
    """``dmoe serve`` in a child process, stopped on exit."""

    def __init__(self, bank: Path, model: str | None, max_batch: int, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from dmoe.cli import main; raise SystemExit(main())",
               "serve", "--bank", str(bank), "--port", str(self.port), "--log-level", "warning",
               "--max-batch", str(max_batch)] + (["--model", model] if model else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dmoe serve exited with {self.proc.returncode}; the end of "
                                   f"its log:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("dmoe serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bench_serve(model: str | None = None, n_requests: int = 16, max_tokens: int = 32,
                concurrency: int = 8, n_probes: int = 40, probe_tokens: int = 8,
                build_docs: int = 20, max_batch: int = 8,
                build_timeout: float = 1800.0) -> dict[str, Any]:
    try:
        import httpx
        import openai
    except ImportError as e:
        raise RuntimeError("dmoe bench serve needs the openai client: pip install openai") from e

    errors = [0]
    errors_lock = threading.Lock()  # ask() runs on several client threads

    with tempfile.TemporaryDirectory(prefix="dmoe-bench-serve-") as tmp:
        server = _Server(Path(tmp) / "bank", model, max_batch, Path(tmp) / "serve.log")
        try:
            server.wait_ready()
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                   timeout=300)

            def ask(i: int, tokens: int) -> tuple[float, int]:
                t0 = time.perf_counter()
                try:
                    r = client.chat.completions.create(
                        model="dmoe", max_tokens=tokens,
                        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
                    n = r.usage.completion_tokens if r.usage else 0
                except Exception:
                    with errors_lock:
                        errors[0] += 1
                    n = 0
                return time.perf_counter() - t0, n

            for i in range(2):  # warm-up
                ask(i, probe_tokens)

            def phase(workers: int) -> float:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    done = list(pool.map(lambda i: ask(i, max_tokens), range(n_requests)))
                return sum(n for _, n in done) / (time.perf_counter() - t0)

            serial = phase(1)
            concurrent = phase(concurrency)
            idle = [ask(i, probe_tokens)[0] for i in range(n_probes)]

            docs = _squad_docs(build_docs)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                posted = http.post("/v1/knowledge", json={"documents": docs})
                if posted.status_code != 202:
                    raise RuntimeError(f"POST /v1/knowledge: {posted.status_code} {posted.text}")
                job = posted.json()
                during: list[float] = []
                deadline = time.time() + build_timeout
                status = job["status"]
                while status not in ("succeeded", "failed") and time.time() < deadline:
                    during.append(ask(len(during), probe_tokens)[0])
                    status = http.get(f"/v1/jobs/{job['id']}").json()["status"]
                job = http.get(f"/v1/jobs/{job['id']}").json()
        finally:
            server.stop()

    p99_idle = _percentile(idle, 0.99)
    p99_build = _percentile(during, 0.99) if during else None
    return {
        "model": model or "packaged SmolLM2-135M-Instruct", "max_batch": max_batch,
        "n_requests": n_requests, "max_tokens": max_tokens, "concurrency": concurrency,
        "throughput_tok_s_serial": round(serial, 2),
        f"throughput_tok_s_concurrent{concurrency}": round(concurrent, 2),
        f"ratio_concurrent{concurrency}_vs_serial": round(concurrent / serial, 3),
        "probe_tokens": probe_tokens, "n_probes_idle": len(idle),
        "p50_ms_idle": round(statistics.median(idle) * 1e3, 1),
        "p99_ms_idle": round(p99_idle * 1e3, 1),
        "build_docs": build_docs, "build_status": job["status"],
        "build_seconds": round((job.get("finished") or time.time()) - (job.get("started")
                                                                        or time.time()), 1),
        "n_probes_during_build": len(during),
        "p99_ms_during_build": None if p99_build is None else round(p99_build * 1e3, 1),
        "ratio_p99_during_build_vs_idle": None if p99_build is None
        else round(p99_build / p99_idle, 3),
        "errors": errors[0],
        "method": "dmoe serve in its own process on loopback, OpenAI client; throughput = "
                  "completion tokens / phase wall time, same requests serial vs concurrent; "
                  "latencies = wall time of short sequential requests, idle vs during a "
                  "background build of build_docs SQuAD paragraphs (worker process)",
    }
