"""Drive the playground page (``dmoe serve``'s ``/``) in headless Chromium through Selenium.

Used by ``tests/test_playground.py`` and by ``scripts/playground_screenshot.py``; it only clicks
and types what a person would, and reads what the page shows.
"""

from __future__ import annotations

import shutil
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def browser_paths() -> tuple[str, str] | str:
    """``(chromium, chromedriver)``, or why there is none."""
    chromium = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver))
                               if p is None)
        return (f"no {missing} on PATH (scripts/setup.sh installs Debian's chromium and "
                f"chromium-driver when it runs as root)")
    return chromium, driver


def start_chromium(width: int = 1440, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if isinstance(paths, str):
        raise RuntimeError(paths)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))


class Playground:
    def __init__(self, driver: Any, url: str, timeout: float = 120) -> None:
        self.driver = driver
        self.url = url
        self.timeout = timeout

    # -- reading the page --------------------------------------------------------------------

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait(self, condition: Any, timeout: float | None = None, message: str = "") -> Any:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # the page re-renders lists while a condition reads them: a stale element means "poll again"
        return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda _: condition(), message)

    def error(self, section: str) -> str:
        """The text of the visible error box of ``ask`` or ``kb`` ("" when hidden)."""
        box = self.find(f"#{section}-error")
        return str(box.text) if box.is_displayed() else ""

    def expert_ids(self) -> list[str]:
        return [li.get_attribute("data-expert") for li in self.find_all("#experts li[data-expert]")]

    # -- doing things ------------------------------------------------------------------------

    def open(self) -> None:
        self.driver.get(self.url + "/")
        self.wait(lambda: self.find("#server").text != "connecting…", message="header never set")

    def type(self, css: str, text: str) -> None:
        box = self.find(css)
        box.clear()
        box.send_keys(text)

    def set_keys(self, api_key: str, admin_key: str = "") -> None:
        if not self.find("#keys").get_attribute("open"):
            self.find("#keys summary").click()
        self.type("#api-key", api_key)
        self.type("#admin-key", admin_key)
        self.find("#keys-form button[type=submit]").click()
        self.wait(lambda: self.find("#server").text not in ("connecting…", "not connected")
                  or self.error("kb"), message="keys were never tried")

    def add_document(self, title: str, text: str) -> list[str]:
        """Submit a document and wait for its job; the ids of the experts it added."""
        self.type("#doc-title", title)
        self.type("#doc-text", text)
        self.find("#doc-button").click()
        self.wait(lambda: self.find("#job").get_attribute("data-status") in ("succeeded", "failed")
                  or self.error("kb"), message="the build job never finished")
        self.wait(lambda: not self.find("#doc-button").get_attribute("disabled"))
        return [li.get_attribute("data-expert") for li in self.find_all("#experts li.new")]

    def ask(self, question: str, mode: str = "both", **knobs: float) -> None:
        """Ask and wait until every shown answer is done (or failed)."""
        from selenium.webdriver.support.ui import Select

        self.type("#question", question)
        Select(self.find("#mode")).select_by_value(mode)
        for name, value in knobs.items():
            self.type(f"#{name.replace('_', '-')}", str(value))
        self.find("#ask-button").click()
        cards = [f"#answer-{m}" for m in (("base", "dmoe") if mode == "both" else (mode,))]
        self.wait(lambda: all(self.find(c).get_attribute("data-state") in ("done", "failed")
                              for c in cards) and not self.find("#ask-button")
                  .get_attribute("disabled"), message="the answers never finished")

    def delete_expert(self, expert_id: str) -> None:
        button = self.find(f'#experts li[data-expert="{expert_id}"] button.danger')
        button.click()  # arms it
        button.click()  # deletes
        self.wait(lambda: expert_id not in self.expert_ids() or self.error("kb"),
                  message="the expert never left the list")
