"""The fault suite (marker ``faults``): ``kill -9`` at every seeded crash point of a build and of a
served knowledge job, every kind of on-disk corruption, two concurrent writers, and a request fuzz
from the server's OpenAPI schema. Shares its machinery with ``dmoe bench faults``
(``dmoe.bench.faults``); tiny random model throughout, ~2 minutes on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmoe.bench import faults
from dmoe.faults import POINTS

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def lm():
    import torch

    torch.set_num_threads(1)
    return faults.tiny_lm()


@pytest.fixture(scope="module")
def work(tmp_path_factory, lm) -> Path:
    path = tmp_path_factory.mktemp("faults")
    faults.prepare(path, lm)
    return path


@pytest.fixture(scope="module")
def zygote(lm):
    zyg = faults.Zygote()
    assert zyg.fingerprint == lm.fingerprint
    yield zyg
    zyg.close()


def test_the_plan_covers_every_crash_point_at_least_20_times():
    assert len(faults.KILL_PLAN) >= 20
    assert {point for _, point, _ in faults.KILL_PLAN} == set(POINTS)
    assert {mode for mode, _, _ in faults.KILL_PLAN} == {"build", "job"}


@pytest.mark.parametrize("mode,point,n", faults.KILL_PLAN,
                         ids=[f"{m}-{p}-{n}" for m, p, n in faults.KILL_PLAN])
def test_kill_9_then_restart_check_and_rerun_loses_nothing(zygote, lm, work, mode, point, n):
    result = faults.kill_case(zygote, lm, work, mode, point, n)
    assert result.killed, "the crash point was never reached: the case proves nothing"
    assert result.atomic, "a document was left half old, half new (or the job did not resume)"
    assert result.check_clean, "bank check --deep found problems after the restart"
    assert result.lost == [] and result.final_clean


@pytest.mark.parametrize("kind", faults.CORRUPTIONS)
def test_every_corruption_is_detected_and_repaired_without_loss(lm, work, kind):
    result = faults.corruption_case(lm, work, kind)
    assert result.detected and result.repaired and result.lost == [], result


def test_two_concurrent_writers_the_second_fails_at_once_naming_the_first(lm, work):
    from dmoe.errors import BankLockedError
    from dmoe.training.build import build

    bank = work / "base"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from dmoe.knowledge import KnowledgeBase\n"
         "kb = KnowledgeBase.open(sys.argv[1]); print('writing', flush=True); time.sleep(60)",
         str(bank)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "writing"
        build_config, train_config = faults.configs()
        t0 = time.perf_counter()
        with pytest.raises(BankLockedError, match=f"PID {holder.pid}"):
            build(work / "v2.jsonl", bank, lm, build_config, train_config, progress=False,
                  log=lambda s: None)
        assert time.perf_counter() - t0 < 5  # before any augmentation or training
        cli = subprocess.run([sys.executable, "-m", "dmoe.cli", "bank", "check", "--repair",
                              "--bank", str(bank)], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and f"PID {holder.pid}" in cli.stderr
        assert "Traceback" not in cli.stderr
    finally:
        holder.kill()
        holder.wait()


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(lm, tmp_path):
    pytest.importorskip("hypothesis")
    from dmoe.bench.fuzz import fuzz_server

    result = fuzz_server(lm, tmp_path, cases=500, budget_s=150)
    assert result["fuzz_cases"] >= 500, result
    assert result["fuzz_5xx"] == 0, result["fuzz_5xx_examples"]
    assert result["fuzz_normal_request_after"] == 200
    counts = result["fuzz_status_counts"]
    assert counts.get("200", 0) > 0 and counts.get("400", 0) > 0  # both kinds were exercised
