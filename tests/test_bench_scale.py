"""The scale benchmarks at toy sizes: they build what they say, resume, and report their keys."""

from __future__ import annotations

import json
from pathlib import Path

from dmoe.bench.bank import FINGERPRINT, bench_bank, build_bank
from dmoe.experts.bank import ExpertBank
from dmoe.knowledge import check_knowledge


def test_bench_bank_builds_resumes_and_reports(tmp_path: Path) -> None:
    from conftest import tiny_model_dir

    model = str(tiny_model_dir(tmp_path / "model"))
    result = bench_bank(60, n_small=20, n_loads=15, doc_size=7, path=tmp_path, progress=False,
                        model=model)
    assert result["rss_mb_with_model"] > result["rss_mb"] and result["rss_ratio_with_model"] > 0
    for key in ["open_s", "rss_mb", "expert_load_p50_ms_cold", "expert_load_p50_ms_warm",
                "expert_load_p99_ms_cold", "bytes_per_expert", "rss_ratio_60_vs_20", "rss_anon_ratio"]:
        assert key in result, key
    assert result["n_experts"] == 60 and result["n_files"] == 60 and result["small"]["n"] == 20
    assert 0.5 < result["rss_ratio_60_vs_20"] < 2
    # float16 rank-4 experts of SmolLM2's last layer: 25,344 parameters, 2 bytes each + header
    assert 2 * 25_344 < result["bytes_per_expert"] < 2 * 25_344 + 4096
    json.dumps(result)
    report = check_knowledge(tmp_path / "bank-60", deep=True)
    assert report.ok, report.to_dict()

    # a partial build (interrupted after 3 documents) resumes: the rest is written, nothing twice
    partial = tmp_path / "partial"
    build_bank(partial, 21, doc_size=7, progress=False)
    with ExpertBank.open(partial, FINGERPRINT) as bank:
        first = {i.id: i.file for i in bank.list()}
    again = build_bank(partial, 60, doc_size=7, progress=False)
    assert again["written"] == 39 and again["n"] == 60
    with ExpertBank.open(partial, FINGERPRINT) as bank:
        assert all(bank.info(i).file == f for i, f in first.items())  # untouched
        assert len(bank) == 60
    assert check_knowledge(partial, deep=True).ok


def test_bench_recompute_partial_equals_reprefill_on_a_tiny_model(tmp_path: Path) -> None:
    from conftest import tiny_model_dir

    from dmoe.bench.recompute import bench_recompute

    result = bench_recompute(str(tiny_model_dir(tmp_path / "m")), n_layers=(1, 2),
                             prompt_tokens=24, repeats=2)
    assert result["layers"] == 2 and set(result["by_expert_layers"]) == {"1", "2"}
    for arm in result["by_expert_layers"].values():
        assert arm["max_abs_logit_diff"] <= 1e-4 and arm["partial_ms"] > 0
