import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from dmoe.errors import BankDatabaseError, BankError, BankLockedError, WrongBaseModelError
from dmoe.experts.bank import ExpertBank
from dmoe.experts.cache import ExpertCache
from dmoe.experts.integrity import check_bank
from dmoe.experts.lora import Expert, LoraSpec, random_expert

SPEC = LoraSpec(rank=4, alpha=16)
SHAPES = {(1, "gate_proj"): (96, 64), (1, "up_proj"): (96, 64), (1, "down_proj"): (64, 96)}
TOL = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 5e-3}


def _expert(expert_id: str, seed: int = 0) -> Expert:
    return random_expert(expert_id, SHAPES, SPEC, torch.Generator().manual_seed(seed), std=0.1)


def _add(bank: ExpertBank, expert: Expert, content: str = "c", settings: str = "s") -> None:
    bank.add(expert, unit_id=f"unit:{expert.id}", content_hash=content, settings_hash=settings,
             surrogate=f"text of {expert.id}", title="T", meta={"k": 1})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
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
            assert got.weights[k].dtype == (torch.float32 if dtype == "int8" else getattr(torch, dtype))
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


def test_convert_bank_keeps_everything_but_the_storage_dtype_and_resumes(tmp_path):
    from dmoe.experts.bank import convert_bank

    with ExpertBank.create(tmp_path / "src", "fp-1", "tiny", SPEC) as bank:
        for i in range(5):
            _add(bank, _expert(f"e{i}", i), content=f"h{i}")
    assert convert_bank(tmp_path / "src", tmp_path / "q8", "int8") == 5
    with ExpertBank.open(tmp_path / "q8") as q8:  # as if interrupted before e1 and e3
        q8.delete("e1")
        q8.delete("e3")
    seen: list[int] = []
    assert convert_bank(tmp_path / "src", tmp_path / "q8", "int8", progress=seen.append) == 2
    assert sum(seen) == 5
    with ExpertBank.open(tmp_path / "src", readonly=True) as src, \
            ExpertBank.open(tmp_path / "q8", readonly=True) as q8:
        assert (q8.dtype, q8.spec, q8.fingerprint, q8.model_name) == ("int8", SPEC, "fp-1", "tiny")
        assert q8.surrogates() == src.surrogates()
        for a, b in zip(src.list(), q8.list(), strict=True):
            assert (a.id, a.doc_id, a.unit_id, a.content_hash, a.settings_hash, a.title, a.meta) \
                == (b.id, b.doc_id, b.unit_id, b.content_hash, b.settings_hash, b.title, b.meta)
            assert b.dtype == "int8" and b.bytes < 0.6 * a.bytes  # tiny tensors: header-heavy
            for k, v in src.get(a.id).weights.items():
                torch.testing.assert_close(q8.get(a.id).weights[k], v, atol=TOL["int8"], rtol=0)
    assert check_bank(tmp_path / "q8", deep=True).ok
    with pytest.raises(BankError, match="int8 bank, not float16"):
        convert_bank(tmp_path / "src", tmp_path / "q8", "float16")


def test_merge_banks_stores_a_shared_expert_once_refuses_a_clash_and_resumes(tmp_path):
    from dmoe.experts.bank import merge_banks

    for name, ids in (("a", [0, 1, 2]), ("b", [2, 3])):  # e2: one passage in both shards
        with ExpertBank.create(tmp_path / name, "fp-1", "tiny", SPEC, "float16") as bank:
            for i in ids:
                _add(bank, _expert(f"e{i}", i), content=f"h{i}")
    seen: list[int] = []
    assert merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "m", progress=seen.append) == 4
    assert sum(seen) == 5
    with ExpertBank.open(tmp_path / "m", readonly=True) as merged:
        assert (merged.ids(), merged.dtype, merged.fingerprint) == (
            ["e0", "e1", "e2", "e3"], "float16", "fp-1")
        for name, i in (("a", 1), ("b", 3)):
            with ExpertBank.open(tmp_path / name, readonly=True) as src:
                assert merged.info(f"e{i}").content_hash == src.info(f"e{i}").content_hash
                assert merged.surrogate(f"e{i}") == src.surrogate(f"e{i}")
                torch.testing.assert_close(merged.get(f"e{i}").weights, src.get(f"e{i}").weights)
    assert check_bank(tmp_path / "m", deep=True).ok
    assert merge_banks([tmp_path / "a", tmp_path / "b"], tmp_path / "m") == 0  # resumes: all there

    with ExpertBank.create(tmp_path / "c", "fp-1", "tiny", SPEC) as bank:  # e1 from other text
        _add(bank, _expert("e1", 7), content="other")
    with pytest.raises(BankError, match="'e1'.*differs"):
        merge_banks([tmp_path / "c"], tmp_path / "m")
    with ExpertBank.create(tmp_path / "d", "fp-2", "tiny", SPEC) as bank:
        _add(bank, _expert("e9", 9))
    with pytest.raises(WrongBaseModelError):
        merge_banks([tmp_path / "d"], tmp_path / "m")
    with ExpertBank.create(tmp_path / "r8", "fp-1", "tiny", LoraSpec(rank=8, alpha=16)) as bank:
        pass
    with pytest.raises(BankError, match="shape"):
        merge_banks([tmp_path / "r8"], tmp_path / "m")
    with ExpertBank.open(tmp_path / "m", readonly=True) as merged:
        assert merged.ids() == ["e0", "e1", "e2", "e3"]  # nothing written by the refusals


def test_a_replaced_expert_keeps_its_creation_time_through_a_rebuild_from_files(tmp_path,
                                                                               monkeypatch):
    import dmoe.experts.bank as bank_module

    stamps = iter(f"2026-01-01T00:00:{i:02d}Z" for i in range(60))
    monkeypatch.setattr(bank_module, "now", lambda: next(stamps))  # every call a later second
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    _add(bank, _expert("e0", 0))
    first = bank.info("e0").created
    bank.update(_expert("e0", 1), unit_id="u", content_hash="c2", settings_hash="s", surrogate="t")
    want = bank.info("e0")
    assert want.created == first and want.updated > first
    bank.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"bank.sqlite{suffix}").unlink(missing_ok=True)
    assert check_bank(tmp_path, repair=True).rebuilt == 1
    with ExpertBank.open(tmp_path) as back:
        assert back.info("e0") == want


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
    assert bank.info("e2").file == keep["e2"] and check_bank(bank.path, deep=True).ok
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


def test_check_and_repair_quarantine_and_never_delete(tmp_path):
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    for i in range(3):
        _add(bank, _expert(f"e{i}", i))
    (bank.experts_dir / "deadbeef-00000000.safetensors").write_bytes(b"orphan")
    (bank.experts_dir / ".tmp-123.safetensors").write_bytes(b"half")
    (bank.experts_dir / bank.info("e1").file).unlink()
    report = check_bank(tmp_path)
    assert report.orphan_files == ["deadbeef-00000000.safetensors"]
    assert report.temp_files == [".tmp-123.safetensors"] and report.missing_files == ["e1"]
    assert not report.ok and len(list(bank.experts_dir.iterdir())) == 4  # a check changes nothing
    with pytest.raises(BankError, match="missing"):
        bank.get("e1")
    fixed = check_bank(tmp_path, repair=True)
    assert fixed.removed_rows == ["e1"] and len(fixed.quarantined) == 2
    quarantine = tmp_path / "quarantine"
    assert (quarantine / "deadbeef-00000000.safetensors").read_bytes() == b"orphan"  # kept
    assert len((quarantine / "log.jsonl").read_text().splitlines()) == 2
    assert check_bank(tmp_path).ok and bank.ids() == ["e0", "e2"]


def test_checksums_catch_truncation_bit_flips_and_nan(tmp_path):
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    for i in range(4):
        _add(bank, _expert(f"e{i}", i))
    f = {i: bank.experts_dir / bank.info(f"e{i}").file for i in range(4)}
    data = f[0].read_bytes()
    f[0].write_bytes(data[:-100])  # truncated
    flipped = bytearray(f[1].read_bytes())
    flipped[-7] ^= 0x10  # one bit of one weight
    f[1].write_bytes(bytes(flipped))
    nan = _expert("e2", 2)
    next(iter(nan.weights.values()))[0, 0] = float("nan")
    from dmoe.experts.format import write_expert
    record = {"id": "e2"}
    written = write_expert(f[2], nan, "fp", "float32", record)  # a valid file, NaN inside
    bank._db.execute("UPDATE experts SET checksum=?, bytes=? WHERE id='e2'",
                     (written.checksum, written.size))
    shallow = check_bank(tmp_path)
    assert set(shallow.corrupt) == {"e0", "e1"}, shallow.corrupt
    assert "truncated" in shallow.corrupt["e0"] and "checksum" in shallow.corrupt["e1"]
    deep = check_bank(tmp_path, deep=True)
    assert set(deep.corrupt) == {"e0", "e1", "e2"} and "non-finite" in deep.corrupt["e2"]
    for i in range(3):  # loading refuses each of them; e3 is fine
        with pytest.raises(BankError, match="corrupt"):
            bank.get(f"e{i}")
    assert bank.get("e3").id == "e3"
    fixed = check_bank(tmp_path, deep=True, repair=True)
    assert fixed.removed_rows == ["e0", "e1", "e2"] and len(fixed.quarantined) == 3
    assert check_bank(tmp_path, deep=True).ok and bank.ids() == ["e3"]


def test_a_lost_database_is_an_error_then_rebuilt_from_the_files(tmp_path):
    bank = ExpertBank.create(tmp_path, "fp", "tiny", SPEC)
    for i in range(3):
        bank.add(_expert(f"d#{i}", i), unit_id=f"d#{i}", content_hash=f"h{i}", settings_hash="s",
                 surrogate=f"v1 {i}")
    assert bank.document_ids("d") == ["d#0", "d#1", "d#2"]
    bank.commit_document("d", [bank.stage(_expert("d#0", 9), unit_id="d#0", content_hash="new",
                                          settings_hash="s", surrogate="v2", doc_units=["d#0"])])
    assert bank.ids() == ["d#0"]  # the new version has one passage: #1 and #2 are gone
    _add(bank, _expert("other", 5))
    want = {i.id: i for i in bank.list()}
    files_before = sorted(p.name for p in bank.experts_dir.iterdir())
    bank.close()
    (tmp_path / "bank.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"bank.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(BankDatabaseError, match="missing.*--repair"):
        ExpertBank.open(tmp_path, readonly=True)
    assert check_bank(tmp_path).database == "missing"
    assert not (tmp_path / "bank.sqlite").exists()  # reading never writes
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == files_before
    fixed = check_bank(tmp_path, repair=True)
    assert fixed.rebuilt == 2 and not fixed.incomplete_documents
    with ExpertBank.open(tmp_path, "fp") as back:
        assert {i.id: i for i in back.list()} == want
        assert back.surrogate("d#0") == "v2" and back.get("d#0").id == "d#0"
    assert check_bank(tmp_path, deep=True).ok


def test_truncated_database_is_reported_and_rebuilt(tmp_path):
    with ExpertBank.create(tmp_path, "fp", "tiny", SPEC) as bank:
        for i in range(3):
            _add(bank, _expert(f"e{i}", i))
    db = tmp_path / "bank.sqlite"
    db.write_bytes(db.read_bytes()[:1000])
    with pytest.raises(BankDatabaseError, match="unreadable"):
        ExpertBank.open(tmp_path)
    assert check_bank(tmp_path).database.startswith("unreadable")
    assert check_bank(tmp_path, repair=True).rebuilt == 3
    assert any(p.name.startswith("bank.sqlite") for p in (tmp_path / "quarantine").iterdir())
    assert check_bank(tmp_path, deep=True).ok


def test_one_writer_at_a_time(tmp_path):
    ExpertBank.create(tmp_path, "fp", "tiny", SPEC).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path[:0] = [sys.argv[1]]\n"
         "from dmoe.experts.bank import ExpertBank\n"
         "b = ExpertBank.open(sys.argv[2]); print('held', flush=True); time.sleep(60)",
         str(Path(__file__).parent.parent / "src"), str(tmp_path)], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BankLockedError, match=f"PID {holder.pid}"):
            ExpertBank.open(tmp_path)
        with ExpertBank.open(tmp_path, readonly=True) as reader:  # readers never wait
            assert len(reader) == 0
    finally:
        holder.kill()
        holder.wait()
    ExpertBank.open(tmp_path).close()  # the kernel released the dead holder's lock


def test_version_1_bank_is_refused_then_migrated(tmp_path):
    import json
    import sqlite3

    from dmoe.experts.format import save_expert
    from dmoe.experts.integrity import migrate_bank
    # a bank as dmoe 0.1 wrote it: version 1, no doc_id/checksum columns, version-1 headers
    (tmp_path / "experts").mkdir()
    (tmp_path / "bank.json").write_text(json.dumps({
        "format": "dmoe-bank", "version": 1, "base_fingerprint": "fp", "base_model": "tiny",
        "spec": {"rank": 4, "alpha": 16.0, "n_layers": 1}, "dtype": "float32"}))
    db = sqlite3.connect(tmp_path / "bank.sqlite")
    db.execute("CREATE TABLE experts (id TEXT PRIMARY KEY, unit_id TEXT NOT NULL, content_hash "
               "TEXT NOT NULL, settings_hash TEXT NOT NULL, surrogate TEXT NOT NULL, title TEXT "
               "NOT NULL, meta TEXT NOT NULL, dtype TEXT NOT NULL, bytes INTEGER NOT NULL, file "
               "TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL)")
    for i in range(2):
        n = save_expert(tmp_path / "experts" / f"f{i}-00000000.safetensors", _expert(f"v#{i}", i),
                        "fp")
        db.execute("INSERT INTO experts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (f"v#{i}", f"v#{i}", "c", "s", f"text {i}", "", "{}", "float32", n,
                    f"f{i}-00000000.safetensors", "t", "t"))
    db.commit()
    db.close()
    with pytest.raises(BankError, match="dmoe bank migrate"):
        ExpertBank.open(tmp_path)
    assert migrate_bank(tmp_path) == 2
    with ExpertBank.open(tmp_path, "fp") as bank:
        assert bank.document_ids("v") == ["v#0", "v#1"] and bank.surrogate("v#1") == "text 1"
        torch.testing.assert_close(bank.get("v#1").weights, _expert("v#1", 1).weights)
    assert check_bank(tmp_path, deep=True).ok and migrate_bank(tmp_path) == 0


# -- resumable build -----------------------------------------------------------------------------

N_UNITS = 7


def build(bank_dir: str) -> dict[str, list[str]]:
    """A tiny build through train_into_bank (``$DMOE_FAULT_KILL_AT`` may crash it)."""
    from dmoe.augment.types import TrainingExample
    from dmoe.training.builder import ExpertJob, train_into_bank
    from dmoe.training.experts import TrainConfig

    model = tiny_model("llama", layers=2)
    config = TrainConfig(lr=1e-2, epochs=2, loss_on="all")
    jobs = [ExpertJob(f"unit {u}", (TrainingExample("", f"Town {u} has {u + 3} green towers."),),
                      content_hash=f"hash{u}", surrogate=f"town {u}") for u in range(N_UNITS)]
    with ExpertBank.open_or_create(bank_dir, "fp-tiny", "tiny", config.spec) as bank:
        report = train_into_bank(model, CharTokenizer(), jobs, bank, config, chunk_size=2)
    return {"trained": report.trained, "skipped": report.skipped,
            "quarantined": report.quarantined}


def test_an_expert_does_not_depend_on_the_chunk_it_trained_in(tmp_path):
    """Chunks only batch independent experts (a GPU build raises the chunk size for speed): one
    expert per chunk and all in one chunk, with examples of different lengths padded together,
    store the same weights."""
    from dmoe.augment.types import TrainingExample
    from dmoe.bench.build import bank_weights, max_weight_diff
    from dmoe.training.builder import ExpertJob, train_into_bank
    from dmoe.training.experts import TrainConfig

    model = tiny_model("llama", layers=2)
    config = TrainConfig(lr=1e-2, epochs=3)
    jobs = [ExpertJob(f"u{u}", (TrainingExample(f"Where is town {u}?" + " really" * u, f"Hill {u}."),
                                TrainingExample("", f"Town {u} has {u + 3} green towers.")),
                      content_hash=f"h{u}", surrogate=f"town {u}") for u in range(4)]
    for chunk in (1, 4):
        with ExpertBank.open_or_create(tmp_path / f"c{chunk}", "fp-tiny", "tiny", config.spec) as bank:
            train_into_bank(model, CharTokenizer(), jobs, bank, config, chunk_size=chunk)
    one, four = bank_weights(tmp_path / "c1"), bank_weights(tmp_path / "c4")
    # summation order differs with the padding, as between the fast and reference paths (same bound)
    diff = max_weight_diff(four, one)
    assert diff <= 1e-4, f"chunk of 4 vs chunks of 1: max |dw| = {diff:.2e}"
    assert max_weight_diff({"e": one["u0"]}, {"e": one["u1"]}) > 1e-3  # the experts do differ


def test_build_resumes_after_sigkill(tmp_path):
    bank_dir = tmp_path / "bank"
    here = Path(__file__).parent
    src = here.parent / "src"
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(src)!r}]\n"
            f"from test_bank import build; build({str(bank_dir)!r})")
    env = {**os.environ, "DMOE_FAULT_KILL_AT": "bank.staged:4"}  # 4th file written, no row yet
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    report = check_bank(bank_dir)  # chunk 1 and half of chunk 2 stored; the 4th file has no row
    assert report.experts == 3 and len(report.orphan_files) == 1 and not report.missing_files
    done = build(str(bank_dir))  # rerun: quarantines the orphan, skips what is stored, trains the rest
    assert len(done["quarantined"]) == len(report.orphan_files)
    assert sorted(done["trained"] + done["skipped"]) == [f"unit {u}" for u in range(N_UNITS)]
    assert len(done["skipped"]) == 3
    bank = ExpertBank.open(bank_dir, readonly=True)
    assert len(bank) == N_UNITS and check_bank(bank_dir, deep=True).ok
    again = build(str(bank_dir))
    assert again["trained"] == [] and len(again["skipped"]) == N_UNITS
    clean = build(str(tmp_path / "clean"))
    assert len(clean["trained"]) == N_UNITS
    ref = ExpertBank.open(tmp_path / "clean", readonly=True)
    for expert_id in ref.ids():  # the resumed bank holds the same experts as an unbroken build
        torch.testing.assert_close(bank.get(expert_id).weights, ref.get(expert_id).weights,
                                   atol=1e-5, rtol=1e-4)


def test_leftovers_are_found_in_a_listing_read_in_chunks(tmp_path, monkeypatch):
    """``quarantine_leftovers`` (run by every writer on open) checks ``experts/`` a chunk of names
    at a time against the rows; leftovers in any chunk are moved, referenced files never."""
    import dmoe.experts.integrity as integrity

    monkeypatch.setattr(integrity, "LISTING_CHUNK", 3)
    with ExpertBank.create(tmp_path / "b", "fp", "tiny", SPEC) as bank:
        for i in range(8):
            _add(bank, _expert(f"e{i}", i), content=f"c{i}")
        stray = bank.stage(_expert("stray"), unit_id="stray", content_hash="x", settings_hash="s",
                           surrogate="never committed")  # a file no row points at
        (bank.experts_dir / ".tmp-interrupted").write_bytes(b"half")
        moved = bank.quarantine_leftovers()
        assert sorted(moved) == sorted([stray.row["file"], ".tmp-interrupted"])
        assert len(list(bank.experts_dir.iterdir())) == 8
        assert all(bank.get(f"e{i}").id == f"e{i}" for i in range(8))
        assert bank.quarantine_leftovers() == []
    assert check_bank(tmp_path / "b").ok
