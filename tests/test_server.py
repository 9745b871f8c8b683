"""``dmoe serve``: a real uvicorn server on a loopback port, driven by the official ``openai`` client
and ``httpx``, over a tiny random model and a knowledge base in a temporary directory."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import CharTokenizer, DmoeServe, dmoe_cli, tiny_lm, tiny_model_dir

from dmoe.experts.lora import LoraSpec, random_expert
from dmoe.knowledge import KnowledgeBase
from dmoe.server import ServerConfig, ServerState, create_app
from dmoe.server.service import TextDeltas
from dmoe.training.experts import TrainConfig, mlp_shapes

USER, ADMIN = "user-key", "admin-key"
QUESTION = "Who founded the town of Velmora?"
DOC = {"id": "velmora", "title": "Velmora",
       "text": "Velmora is a river town founded by Tamsin Oker in 1702. Velmora has seven green "
               "towers and a salt market."}
ALWAYS = {"trigger": "always", "top_k": 1, "min_relevance": 0.0}  # route at every token, no gate:
# the new expert is always used


class LiveServer:
    def __init__(self, state: ServerState, tmp: Path) -> None:
        self.state = state
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(state), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, key: str = USER) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, key: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("server")
    lm = tiny_lm()
    kb = KnowledgeBase.open_or_create(tmp / "bank", lm.fingerprint, "tiny-llama", LoraSpec())
    config = ServerConfig(api_key=USER, admin_key=ADMIN, default_max_tokens=8,
                          max_tokens_limit=32, max_prompt_tokens=400, max_body_bytes=1 << 20)
    # a large lr so that one tiny expert visibly moves the random model's greedy tokens
    state = ServerState(lm, kb, config, train_config=TrainConfig(lr=5e-2, epochs=4, loss_on="all"),
                        worker_model=tiny_lm)  # builds run in a worker process, as in `dmoe serve`
    server = LiveServer(state, tmp)
    yield server
    server.stop()
    state.close()


def attribution(obj) -> dict:
    value = getattr(obj, "attribution", None)
    if value is None:
        value = (obj.model_extra or {}).get("attribution")
    assert value is not None, f"no attribution field in {obj}"
    return value if isinstance(value, dict) else value.model_dump()


def ask(live: LiveServer, question: str = QUESTION, **extra) -> tuple[str, dict]:
    resp = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8,
        extra_body=extra or None)
    return resp.choices[0].message.content, attribution(resp)


def wait_for_job(live: LiveServer, job_id: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    with live.http() as http:
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed") or time.time() > deadline:
                return job
            time.sleep(0.05)


# -- completions -------------------------------------------------------------------------------

def test_chat_and_completion_through_the_openai_client(live):
    client = live.client()
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a colour."}], max_tokens=6)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 6
    prompt = "System: Be brief.\nUser: Name a colour.\nAssistant:"  # the plain chat frame
    assert resp.usage.prompt_tokens == len(prompt.encode())
    att = attribution(resp)
    assert att["triggers"] >= 0 and att["spans"][0]["start"] == 0
    assert att["spans"][-1]["end"] == resp.usage.completion_tokens
    # the same prompt through /v1/completions gives the same greedy text
    text = client.completions.create(model="tiny", prompt=prompt, max_tokens=6)
    assert text.object == "text_completion" and text.choices[0].text == choice.message.content
    assert attribution(text)["spans"] == att["spans"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_gives_the_same_text_as_not_streaming(live, endpoint):
    client = live.client()
    if endpoint == "chat":
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
        whole = client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = list(client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        kwargs = dict(model="tiny", prompt="Question: " + QUESTION + "\nAnswer:", max_tokens=8)
        whole = client.completions.create(**kwargs).choices[0].text
        chunks = list(client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(chunks) >= 3 and "".join(pieces) == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and attribution(finals[0])["spans"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_stop_strings_are_never_streamed():
    deltas = TextDeltas(CharTokenizer(), ("STOP",))
    pieces = [deltas.push(b) for b in b"ab STOP cd"]
    assert "".join(pieces) == "ab " and pieces[:3] == ["", "", ""]  # held back: could be "STOP"
    assert deltas.finish("ab ") == ""  # the engine's final text is cut at the stop string
    lead = TextDeltas(CharTokenizer(), ("\n",))  # a stop counts once the text has started
    assert "".join(lead.push(b) for b in b"\n Paris\nmore") == "\n Paris"
    plain = TextDeltas(CharTokenizer(), ())
    pieces = [plain.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]  # never half a character


# -- knowledge ---------------------------------------------------------------------------------

def test_expert_list_pages_by_id(live):
    kb, spec = live.state.kb, LoraSpec()
    shapes = mlp_shapes(live.state.lm.model, spec.n_layers)
    staged = [kb.bank.stage(random_expert(f"pages#{i}", shapes, spec, torch.Generator()),
                            unit_id=f"pages#{i}", content_hash=f"c{i}", settings_hash="s",
                            surrogate=f"page test {i}") for i in range(3)]
    kb.indexed(kb.bank.commit_document("pages", staged), staged)
    try:
        _walk_expert_pages(live)
    finally:
        kb.delete_document("pages")


def _walk_expert_pages(live: LiveServer) -> None:
    with live.http() as http:
        every = [e["id"] for e in http.get("/v1/experts").json()["data"]]
        assert len(every) >= 3 and every == sorted(every)
        paged, after = [], None
        while True:
            params = {"limit": 1} if after is None else {"limit": 1, "after": after}
            page = http.get("/v1/experts", params=params).json()
            assert len(page["data"]) <= 1
            paged += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                break
            after = paged[-1]
        assert paged == every
        rest = http.get("/v1/experts", params={"after": every[0]}).json()
        assert [e["id"] for e in rest["data"]] == every[1:] and "has_more" not in rest
        bad = http.get("/v1/experts", params={"limit": 0})
        assert bad.status_code == 400 and "limit" in bad.text


def test_added_document_changes_the_answer_and_delete_restores_it(live):
    before, att = ask(live, **ALWAYS)
    assert "velmora#0" not in att["experts"]
    with live.http() as http:
        r = http.post("/v1/knowledge", json={"documents": [DOC]})
        assert r.status_code == 202, r.text
        job = wait_for_job(live, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["expert_ids"] == ["velmora#0"] and job["summary"]["experts_trained"] == 1
        listed = {e["id"]: e for e in http.get("/v1/experts").json()["data"]}
        assert listed["velmora#0"]["title"] == "Velmora"

        one = http.get(f"/v1/experts/{quote('velmora#0', safe='')}").json()
        assert one["title"] == "Velmora" and DOC["text"] in one["text"]  # what it is routed by
        assert "text" not in listed["velmora#0"]  # the list stays small

        with_doc, att = ask(live, **ALWAYS)  # no restart: the next request routes to it
        assert att["experts"] == {"velmora#0": "Velmora"}
        assert all(s["experts"] == ["velmora#0"] for s in att["spans"])
        tokens = att["tokens"]  # one per generated token, adding up to the answer
        assert len(tokens) == att["spans"][-1]["end"] and "".join(t["text"] for t in tokens) == \
            "".join(s["text"] for s in att["spans"])
        assert all(0.0 <= t["entropy"] <= math.log(257) + 1e-3 for t in tokens)
        assert with_doc != before
        # the other knobs: the base model ignores the bank; a pinned expert needs no trigger
        assert ask(live, method="base", trigger="always")[0] == before
        pinned, att = ask(live, "Hello?", experts=["velmora#0"], trigger="never")
        assert att["triggers"] == 0 and [s["experts"] for s in att["spans"]] == [["velmora#0"]]
        assert ask(live, "Hello?", router="random", trigger="always")[1]["experts"] == {
            "velmora#0": "Velmora"}
        assert live.state.kb.check().ok  # the jobs folder inside the bank is no drift

        assert http.delete(f"/v1/experts/{quote('velmora#0', safe='')}").status_code == 200
        after, att = ask(live, **ALWAYS)
        assert "velmora#0" not in att["experts"] and after == before
        gone = http.delete(f"/v1/experts/{quote('velmora#0', safe='')}")
        assert gone.status_code == 404 and "velmora#0" in gone.json()["error"]["message"]


def test_a_delete_mid_stream_takes_effect_at_the_next_trigger(live, monkeypatch):
    with live.http() as http:
        job = wait_for_job(live, http.post("/v1/knowledge", json={"documents": [
            {"id": "kestrel", "text": "Kestrel Bay is a harbour town with a blue lighthouse."}]}
        ).json()["id"])
    assert job["status"] == "succeeded", job
    slow_model(live, monkeypatch)  # 16 tokens take >= 1.6 s: the delete lands mid-stream
    question = "Where is the blue lighthouse of Kestrel Bay?"
    stream = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=16,
        stream=True, extra_body=ALWAYS)
    chunks = []
    for chunk in stream:  # read up to the first text: the generation is a running row now
        chunks.append(chunk)
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            break
    assert chunks[-1].choices[0].finish_reason is None, "finished before the delete was sent"
    with live.http() as http:
        deleted = http.delete("/v1/experts/kestrel%230")  # waits for the step in flight only
    chunks += list(stream)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    spans = attribution(final)["spans"]
    assert deleted.status_code == 200
    assert spans[0]["experts"] == ["kestrel#0"]  # routed to it before the delete
    assert "kestrel#0" not in spans[-1]["experts"]  # the triggers after it route without it
    monkeypatch.undo()
    _, att = ask(live, question, **ALWAYS)
    assert att["experts"] == {}


def test_builds_train_without_the_model_lock_and_survive_a_dead_worker(live):
    state = live.state
    experts = state.kb.bank.experts_dir
    before = set(os.listdir(experts))
    doc = {"id": "osprey", "text": "Osprey Point has a red tower that was built in 1911."}
    with state.model_lock:  # no batch step, delete or bank write can run now
        with live.http() as http:
            job_id = http.post("/v1/knowledge", json={"documents": [doc]}).json()["id"]
        deadline = time.time() + 60
        while not set(os.listdir(experts)) - before:  # augmented, trained and staged meanwhile
            assert time.time() < deadline, "the build did not train while the lock was held"
            time.sleep(0.05)
        assert not state.kb.bank.exists("osprey#0"), "committed without the lock"
        assert state.jobs.get(job_id).status == "running"
        state.jobs.worker._proc.kill()  # the worker dies before its commit is answered
    job = wait_for_job(live, job_id)
    assert job["status"] == "failed" and "died" in job["error"], job
    with live.http() as http:  # a fresh worker builds the resubmitted document
        job = wait_for_job(live, http.post("/v1/knowledge", json={"documents": [doc]}).json()["id"])
        assert job["status"] == "succeeded" and job["expert_ids"] == ["osprey#0"], job
        assert http.delete("/v1/documents/osprey").status_code == 200
    assert state.kb.check().ok


def test_a_build_cut_off_by_a_shutdown_resumes_on_the_next_start(tmp_path):
    lm = tiny_lm()

    def server() -> ServerState:
        kb = KnowledgeBase.open_or_create(tmp_path / "bank", lm.fingerprint, "tiny-llama",
                                          LoraSpec())
        return ServerState(lm, kb, train_config=TrainConfig(epochs=1), worker_model=tiny_lm)

    state = server()
    state.start()
    experts = state.kb.bank.experts_dir
    with state.model_lock:  # the worker trains and stages, then waits to commit
        job = state.jobs.submit([DOC])
        deadline = time.time() + 60
        while not any(experts.iterdir()):
            assert time.time() < deadline, "the build did not start"
            time.sleep(0.05)
        stopping = threading.Thread(target=state.jobs.stop)  # shutdown meanwhile
        stopping.start()
        while not state.jobs.worker.closing:
            time.sleep(0.01)
    stopping.join()  # the commit the worker asked for was refused: nothing of it is stored
    assert state.jobs.store.get(job.id).status == "running"
    assert not state.kb.bank.exists("velmora#0")
    state.close()
    state = server()  # the restart: the staged file is a leftover, the job resumes
    try:
        state.start()
        deadline = time.time() + 60
        while (found := state.jobs.get(job.id)).status not in ("succeeded", "failed"):
            assert time.time() < deadline, "the job did not resume"
            time.sleep(0.05)
        assert found.status == "succeeded" and found.expert_ids == ["velmora#0"], found
        assert state.kb.check().ok
    finally:
        state.close()


def slow_model(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make each model call take >= 50 ms (32 tokens >= 1.6 s: time to act mid-generation)."""
    head = live.state.engine.lm_head

    def slow_head(*args, **kwargs):
        time.sleep(0.05)
        return head(*args, **kwargs)

    monkeypatch.setattr(live.state.engine, "lm_head", slow_head)


def test_a_full_queue_gets_503(live, monkeypatch):
    monkeypatch.setattr(live.state, "config", replace(live.state.config, max_waiting=1))
    slow_model(live, monkeypatch)
    stream = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Go on."}], max_tokens=16,
        stream=True, extra_body={"method": "base"})
    chunks = iter(stream)
    next(chunks)  # admitted and running
    with pytest.raises(openai.InternalServerError) as err:
        ask(live, "Me too?")
    assert err.value.status_code == 503 and "retry" in err.value.message
    assert list(chunks)  # the admitted one is unaffected


def test_a_client_that_goes_away_frees_the_model(live, monkeypatch):

    def cancelled() -> int:
        with live.http(USER) as http:
            lines = http.get("/metrics").text.splitlines()
        found = [x for x in lines if x.startswith('dmoe_generations_total{finish_reason="cancelled"}')]
        return int(found[0].split()[1]) if found else 0

    before = cancelled()
    slow_model(live, monkeypatch)
    stream = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=32,
        stream=True, extra_body={"method": "base"})
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()  # hang up mid-generation
    deadline = time.time() + 10
    while cancelled() == before:
        assert time.time() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    monkeypatch.undo()
    assert ask(live, "Still there?")[0] is not None  # the model is free again


def test_concurrent_clients_get_the_answers_they_would_get_alone(live, monkeypatch):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    alone = [ask(live, p)[0] for p in prompts]
    scheduler = live.state.scheduler
    steps, row_steps = scheduler.steps, scheduler.row_steps
    slow_model(live, monkeypatch)  # so that the six overlap

    def one(i: int) -> str:
        if i % 2:  # mix streaming and not
            stream = live.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompts[i]}], max_tokens=8,
                stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return ask(live, prompts[i])[0]

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(one, range(6)))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ
    mean_batch = (scheduler.row_steps - row_steps) / (scheduler.steps - steps)
    assert mean_batch > 2, f"decoded {mean_batch:.2f} rows per step: they did not share steps"


# -- validation, auth, observability -----------------------------------------------------------

def test_bad_requests_get_4xx_with_a_reason(live):
    client = live.client()
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=33), "between 1 and 32"),
        (dict(messages=[{"role": "user", "content": "x" * 500}]), "at most 400"),
        (dict(extra_body={"experts": ["no-such-expert"]}), "no-such-expert"),
        (dict(extra_body={"tua": 1.0}), "tua"),
        (dict(n=2), "n"),
        (dict(extra_body={"trigger": "sometimes"}), "trigger"),
        (dict(extra_body={"no_repeat_ngram": -1}), "no_repeat_ngram"),
    ]
    for kwargs, reason in cases:
        kwargs = {"model": "tiny", "messages": msgs, "max_tokens": 4, **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**kwargs)
        assert err.value.status_code == 400 and reason in err.value.message, (kwargs, err.value)
    with live.http() as http:
        r = http.post("/v1/knowledge", json={"documents": [{"text": "   "}]})
        assert r.status_code == 400 and "blank" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"{" + b" " * (1 << 20) + b"}",
                      headers={"content-type": "application/json"})
        assert r.status_code == 413
        chunked = http.post("/v1/completions", headers={"content-type": "application/json"},
                            content=(b" " * 65536 for _ in range(20)))  # no Content-Length
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]
        assert http.get("/v1/jobs/job-nope").status_code == 404
        assert http.get("/v1/experts/nope").status_code == 404


def test_api_keys(live):
    with pytest.raises(openai.AuthenticationError):
        live.client("wrong").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with live.http(None) as anon:
        assert anon.get("/health").status_code == 401
        assert anon.get("/openapi.json").status_code == 401
        assert anon.get("/health", headers={"X-API-Key": USER}).status_code == 200
    with live.http(USER) as user:
        assert user.get("/v1/experts").status_code == 200
        r = user.post("/v1/knowledge", json={"documents": [DOC]})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert user.delete("/v1/experts/anything").status_code == 403
    with live.http(ADMIN) as admin:
        assert admin.get("/health").json()["status"] == "ok"  # the admin key opens everything
        paths = admin.get("/openapi.json").json()["paths"]
        assert {"/v1/chat/completions", "/v1/knowledge", "/v1/jobs/{job_id}"} <= set(paths)


def test_health_and_metrics(live):
    ask(live, "Ping?")
    with live.http(USER) as http:
        health = http.get("/health").json()
        assert health["model"] == "tiny-llama" and health["experts"] == len(live.state.kb)
        assert health["weights"] == "fp32"
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("dmoe_requests_total", "dmoe_request_duration_seconds_bucket",
                 "dmoe_completion_tokens_total", "dmoe_prompt_tokens_total", "dmoe_triggers_total",
                 "dmoe_bank_experts", "dmoe_generations_total"):
        assert f"\n{name}" in text, name
    line = next(x for x in text.splitlines() if x.startswith("dmoe_requests_total{")
                and 'route="/v1/chat/completions"' in x and 'status="200"' in x)
    assert int(line.rsplit(" ", 1)[1]) >= 1
    tokens = next(x for x in text.splitlines() if x.startswith("dmoe_completion_tokens_total "))
    assert int(tokens.split()[1]) > 0


# -- the CLI through its real entry point ------------------------------------------------------

def test_cli_serve_help_and_user_errors(tmp_path):
    out = dmoe_cli("serve", "--help")
    stdout, _ = out.communicate(timeout=60)
    assert out.returncode == 0 and "example:" in stdout and "/v1/chat/completions" in stdout
    bad = dmoe_cli("serve", "--bank", str(tmp_path / "bank"), "--model", str(tmp_path / "missing"))
    _, stderr = bad.communicate(timeout=60)
    assert bad.returncode == 2 and stderr.strip().startswith("dmoe: error: model")
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_serve_creates_a_bank_and_answers(tmp_path):
    bank = tmp_path / "bank"
    server = DmoeServe(bank, tiny_model_dir(tmp_path / "model"), key="k",
                       env={"DMOE_API_KEY": "k"})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        resp = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert resp.usage.completion_tokens >= 1 and "attribution" in resp.model_extra
        assert httpx.get(server.url + "/health").status_code == 401  # key from $DMOE_API_KEY
    finally:
        stderr = server.stop()
    assert server.proc.returncode == 0, stderr
    assert "serving" in stderr and (bank / "bank.json").is_file()
    assert json.loads((bank / "bank.json").read_text())  # an empty bank, ready for the API


@pytest.mark.slow
def test_real_model_answers_through_the_server(tmp_path):
    from dmoe.base_model import load_base_model

    lm = load_base_model(None, "cpu", "float32")
    kb = KnowledgeBase.open_or_create(tmp_path / "bank", lm.fingerprint, lm.source.name,
                                      LoraSpec())
    state = ServerState(lm, kb, ServerConfig())
    server = LiveServer(state, tmp_path)
    try:
        resp = server.client().chat.completions.create(
            model="smollm2", max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in resp.choices[0].message.content
    finally:
        server.stop()
        state.close()
