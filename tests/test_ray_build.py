"""``dmoe build --executor ray`` on a real local Ray cluster (2 CPUs, started here) over a tiny
random Llama saved as a model directory: the same experts as the local build, and a worker killed
mid-build leaves a clean bank that a rerun completes."""

from __future__ import annotations

import json

import pytest
from conftest import dmoe_cli, tiny_model_dir

from dmoe.base_model import load_base_model
from dmoe.bench.build import bank_weights, max_weight_diff
from dmoe.faults import ENV as FAULT_ENV
from dmoe.knowledge import KnowledgeBase
from dmoe.training.build import BuildConfig, build
from dmoe.training.experts import TrainConfig

ray = pytest.importorskip("ray")
from dmoe.training.ray_build import RayBuildError, RayExecutor, worker_model  # noqa: E402

pytestmark = pytest.mark.integration
CONFIG = BuildConfig(chunk_size=2, passage_words=30)
TRAIN = TrainConfig(epochs=2)
DOCS = [{"id": f"doc{i}", "title": f"Town {i}",
         "text": " ".join(f"Town {i} sentence {j} says the river {i * j} flows past mill {j}."
                          for j in range(3 if i % 2 else 6))} for i in range(5)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray")
    model = tiny_model_dir(tmp / "model")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    lm = load_base_model(str(model), "cpu", "fp32", training=True)
    local = build(corpus, tmp / "local", lm, CONFIG, TRAIN, progress=False, log=lambda s: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield tmp, model, corpus, lm, local
    ray.shutdown()


def executor(model, bank, **kw) -> RayExecutor:
    return RayExecutor(worker_model(str(model), "fp32"), bank, CONFIG, TRAIN, **kw)


def bank_check(bank) -> None:
    out = dmoe_cli("bank", "check", "--bank", str(bank))
    stdout, stderr = out.communicate(timeout=120)
    assert out.returncode == 0, stdout + stderr


def test_the_ray_build_trains_the_local_build_experts(setup):
    tmp, model, corpus, lm, local = setup
    with executor(model, tmp / "ray", workers=2) as ex:
        summary = build(corpus, tmp / "ray", lm, CONFIG, TRAIN, progress=False,
                        log=lambda s: None, executor=ex)
    assert summary.experts_trained == local.experts_trained > 2 and not summary.failed
    assert max_weight_diff(bank_weights(tmp / "local"), bank_weights(tmp / "ray")) <= 1e-4
    bank_check(tmp / "ray")
    kb = KnowledgeBase.open(tmp / "ray", readonly=True)
    try:  # the one writer indexed every expert
        assert sorted(kb.index.ids()) == sorted(i.id for i in kb.bank.list())
    finally:
        kb.close()


def test_a_killed_worker_loses_nothing_committed_and_a_rerun_completes(setup, monkeypatch):
    tmp, model, corpus, lm, local = setup
    bank = tmp / "killed"
    first = tmp / "first.jsonl"  # two documents committed before the Ray build starts
    first.write_text("".join(json.dumps(d) + "\n" for d in DOCS[:2]))
    before = build(first, bank, lm, CONFIG, TRAIN, progress=False, log=lambda s: None)
    monkeypatch.setenv(FAULT_ENV, "bank.staged:3")  # each worker process dies at its 3rd file
    with executor(model, bank, workers=1, max_retries=1) as ex, pytest.raises(RayBuildError):
        build(corpus, bank, lm, CONFIG, TRAIN, progress=False, log=lambda s: None, executor=ex)
    monkeypatch.delenv(FAULT_ENV)
    bank_check(bank)  # what was committed is whole; the dead attempts' files are quarantined
    kept = bank_weights(bank)  # (chunks finished before the death may or may not have been committed)
    assert set(before.expert_ids) <= kept.keys() and len(kept) < local.experts_trained
    with executor(model, bank, workers=2) as ex:
        rerun = build(corpus, bank, lm, CONFIG, TRAIN, progress=False, log=lambda s: None,
                      executor=ex)
    assert rerun.experts_reused == len(kept)
    assert rerun.experts_trained == local.experts_trained - len(kept)
    assert max_weight_diff(bank_weights(tmp / "local"), bank_weights(bank)) <= 1e-4
    bank_check(bank)


def test_cli_refuses_ray_options_without_ray(tmp_path):
    out = dmoe_cli("build", str(tmp_path / "corpus.jsonl"), "--bank", str(tmp_path / "bank"),
                   "--workers", "2")
    _, stderr = out.communicate(timeout=120)
    assert out.returncode == 2 and "--executor ray" in stderr and "Traceback" not in stderr
