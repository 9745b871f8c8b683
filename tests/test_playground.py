"""The playground page in a real headless Chromium against a real ``dmoe serve`` on loopback (a
tiny random Llama saved as a model directory): keys, adding a document, asking, the token view's
attribution, the passage behind an expert, deleting it, and asking again."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import DmoeServe, tiny_model_dir
from playground_driver import Playground, browser_paths, start_chromium

pytestmark = [pytest.mark.browser, pytest.mark.integration]

USER, ADMIN = "user-key", "admin-key"
QUESTION = "Who founded the town of Velmora?"
TITLE = "Velmora"
TEXT = ("Velmora is a river town founded by Tamsin Oker in 1702. Velmora has seven green towers "
        "and a salt market.")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("playground")
    serve = DmoeServe(tmp / "bank", tiny_model_dir(tmp / "model"), key=USER,
                      env={"DMOE_API_KEY": USER, "DMOE_ADMIN_KEY": ADMIN})
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def page(server: DmoeServe):
    paths = browser_paths()
    if isinstance(paths, str):
        pytest.skip(paths)
    pytest.importorskip("selenium")
    driver = start_chromium()
    try:
        yield Playground(driver, server.url)
    finally:
        driver.quit()


def rgb(colour: str) -> tuple[int, ...]:
    """``rgb(a, b, c)`` / ``rgba(a, b, c, 1)`` as computed by the browser -> ``(a, b, c)``."""
    return tuple(int(x) for x in re.findall(r"\d+", colour)[:3])


def test_the_page_is_static_and_needs_no_key(server: DmoeServe):
    html = httpx.get(server.url + "/")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert "default-src 'self'" in html.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="([^"]+)"', html.text):
        assert src.startswith("/playground/"), f"{src} is not served by dmoe (no CDN)"
        assert httpx.get(server.url + src).status_code == 200
    config = httpx.get(server.url + "/playground/config.json").json()
    assert config["top_k"] >= 1 and config["max_tokens"] >= 1
    assert httpx.get(server.url + "/playground/../bank.json").status_code == 404
    assert httpx.get(server.url + "/v1/experts").status_code == 401  # the API still needs the key


def test_add_ask_attribute_delete_ask_again(page: Playground):
    page.open()
    assert "API key" in page.error("kb")  # no key yet: the page says what to do

    page.set_keys(USER)  # the user key cannot add knowledge
    page.type("#doc-title", TITLE)
    page.type("#doc-text", TEXT)
    page.find("#doc-button").click()
    page.wait(lambda: "admin key" in page.error("kb"), message="no 403 message shown")

    page.set_keys(USER, ADMIN)
    assert page.error("kb") == "" and "0 experts" in page.find("#server").text
    added = page.add_document(TITLE, TEXT)
    assert page.error("kb") == "" and len(added) >= 1, page.find("#job").text
    assert "1 expert" in page.find("#job").text or f"{len(added)} experts" in page.find("#job").text
    assert page.expert_ids() == added

    page.ask(QUESTION, max_tokens=8, gate=0)  # no gate: a random model's query may score low
    assert page.error("ask") == ""
    assert page.find("#answer-base").is_displayed() and page.find("#answer-dmoe").is_displayed()
    assert page.find("#answer-base [data-role=text]").text.strip()
    expert = added[0]
    segs = page.find_all(f'#answer-dmoe .seg[data-experts~="{expert}"]')
    assert segs, "no token of the dmoe answer is attributed to the new expert"
    swatch = page.find(f'#legend button[data-expert="{expert}"] .swatch')
    assert TITLE in page.find(f'#legend button[data-expert="{expert}"]').text
    for seg in segs:  # coloured by that expert: the legend's colour
        assert rgb(seg.value_of_css_property("background-color")) == \
            rgb(swatch.value_of_css_property("background-color"))
    n_tokens = len(page.find_all("#answer-dmoe .tok"))
    assert n_tokens >= 1 and len(page.find_all("#strip-plot rect.bar")) == n_tokens
    assert page.find_all("#strip-plot line.tau")
    assert "tokens" in page.find("#answer-dmoe [data-role=stats]").text

    segs[0].click()  # the passage behind the expert
    page.wait(lambda: "Tamsin Oker" in page.find("#detail-text").text,
              message="the expert's passage never showed")
    assert page.find("#detail-title").text == TITLE

    page.delete_expert(expert)
    assert page.error("kb") == "" and page.expert_ids() == []

    page.ask(QUESTION, max_tokens=8, gate=0)
    assert page.error("ask") == ""
    assert page.find_all("#answer-dmoe .tok"), "the second answer has no token view"
    attributed = [s for s in page.find_all("#answer-dmoe .seg")
                  if (s.get_attribute("data-experts") or "").strip()]
    assert attributed == [], "tokens are still attributed to the deleted expert"
    assert "No expert was active" in page.find("#legend").text


def test_a_refused_request_is_shown_as_text(page: Playground):
    page.open()
    page.set_keys(USER, ADMIN)
    page.type("#question", QUESTION)
    page.type("#tau", "-1")  # outside the field's range: refused before it is sent
    page.find("#ask-button").click()
    page.wait(lambda: "τ" in page.error("ask"), message="no message for a bad τ")
    page.type("#tau", "2")
    page.set_keys("wrong-key")
    assert "API key" in page.error("kb")
    page.ask(QUESTION, mode="dmoe", max_tokens=4)
    assert "API key" in page.error("ask")
    assert page.find("#answer-dmoe").get_attribute("data-state") == "failed"
