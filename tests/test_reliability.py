"""Documents as the unit of update, corrupt experts dropped (not fatal), admission before work,
durable jobs, and the CLI's read-only and repair paths (issue 11). Tiny random model throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from starlette.testclient import TestClient

from dmoe.base_model import LoadedModel, ModelSource, model_fingerprint
from dmoe.errors import BankError, redact
from dmoe.knowledge import KnowledgeBase, check_knowledge
from dmoe.server import ServerConfig, ServerState, create_app
from dmoe.server.jobs import CORPUS_FILE, Job
from dmoe.training.build import BuildConfig, build
from dmoe.training.experts import TrainConfig

FAST = TrainConfig(epochs=1, max_seq_len=128)
SHORT = BuildConfig(passage_words=12, augmenter="none")
LONG = ("Velmora is a river town. It was founded by Tamsin Oker in 1702. Its market sells salt "
        "and amber. The town has seven green towers. A ferry crosses the river every hour. The "
        "mayor is elected for four years. Winters are long and the harbour freezes.")
OTHER = "The zorbit is a blue fruit grown only on Kelvar Island. It tastes of cinnamon."


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    model = tiny_model()
    return LoadedModel(model=model, tokenizer=CharTokenizer(), device=torch.device("cpu"),
                       source=ModelSource("tiny", None, False), fingerprint=model_fingerprint(model))


def corpus(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "title": k, "text": v}) + "\n"
                            for k, v in docs.items()))
    return path


def quiet_build(path: Path, bank: Path, lm: LoadedModel) -> None:
    build(path, bank, lm, SHORT, FAST, progress=False, log=lambda s: None)


# -- a document is the unit of update ------------------------------------------------------------

def test_reposting_a_shorter_document_leaves_no_stale_passage(lm, tmp_path):
    bank = tmp_path / "bank"
    quiet_build(corpus(tmp_path / "v1.jsonl", {"velmora": LONG, "zorbit": OTHER}), bank, lm)
    with KnowledgeBase.open(bank, lm.fingerprint, readonly=True) as kb:
        v1 = kb.bank.document_ids("velmora")
    assert len(v1) >= 4, v1
    quiet_build(corpus(tmp_path / "v2.jsonl", {"velmora": "Velmora was founded by Ada Quell."}),
                bank, lm)
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    assert kb.bank.document_ids("velmora") == ["velmora#0"]
    assert "Ada Quell" in kb.surrogate("velmora#0")
    assert set(kb.index.ids()) == set(kb.bank.ids()) == {"velmora#0", *kb.bank.document_ids("zorbit")}
    hits = kb.router().route("salt amber towers ferry mayor harbour winters", 10)
    assert {h.expert_id for h in hits} <= {"velmora#0", "zorbit#0"}  # nothing stale is routed
    removed = kb.delete_document("velmora").removed
    assert removed == ["velmora#0"] and kb.bank.document_ids("velmora") == []
    assert "velmora#0" not in kb.index and kb.bank.ids() == ["zorbit#0"]
    with pytest.raises(BankError, match="no document"):
        kb.delete_document("velmora")
    kb.close()
    assert check_knowledge(bank, deep=True).ok


# -- a corrupt expert is dropped from the step, counted, and reported ---------------------------

@pytest.fixture
def served(lm, tmp_path):
    bank = tmp_path / "bank"
    quiet_build(corpus(tmp_path / "c.jsonl", {"velmora": LONG, "zorbit": OTHER}), bank, lm)
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    config = ServerConfig(default_max_tokens=4, max_tokens_limit=8, max_prompt_tokens=300)
    state = ServerState(lm, kb, config, build_config=SHORT, train_config=FAST)
    with TestClient(create_app(state)) as client:
        yield state, client
    state.close()


def chat(client: TestClient, content: str = "Tell me about Velmora.", **extra) -> dict:
    body = {"model": "t", "max_tokens": 4, "messages": [{"role": "user", "content": content}],
            "trigger": "always", "top_k": 2, "min_relevance": 0.0, **extra}  # no gate: always routed
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_a_corrupt_expert_is_dropped_logged_and_counted(served, damage):
    state, client = served
    assert client.get("/health").json()["status"] == "ok"
    first = chat(client)
    routed = {e for s in first["attribution"]["spans"] for e in s["experts"]}
    assert routed, "the test needs a routed expert"
    victim = sorted(routed)[0]
    info = state.kb.bank.info(victim)
    path = state.kb.bank.experts_dir / info.file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a NaN written with a consistent checksum: only the finite check can catch it
        from dmoe.experts.format import write_expert
        expert = state.kb.bank.get(victim)
        next(iter(expert.weights.values()))[0, 0] = float("nan")
        written = write_expert(path, expert, state.kb.bank.fingerprint)
        state.kb.bank._db.execute("UPDATE experts SET checksum=?, bytes=? WHERE id=?",
                                  (written.checksum, written.size, victim))
    state.kb.invalidate()
    again = chat(client)  # 200, decoded with the experts that are usable
    used = {e for s in again["attribution"]["spans"] for e in s["experts"]}
    assert victim not in used and again["choices"][0]["message"]["content"] is not None
    health = client.get("/health").json()
    assert health["status"] == "degraded" and health["bank"]["unusable"] == [victim]
    metrics = client.get("/metrics").text
    dropped = next(x for x in metrics.splitlines() if x.startswith("dmoe_experts_dropped_total"))
    assert float(dropped.split()[1]) >= 1
    report = state.kb.check(repair=True, deep=True)  # quarantined; the next build retrains it
    assert report.bank.removed_rows == [victim] and client.get("/health").json()["status"] == "ok"


# -- admission before work -------------------------------------------------------------------------

def raw(client: TestClient, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_lone_surrogates_get_400_in_every_field(served):
    _, client = served
    base = '"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]'
    bodies = [
        '{"max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800"}]}',
        '{"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", '
        '"text": "a\\udfff"}]}]}',
        '{' + base + ', "task_input": "a\\ud800"}',
        '{' + base + ', "experts": ["a\\ud800"]}',
        '{' + base + ', "model": "a\\ud800"}',
        '{' + base + ', "a\\ud800": 1}',
    ]
    for body in bodies:
        r = raw(client, "/v1/chat/completions", body)
        assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"], (body, r.text)
    r = raw(client, "/v1/completions", '{"max_tokens": 2, "prompt": "a\\ud800"}')
    assert r.status_code == 400
    r = raw(client, "/v1/knowledge", '{"documents": [{"id": "x", "text": "a\\ud800"}]}')
    assert r.status_code == 400
    assert chat(client)["choices"]  # and the server still answers


def test_strict_types_and_limits_before_tokenizing(served, monkeypatch):
    state, client = served
    msgs = [{"role": "user", "content": "hi"}]
    for bad in ("4", True, 2.0):
        r = client.post("/v1/chat/completions", json={"max_tokens": bad, "messages": msgs})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], bad
    r = client.post("/v1/chat/completions", json={"max_tokens": 2, "messages": msgs, "tau": "2"})
    assert r.status_code == 400
    calls = []
    tokenize = state.lm.tokenizer.__class__.__call__
    monkeypatch.setattr(state.lm.tokenizer.__class__, "__call__",
                        lambda self, text, **kw: calls.append(len(text)) or tokenize(self, text, **kw))
    big = "x" * (state.max_prompt_chars + 1)
    r = client.post("/v1/completions", json={"max_tokens": 2, "prompt": big})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []  # refused before the tokenizer saw it
    r = client.post("/v1/completions", json={"max_tokens": 2, "prompt": "x" * 300_000})
    assert r.status_code == 400  # over the per-field limit: refused by the schema
    r = client.post("/v1/chat/completions", json={"max_tokens": 2, "messages": msgs,
                                                  "task_input": "y" * 20_000})
    assert r.status_code == 400 and "task_input" in r.json()["error"]["message"]
    docs = [{"id": f"d{i}", "text": "z" * 150_000} for i in range(30)]  # 4.5 M characters
    r = client.post("/v1/knowledge", json={"documents": docs})
    assert r.status_code in (400, 413) and calls == []
    r = client.post("/v1/knowledge", json={"documents": [{"text": "t"}] * 300})
    assert r.status_code == 400


def test_api_errors_never_show_server_paths(served, monkeypatch):
    state, client = served
    where = str(state.kb.bank.path)

    def broken(*args: object) -> list:
        raise BankError(f"cannot read {where}/experts/abc-1.safetensors")

    monkeypatch.setattr(state.kb, "list", broken)
    r = client.get("/v1/experts")
    assert r.status_code == 500 and "abc-1.safetensors" in r.json()["error"]["message"]
    assert where not in r.text and "/tmp" not in r.text
    assert redact("at /a/b/c.txt and /x") == "at …/c.txt and /x"


# -- durable jobs ---------------------------------------------------------------------------------

def test_interrupted_jobs_resume_or_fail_with_a_reason_after_a_restart(lm, tmp_path):
    bank = tmp_path / "bank"
    kb = KnowledgeBase.open_or_create(bank, lm.fingerprint, "tiny", FAST.spec)
    state = ServerState(lm, kb, ServerConfig(), build_config=SHORT, train_config=FAST)
    # what a server killed mid-job leaves behind: a running job with its documents, and one
    # whose documents are gone
    folder = state.jobs.jobs_dir / "job-interrupted"
    folder.mkdir(parents=True)
    corpus(folder / CORPUS_FILE, {"zorbit": OTHER})
    state.jobs.store.save(Job("job-interrupted", 1, folder / CORPUS_FILE, status="running",
                              stage="train"))
    state.jobs.store.save(Job("job-lost", 1, state.jobs.jobs_dir / "job-lost" / CORPUS_FILE,
                              status="queued"))
    legacy = state.jobs.jobs_dir / "job-legacy"  # an older dmoe's job.json, stuck at "running"
    legacy.mkdir()
    corpus(legacy / CORPUS_FILE, {"loom": "The thermal loom was invented by Helena Marsk."})
    (legacy / "job.json").write_text(json.dumps({"id": "job-legacy", "status": "running"}))
    state.close()
    kb = KnowledgeBase.open(bank, lm.fingerprint)  # the restart
    state = ServerState(lm, kb, ServerConfig(), build_config=SHORT, train_config=FAST)
    with TestClient(create_app(state)) as client:
        deadline = time.time() + 60
        while client.get("/v1/jobs/job-interrupted").json()["status"] != "succeeded":
            assert time.time() < deadline, client.get("/v1/jobs/job-interrupted").json()
            time.sleep(0.05)
        lost = client.get("/v1/jobs/job-lost").json()
        assert lost["status"] == "failed" and "gone" in lost["error"]
        assert client.get("/v1/jobs/job-interrupted").json()["expert_ids"] == ["zorbit#0"]
        while client.get("/v1/jobs/job-legacy").json()["status"] != "succeeded":
            assert time.time() < deadline, client.get("/v1/jobs/job-legacy").json()
            time.sleep(0.05)
        assert "loom#0" in state.kb.bank.ids()
        # a finished job's files are pruned, just after its status is saved (so poll)
        while legacy.exists() or folder.exists():
            assert time.time() < deadline, (legacy.exists(), folder.exists())
            time.sleep(0.05)
        assert client.get("/health").json()["jobs"]["succeeded"] == 2
    state.close()


# -- the CLI: read-only commands never write; repair rebuilds; clear errors --------------------

def dmoe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dmoe.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_lost_database_is_reported_never_recreated_then_rebuilt(lm, tmp_path):
    bank = tmp_path / "bank"
    quiet_build(corpus(tmp_path / "c.jsonl", {"velmora": LONG, "zorbit": OTHER}), bank, lm)
    with KnowledgeBase.open(bank, readonly=True) as kb:
        want = kb.bank.ids()
    files = sorted((bank / "experts").iterdir())
    for name in ("bank.sqlite", "bank.sqlite-wal", "bank.sqlite-shm"):
        (bank / name).unlink(missing_ok=True)
    listed = dmoe("experts", "list", "--bank", str(bank))
    assert listed.returncode == 2 and "--repair" in listed.stderr and "Traceback" not in listed.stderr
    assert not (bank / "bank.sqlite").exists() and sorted((bank / "experts").iterdir()) == files
    checked = dmoe("bank", "check", "--bank", str(bank), "--json")
    assert checked.returncode == 1 and json.loads(checked.stdout)["bank"]["database"] == "missing"
    repaired = dmoe("bank", "check", "--bank", str(bank), "--repair", "--deep", "--json")
    assert repaired.returncode == 0 and json.loads(repaired.stdout)["bank"]["rebuilt"] == len(want)
    (bank / "index" / "router.json").write_text("garbage{")
    assert dmoe("bank", "check", "--bank", str(bank)).returncode == 1
    assert dmoe("bank", "check", "--bank", str(bank), "--repair").returncode == 0
    again = dmoe("bank", "check", "--bank", str(bank), "--deep", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    with KnowledgeBase.open(bank, readonly=True) as kb:
        assert kb.bank.ids() == want and sorted(kb.index.ids()) == want


def test_cli_bank_convert_to_int8_gives_a_checked_bank_with_its_index(lm, tmp_path):
    bank = tmp_path / "bank"
    quiet_build(corpus(tmp_path / "c.jsonl", {"velmora": LONG, "zorbit": OTHER}), bank, lm)
    out = dmoe("bank", "convert", "--bank", str(bank), "--to", str(tmp_path / "q8"), "--dtype", "int8")
    assert out.returncode == 0, out.stderr
    checked = dmoe("bank", "check", "--bank", str(tmp_path / "q8"), "--deep", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with KnowledgeBase.open(bank, readonly=True) as kb, \
            KnowledgeBase.open(tmp_path / "q8", readonly=True) as q8:
        assert q8.bank.dtype == "int8" and q8.bank.ids() == kb.bank.ids()
        assert sorted(q8.index.ids()) == sorted(kb.index.ids())  # routable as it is
        assert "int8 experts" in out.stdout and "already there" in out.stdout
    again = dmoe("bank", "convert", "--bank", str(bank), "--to", str(tmp_path / "q8"), "--dtype", "int8")
    assert again.returncode == 0 and again.stdout.startswith("0 experts written")
    wrong = dmoe("bank", "convert", "--bank", str(bank), "--to", str(tmp_path / "q8"), "--dtype",
                 "float16")
    assert wrong.returncode != 0 and "int8 bank, not float16" in wrong.stderr


def test_cli_bank_merge_gives_one_routable_bank_of_both_shards(lm, tmp_path):
    quiet_build(corpus(tmp_path / "c1.jsonl", {"velmora": LONG}), tmp_path / "s0", lm)
    quiet_build(corpus(tmp_path / "c2.jsonl", {"zorbit": OTHER}), tmp_path / "s1", lm)
    out = dmoe("bank", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--to",
               str(tmp_path / "all"))
    assert out.returncode == 0, out.stderr
    checked = dmoe("bank", "check", "--bank", str(tmp_path / "all"), "--deep", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with KnowledgeBase.open(tmp_path / "s0", readonly=True) as a, \
            KnowledgeBase.open(tmp_path / "s1", readonly=True) as b, \
            KnowledgeBase.open(tmp_path / "all", readonly=True) as merged:
        assert merged.bank.ids() == sorted(a.bank.ids() + b.bank.ids())
        assert sorted(merged.index.ids()) == merged.bank.ids()
    missing = dmoe("bank", "merge", str(tmp_path / "nope"), "--to", str(tmp_path / "all"))
    assert missing.returncode != 0 and "not an expert bank" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_refuses_bad_numbers_and_non_model_files(tmp_path):
    nan = dmoe("ask", "hi", "--tau", "nan")
    assert nan.returncode == 2 and "finite" in nan.stderr
    weights = tmp_path / "file.bin"
    weights.write_bytes(b"\0" * 16)
    r = dmoe("ask", "hi", "--model", str(weights))
    assert r.returncode == 2 and "not a .gguf" in r.stderr and "no such file" not in r.stderr
