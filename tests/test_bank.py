import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from dmoe.errors import BankError, WrongBaseModelError
from dmoe.experts.bank import ExpertBank
from dmoe.experts.cache import ExpertCache
from dmoe.experts.lora import Expert, LoraSpec, random_expert

SPEC = LoraSpec(rank=4, alpha=16)
SHAPES = {(1, "gate_proj"): (96, 64), (1, "up_proj"): (96, 64), (1, "down_proj"): (64, 96)}
TOL = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2}


def _expert(expert_id: str, seed: int = 0) -> Expert:
    return random_expert(expert_id, SHAPES, SPEC, torch.Generator().manual_seed(seed), std=0.1)


def _add(bank: ExpertBank, expert: Expert, content: str = "c", settings: str = "s") -> None:
    bank.add(expert, unit_id=f"unit:{expert.id}", content_hash=content, settings_hash=settings,
             surrogate=f"text of {expert.id}", title="T", meta={"k": 1})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    ids = ["plain", "../../escape", "a/b\\c", "ünï cödé ✓", ""]
    with ExpertBank.create(tmp_path / "b", "fp-1", "tiny", SPEC, dtype) as bank:
        for i, expert_id in enumerate(ids):
            _add(bank, _expert(expert_id, i), content=f"h{i}")
    bank = ExpertBank.open(tmp_path / "b", expected_fingerprint="fp-1")
    assert (bank.dtype, bank.spec, bank.model_name, len(bank)) == (dtype, SPEC, "tiny", len(ids))
    for i, expert_id in enumerate(ids):
        got, want = bank.get(expert_id), _expert(expert_id, i)
        assert got.id == expert_id and got.spec == SPEC
        for k, v in want.weights.items():
            assert got.weights[k].dtype == getattr(torch, dtype)
            torch.testing.assert_close(got.weights[k].float(), v, atol=TOL[dtype], rtol=TOL[dtype])
        info = bank.info(expert_id)
        assert (info.unit_id, info.content_hash, info.title, info.meta) == (f"unit:{expert_id}", f"h{i}", "T", {"k": 1})
        assert info.bytes == (bank.experts_dir / info.file).stat().st_size
    files = list((tmp_path / "b" / "experts").iterdir())
    assert len(files) == len(ids) and all(f.parent == tmp_path / "b" / "experts" for f in files)
    assert bank.has("h1", "s") == "../../escape" and bank.has("h1", "other") is None
    assert bank.surrogates()["a/b\\c"] == "text of a/b\\c" == bank.surrogate("a/b\\c")
    assert [i.id for i in bank.list()] == sorted(ids)
    cache = ExpertCache(bank.loader(), capacity=2)
    assert cache(["plain", "plain"])[0].id == "plain" and cache.hits == 1


def test_delete_and_update_touch_one_expert(tmp_path):
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    for i in range(3):
        _add(bank, _expert(f"e{i}", i))
    keep = {i.id: i.file for i in bank.list()}
    bank.delete("e1")
    assert bank.ids() == ["e0", "e2"] and not (bank.experts_dir / keep["e1"]).exists()
    with pytest.raises(KeyError):
        bank.get("e1")
    new = _expert("e0", seed=99)
    bank.update(new, unit_id="u", content_hash="c2", settings_hash="s", surrogate="new text")
    torch.testing.assert_close(bank.get("e0").weights, new.weights)
    assert bank.info("e0").content_hash == "c2" and bank.surrogates()["e0"] == "new text"
    assert not (bank.experts_dir / keep["e0"]).exists()  # the replaced file is gone
    assert bank.info("e2").file == keep["e2"] and bank.check().ok
    with pytest.raises(BankError, match="already"):
        _add(bank, _expert("e2"))


def test_refuses_a_bank_for_another_model(tmp_path):
    ExpertBank.create(tmp_path, "aaaa1111", "model-A", SPEC).close()
    with pytest.raises(WrongBaseModelError, match="aaaa1111.*bbbb2222"):
        ExpertBank.open(tmp_path, expected_fingerprint="bbbb2222")
    with pytest.raises(BankError, match="already holds"):
        ExpertBank.create(tmp_path, "aaaa1111", "model-A", SPEC)
    with pytest.raises(BankError, match="not an expert bank"):
        ExpertBank.open(tmp_path / "nowhere")


def test_check_and_repair_orphans_and_missing_files(tmp_path):
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    for i in range(3):
        _add(bank, _expert(f"e{i}", i))
    (bank.experts_dir / "deadbeef-00000000.safetensors").write_bytes(b"orphan")
    (bank.experts_dir / ".tmp-123.safetensors").write_bytes(b"half")
    (bank.experts_dir / bank.info("e1").file).unlink()
    report = bank.check()
    assert report.orphan_files == ["deadbeef-00000000.safetensors"]
    assert report.temp_files == [".tmp-123.safetensors"] and report.missing_files == ["e1"]
    with pytest.raises(BankError, match="missing"):
        bank.get("e1")
    assert bank.repair().missing_files == ["e1"]
    assert bank.check().ok and bank.ids() == ["e0", "e2"]


# -- resumable build -----------------------------------------------------------------------------

N_UNITS = 7


def build(bank_dir: str, kill_at_write: int = 0) -> dict[str, list[str]]:
    """A tiny build through train_into_bank; optionally SIGKILLs itself right after the
    ``kill_at_write``-th expert file is written, before its row is committed (the worst moment)."""
    from dmoe.augment.types import TrainingExample
    from dmoe.training.builder import ExpertJob, train_into_bank
    from dmoe.training.experts import TrainConfig

    model = tiny_model("llama", layers=2)
    config = TrainConfig(lr=1e-2, epochs=2, loss_on="all")
    jobs = [ExpertJob(f"unit {u}", (TrainingExample("", f"Town {u} has {u + 3} green towers."),),
                      content_hash=f"hash{u}", surrogate=f"town {u}") for u in range(N_UNITS)]
    bank = ExpertBank.open_or_create(bank_dir, "fp-tiny", "tiny", config.spec)
    if kill_at_write:
        write, count = bank._write_file, [0]

        def write_then_die(expert):
            out = write(expert)
            count[0] += 1
            if count[0] == kill_at_write:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        bank._write_file = write_then_die  # type: ignore[method-assign]
    report = train_into_bank(model, CharTokenizer(), jobs, bank, config, chunk_size=2)
    return {"trained": report.trained, "skipped": report.skipped,
            "repaired": report.repaired.orphan_files}


def test_build_resumes_after_sigkill(tmp_path):
    bank_dir = tmp_path / "bank"
    here = Path(__file__).parent
    src = here.parent / "src"
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(src)!r}]\n"
            f"from test_bank import build; build({str(bank_dir)!r}, kill_at_write=4)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    bank = ExpertBank.open(bank_dir, expected_fingerprint="fp-tiny")
    report = bank.check()  # chunk 1 and half of chunk 2 stored; the 4th file has no row
    assert len(bank) == 3 and len(report.orphan_files) == 1 and not report.missing_files
    bank.close()
    done = build(str(bank_dir))  # rerun: repairs, skips what is stored, trains the rest
    assert len(done["repaired"]) == len(report.orphan_files)
    assert sorted(done["trained"] + done["skipped"]) == [f"unit {u}" for u in range(N_UNITS)]
    assert len(done["skipped"]) == 3
    bank = ExpertBank.open(bank_dir)
    assert len(bank) == N_UNITS and bank.check().ok
    again = build(str(bank_dir))
    assert again["trained"] == [] and len(again["skipped"]) == N_UNITS
    clean = build(str(tmp_path / "clean"))
    assert len(clean["trained"]) == N_UNITS
    ref = ExpertBank.open(tmp_path / "clean")
    for expert_id in ref.ids():  # the resumed bank holds the same experts as an unbroken build
        torch.testing.assert_close(bank.get(expert_id).weights, ref.get(expert_id).weights,
                                   atol=1e-5, rtol=1e-4)
