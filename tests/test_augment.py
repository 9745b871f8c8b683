"""Augmentation: parsing, extractive rules, the LLM augmenter's retry/fallback, the HF and OpenAI
backends, the on-disk cache, PRAG training examples and the measurement function."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from conftest import tiny_model

from dmoe.augment import (
    AugmentationCache,
    ExtractiveAugmenter,
    LLMAugmenter,
    QAPair,
    augment_cached,
    clean_paraphrase,
    extractive_paraphrase,
    extractive_qa,
    make_augmenter,
    measure_augmentation,
    parse_qa,
    parse_qa_detailed,
    training_examples,
)
from dmoe.augment.hf import HFChatBackend
from dmoe.augment.openai_api import OpenAIChatBackend
from dmoe.augment.prompts import QA_PREFILL, QA_RETRY_SUFFIX
from dmoe.corpus.units import KnowledgeUnit
from dmoe.errors import AugmentError
from dmoe.prompts import format_prompt

CURIE = KnowledgeUnit("curie", "Marie Curie was born in Warsaw in 1867. She moved to Paris in 1891. "
                      "Dr. Curie won the Nobel Prize in Physics in 1903.", title="Marie Curie")
GOOD_QA = json.dumps([{"question": f"Q{i}?", "answer": f"A{i}", "full_answer": f"It is A{i}."}
                      for i in range(3)])


# -- parsing -----------------------------------------------------------------------------------

def test_parse_qa_clean_and_repaired_json():
    assert parse_qa(GOOD_QA) == [QAPair(f"Q{i}?", f"A{i}", f"It is A{i}.") for i in range(3)]
    messy = ('Sure! Here is the list:\n```json\n[{"question": "Who?", "answer": 1867,},\n'
             '{"question": "Where?", "answer": ["Paris", "Warsaw"]},\n')  # trailing comma, no ]
    assert parse_qa(messy) == [QAPair("Who?", "1867"), QAPair("Where?", "Paris, Warsaw")]


def test_parse_qa_object_and_field_fallbacks_and_filters():
    broken_list = '[{"question": "A?", "answer": "a"} {"question": "B?", "answer": "b"}]'
    assert [p.question for p in parse_qa(broken_list)] == ["A?", "B?"]
    fields = '"question": "Who won?", "answer": "Curie", "full_answer": "Curie won." "question'
    assert parse_qa(fields) == [QAPair("Who won?", "Curie", "Curie won.")]
    copied = ('[{"question": "What is the capital of France?", "answer": "Paris"}, '
              '{"question": "Who?", "answer": "x"}, {"question": "who?", "answer": "y"}, '
              '{"question": "Empty?", "answer": ""}]')
    assert parse_qa(copied) == [QAPair("Who?", "x")]  # example, duplicate and empty dropped
    assert parse_qa("I cannot do that.") == []


def test_parse_qa_free_text_question_answer_lines():
    smol = ("Question: What is the capital of France?\n\nAnswer: Paris\n\n"
            "Question: Who won Super Bowl 50?\n\nAnswer: Denver Broncos\n"
            "Q2: When was it played?\nA2: February 7, 2016\n\nQuestion: Dangling?")
    pairs, kind = parse_qa_detailed(smol)
    assert kind == "text" and pairs == [QAPair("Who won Super Bowl 50?", "Denver Broncos"),
                                        QAPair("When was it played?", "February 7, 2016")]
    assert parse_qa_detailed(GOOD_QA)[1] == "json" and parse_qa_detailed("nope") == ([], "")


def test_clean_paraphrase():
    original = "Marie Curie was born in Warsaw in 1867."
    assert clean_paraphrase("Here is the rewritten passage:\nBorn in Warsaw in 1867 was Marie "
                            "Curie.", original) == "Born in Warsaw in 1867 was Marie Curie."
    assert clean_paraphrase(original, original) == ""
    assert clean_paraphrase("Sorry.", original) == ""
    looping = ("Curie was born in Warsaw. She was a physicist. She was a physicist. She was a "
               "physicist.")
    assert clean_paraphrase(looping, original) == "Curie was born in Warsaw. She was a physicist."
    assert clean_paraphrase("Тесла (Tesla) Высоколиции " * 10, original) == ""
    cut = "Curie was born in Warsaw in 1867. She later moved to the city of"
    assert clean_paraphrase(cut, original) == "Curie was born in Warsaw in 1867."


# -- extractive ----------------------------------------------------------------------------------

def test_extractive_qa_pinned_and_always_three():
    assert [(p.question, p.answer) for p in extractive_qa(CURIE)] == [
        ("Fill in the blank: (Marie Curie) ____ was born in Warsaw in 1867.", "Marie Curie"),
        ("Fill in the blank: (Marie Curie) She moved to ____ in 1891.", "Paris"),
        ("Fill in the blank: (Marie Curie) Dr. Curie won the ____ in Physics in 1903.",
         "Nobel Prize")]
    for text in ["Hi", "all lowercase words here", "42", "The end.", "x " * 300]:
        pairs = extractive_qa(KnowledgeUnit("u", text))
        assert len(pairs) == 3 and all(p.question and p.answer for p in pairs)
    with pytest.raises(ValueError, match="no text"):
        extractive_qa(KnowledgeUnit("u", "  "))


def test_extractive_paraphrase_is_distinct_and_keeps_the_words():
    para = extractive_paraphrase(CURIE)
    assert para.startswith("Marie Curie: She moved to Paris in 1891.") and para != CURIE.text
    assert sorted(para.removeprefix("Marie Curie: ").split()) == sorted(CURIE.text.split())
    assert extractive_paraphrase(KnowledgeUnit("u", "One sentence.")) == "In short: One sentence."
    aug = ExtractiveAugmenter().augment([CURIE])[0]
    assert aug.source == "extractive" and len(aug.qa) == 3


# -- LLM augmenter with a scripted backend ---------------------------------------------------------

class ScriptedBackend:
    """Replies from a function of (message, prefill); records every call."""

    name = "fake"
    can_prefill = True
    settings = {"backend": "fake"}

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[list[str], str]] = []

    def generate(self, messages: Sequence[str], *, max_new_tokens: int, prefill: str = "",
                 stop_regex: str = "") -> list[str]:
        self.calls.append((list(messages), prefill))
        return [self.reply(m, prefill) for m in messages]


def scripted(m: str, prefill: str) -> str:
    if m.startswith("Rewrite"):
        return "Here is the rewrite:\nA new version of the passage, with different words here."
    passage = m.split("Passage: ", 1)[1]
    if passage.startswith("good"):
        return GOOD_QA
    if passage.startswith("retry"):  # junk first, valid on retry (continuing the prefill)
        return prefill + GOOD_QA[len(QA_PREFILL):] if prefill else "no json"
    if passage.startswith("partial"):
        return '[{"question": "Only one?", "answer": "one"}]'
    return "nothing useful"


def test_llm_augmenter_retry_partial_and_fallback():
    units = [KnowledgeUnit(n, f"{n} passage about Marie Curie in Paris in 1891.")
             for n in ("good", "retry", "partial", "junk")]
    backend = ScriptedBackend(scripted)
    augs = LLMAugmenter(backend).augment(units)
    assert [a.source for a in augs] == ["fake", "fake", "fake+extractive", "fake->extractive"]
    assert [a.meta["qa_parsed"] for a in augs] == ["first", "retry", "partial", "failed"]
    assert [a.meta["qa_attempts"] for a in augs] == ["1", "2", "2", "2"]
    assert all(len(a.qa) == 3 for a in augs)
    assert augs[1].qa[0] == QAPair("Q0?", "A0", "It is A0.")
    assert augs[2].qa[0] == QAPair("Only one?", "one") and augs[2].qa[1].question.startswith(
        "Fill in the blank")
    assert augs[0].paraphrase == "A new version of the passage, with different words here."
    # three batched calls: rewrite, QA, and the retry of the three failures only
    assert len(backend.calls) == 3
    retry_messages, prefill = backend.calls[2]
    assert prefill == QA_PREFILL and len(retry_messages) == 3
    assert all(m.endswith(QA_RETRY_SUFFIX) for m in retry_messages)


def test_unusable_paraphrase_falls_back_to_extractive():
    backend = ScriptedBackend(lambda m, p: CURIE.text if m.startswith("Rewrite") else GOOD_QA)
    aug = LLMAugmenter(backend).augment([CURIE])[0]
    assert aug.paraphrase == extractive_paraphrase(CURIE)
    assert aug.meta["paraphrase_source"] == "extractive" and aug.source == "fake"


def test_measure_augmentation_reports_rates():
    units = [KnowledgeUnit(n, f"{n} passage text about Paris.") for n in ("good", "retry",
                                                                          "junk", "good2")]
    m = measure_augmentation(units, LLMAugmenter(ScriptedBackend(scripted)))
    assert m["augment_units"] == 4 and m["augment_s_per_unit"] >= 0
    assert m["augment_json_parse_rate"] == 0.75 and m["augment_json_parse_rate_first_try"] == 0.5
    assert m["augment_fallback_rate"] == 0.25
    assert m["augment_sources"] == {"fake": 3, "fake->extractive": 1}
    assert measure_augmentation(units, ExtractiveAugmenter())["augment_json_parse_rate"] is None


# -- HF backend (tiny random model, byte tokenizer) ----------------------------------------------

def test_hf_backend_left_padding_matches_unbatched(tokenizer):
    model = tiny_model()
    short, long = "Hi.", "A much longer message that forces left padding of the short one."
    alone = HFChatBackend(model, tokenizer, batch_size=1, model_id="tiny")
    batched = HFChatBackend(model, tokenizer, batch_size=2, model_id="tiny")
    expected = alone.generate([short, long], max_new_tokens=6)
    assert batched.generate([short, long], max_new_tokens=6) == expected
    assert all(isinstance(t, str) for t in expected)
    assert alone.generate([short], max_new_tokens=3, prefill="[{")[0].startswith("[{")


def test_self_augmenter_on_random_model_falls_back(tokenizer):
    backend = HFChatBackend(tiny_model(), tokenizer, batch_size=4)
    aug = LLMAugmenter(backend, rewrite_tokens=4, qa_tokens=4).augment([CURIE])[0]
    assert aug.source == "self->extractive" and aug.meta["qa_attempts"] == "2"
    assert len(aug.qa) == 3 and aug.meta["paraphrase_source"] == "extractive"
    assert len(backend.settings["model"]) == 16  # fingerprint computed from the weights


# -- OpenAI-compatible backend against a local fake server -----------------------------------------

class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []
    fail_first: list[int] = []  # status codes to answer before succeeding

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                    "body": body})
        if FakeOpenAI.fail_first:
            self.send_response(FakeOpenAI.fail_first.pop(0))
            self.end_headers()
            self.wfile.write(b'{"error": "nope"}')
            return
        content = body["messages"][0]["content"]
        reply = GOOD_QA if content.startswith("I will provide") else "A rewritten passage " \
            "that says the same thing in other words."
        payload = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    FakeOpenAI.requests, FakeOpenAI.fail_first = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_augmenter_against_fake_server(fake_server, monkeypatch):
    monkeypatch.setenv("DMOE_OPENAI_BASE_URL", fake_server)
    monkeypatch.setenv("DMOE_OPENAI_MODEL", "tiny-llm")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    aug = make_augmenter("openai").augment([CURIE])[0]
    assert aug.source == "openai:tiny-llm" and aug.qa[2] == QAPair("Q2?", "A2", "It is A2.")
    assert aug.paraphrase.startswith("A rewritten passage")
    req = FakeOpenAI.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-llm" and req["body"]["temperature"] == 0.0


def test_openai_backend_retries_5xx_and_reports_4xx(fake_server):
    backend = OpenAIChatBackend(fake_server, "m", backoff_s=0.0)
    FakeOpenAI.fail_first = [503]
    assert backend.generate(["I will provide..."], max_new_tokens=8) == [GOOD_QA]
    FakeOpenAI.fail_first = [400]
    with pytest.raises(AugmentError, match=r"HTTP 400: \{\"error\": \"nope\"\}"):
        backend.generate(["x"], max_new_tokens=8)


def test_openai_unset_environment_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DMOE_OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("DMOE_OPENAI_MODEL", "m")
    with pytest.raises(AugmentError, match="needs DMOE_OPENAI_BASE_URL set"):
        make_augmenter("openai")
    with pytest.raises(ValueError, match="unknown augmenter 'gpt'"):
        make_augmenter("gpt")


# -- cache -------------------------------------------------------------------------------------

class CountingAugmenter(ExtractiveAugmenter):
    def __init__(self, version: str = "v1"):
        self.version = version
        self.calls: list[int] = []

    @property
    def settings(self) -> dict[str, str]:
        return {**super().settings, "test_version": self.version}

    def augment(self, units):
        self.calls.append(len(units))
        return super().augment(units)


def test_cache_second_run_does_no_generation(tmp_path):
    units = [KnowledgeUnit(f"u{i}", f"Passage {i} mentions Paris in {1900 + i}.")
             for i in range(5)]
    path = tmp_path / "aug.jsonl"
    first = CountingAugmenter()
    augs = augment_cached(units, first, path, chunk_size=2)
    assert first.calls == [2, 2, 1]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["unit_id"] for r in lines] == ["u0", "u1", "u2", "u3", "u4"]
    assert lines[0]["augmentation"]["qa"][0]["question"].startswith("Fill in the blank")
    second = CountingAugmenter()
    assert augment_cached(units, second, path) == augs and second.calls == []
    # same text under another id is a hit; other settings are a miss
    renamed = [KnowledgeUnit("other", units[0].text)]
    assert augment_cached(renamed, second, path) == augs[:1] and second.calls == []
    changed = CountingAugmenter(version="v2")
    augment_cached(units[:1], changed, path)
    assert changed.calls == [1]


def test_cache_repairs_a_truncated_last_line(tmp_path):
    units = [KnowledgeUnit(f"u{i}", f"Text {i} about Rome.") for i in range(3)]
    path = tmp_path / "aug.jsonl"
    augment_cached(units[:2], CountingAugmenter(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # crash in the middle of the second line
    cache = AugmentationCache(path)
    assert cache.repaired == [2] and len(cache) == 1
    assert path.read_bytes().count(b"\n") == 1  # rewritten without the broken line
    again = CountingAugmenter()
    augment_cached(units, again, cache)
    assert again.calls == [2]  # u1 (lost) and u2 (new)
    assert [json.loads(line)["unit_id"] for line in path.read_text().splitlines()] == [
        "u0", "u1", "u2"]


# -- PRAG training examples ----------------------------------------------------------------------

def test_training_examples_follow_prag(tokenizer):
    aug = ExtractiveAugmenter().augment([CURIE])[0]
    aug = type(aug)(paraphrase="PARA", qa=(QAPair("Q1?", "A1", "Full A1."), QAPair("Q2?", "A2"),
                                           QAPair("Q3?", "A3", "Full A3.")))
    ex = training_examples(CURIE, aug, tokenizer, include_passage_lm=False)
    # the plain frame (this tokenizer has no chat template) writes "Answer: A1", space included
    assert [(e.prompt, e.target) for e in ex] == [
        (format_prompt(tokenizer, "Q1?", [CURIE.text]), " A1"),
        (format_prompt(tokenizer, "Q1?", ["PARA"]), " A1"),
        (format_prompt(tokenizer, "Q2?", [CURIE.text]), " A2"),
        (format_prompt(tokenizer, "Q2?", ["PARA"]), " A2"),
        (format_prompt(tokenizer, "Q3?"), " A3")]
    assert ex[0].prompt.startswith("Context:\nPassage 1: Marie Curie") and ex[0].prompt.endswith(
        "Question: Q1?\nAnswer:")
    full = training_examples(CURIE, aug, tokenizer, target="full_answer")
    assert [(e.prompt, e.target) for e in full[:2]] == [("", CURIE.text), ("", "PARA")]
    assert [e.target for e in full[2:]] == [" Full A1.", " Full A1.", " A2", " A2", " Full A3."]
    with pytest.raises(ValueError, match="target style"):
        training_examples(CURIE, aug, tokenizer, target="long")  # type: ignore[arg-type]



def test_regex_stop_marks_rows_that_closed_the_qa_list(tokenizer):
    from dmoe.augment.hf import _RegexStop
    from dmoe.augment.llm import QA_STOP

    rows = [list(b'PROMPT[{"a": 1}]'), list(b'PROMPT[{"a": 1},')]
    stop = _RegexStop(tokenizer, QA_STOP, prompt_width=6)
    assert stop(torch.tensor(rows), None).tolist() == [True, False]


def test_base_model_plain_frame_opens_with_demonstrations_in_training_and_inference():
    from conftest import CharTokenizer

    from dmoe.prompts import (
        DEMONSTRATIONS,
        DEMOS_ATTR,
        format_prompt,
        use_demonstrations,
        user_message,
    )

    tok = CharTokenizer()  # no chat template: a base model's plain frame
    bare = format_prompt(tok, "Q1?", [CURIE.text])
    assert bare == user_message("Q1?", [CURIE.text]) + "\nAnswer:"
    use_demonstrations(tok)
    framed = format_prompt(tok, "Q1?", [CURIE.text])
    assert framed == DEMONSTRATIONS + bare
    assert DEMONSTRATIONS.count("\nAnswer: ") == 2 and DEMONSTRATIONS.endswith("\n\n")
    # an expert's QA examples are asked in the same frame the eval asks in
    aug = ExtractiveAugmenter().augment([CURIE])[0]
    qa = [e for e in training_examples(CURIE, aug, tok, recipe="recite_qa")
          if e.prompt.endswith("\nAnswer:")]
    assert qa and all(e.prompt.startswith(DEMONSTRATIONS) for e in qa)

    class Chat:
        chat_template = "{{ messages }}"

    chat = Chat()
    use_demonstrations(chat)
    assert not hasattr(chat, DEMOS_ATTR)  # instruct models keep their chat template


def test_targets_are_written_as_the_frame_continues_them():
    """A plain frame's targets open with the space its "Answer:" / "Assistant:" is followed by
    (DEMONSTRATIONS write "Answer: 1989"); a chat template's open the reply as they are. Runs of
    spaces in a passage are written as one, in every frame."""
    from conftest import CharTokenizer

    from dmoe.augment.training import written
    from dmoe.prompts import reply_text

    assert written("  Scotland.  The breed\t\tis  old. ") == "Scotland. The breed is old."
    assert written("line one.\nline two") == "line one.\nline two"  # newlines stay
    unit = KnowledgeUnit(id="u", text="Scotland.  The breed is old.", title="T")
    aug = ExtractiveAugmenter().augment([unit])[0]
    plain = CharTokenizer()

    class Chat(CharTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    for tok, lead in ((plain, " "), (Chat(), "")):
        assert reply_text(tok, "x") == lead + "x"
        ex = training_examples(unit, aug, tok, recipe="recite_qa")
        chat_recite, bos_recite, *qa = ex
        assert chat_recite.target == lead + "Scotland. The breed is old."
        assert bos_recite.target == "Scotland. The breed is old."  # a document opens bare
        assert qa and all(e.target.startswith(lead) and "  " not in e.target for e in qa)
        assert all(e.target[len(lead):] == e.target[len(lead):].lstrip() for e in qa)


def test_recite_lead_answers_short_then_gives_the_sentence():
    """``recite_lead`` is ``recite_qa`` with each QA target led by the short answer and a line
    break (where the eval stops an answer), then the passage's sentence."""
    from conftest import CharTokenizer

    from dmoe.eval.metrics import ANSWER_STOPS

    tok = CharTokenizer()
    aug = ExtractiveAugmenter().augment([CURIE])[0]
    full = training_examples(CURIE, aug, tok, recipe="recite_qa")
    lead = training_examples(CURIE, aug, tok, recipe="recite_lead")
    assert [e.prompt for e in lead] == [e.prompt for e in full]
    assert lead[:2] == full[:2]  # the recitations are the same
    for qa, f, ld in zip(aug.qa, full[2:], lead[2:], strict=True):
        assert ld.target == f" {qa.answer}\n{f.target.lstrip()}"
        assert "\n" in ANSWER_STOPS and ld.target.index("\n") == len(qa.answer) + 1
        assert ld.teacher_prompt == f.teacher_prompt


def test_dmoe_build_offers_every_recipe():
    """``dmoe build --recipe`` lists its choices literally (importing the training modules would
    slow every ``dmoe`` command's start-up); they must stay ``RECIPES``."""
    from dmoe.augment.training import RECIPES
    from dmoe.cli import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions)  # type: ignore[union-attr]
    choices = next(a.choices for a in sub.choices["build"]._actions if a.dest == "recipe")
    assert tuple(choices) == RECIPES
