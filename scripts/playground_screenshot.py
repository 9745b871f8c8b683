"""Take docs/playground.png: a real `dmoe serve` (the packaged SmolLM2 unless --model) over a fresh
bank, driven in headless Chromium as a person would use the page: add three documents of the demo
corpus, ask a question whose answer needs one of them, open the expert behind the answer.

    .venv/bin/python scripts/playground_screenshot.py --out docs/playground.png

Needs chromium and chromedriver (scripts/setup.sh installs them as root). Prints what it saw as
JSON (the answers, the experts named, the build times), so the picture can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import DmoeServe  # noqa: E402
from playground_driver import Playground, start_chromium  # noqa: E402

DOCS = ("velmora", "quetzal-lang", "zorbit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    ap.add_argument("--model", default=None, help="model directory or file (default: SmolLM2)")
    ap.add_argument("--question", default="Where is the zorbit fruit grown?")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()

    corpus = {d["id"]: d for d in map(json.loads, (ROOT / "examples" / "demo_corpus.jsonl")
                                       .read_text().splitlines()) if d}
    with tempfile.TemporaryDirectory() as tmp:
        server = DmoeServe(Path(tmp) / "bank", Path(args.model) if args.model else None,
                           timeout=300)
        driver = start_chromium(1440, 1250)
        try:
            page = Playground(driver, server.url, timeout=600)
            page.open()
            jobs = []
            for doc_id in DOCS:
                added = page.add_document(corpus[doc_id]["title"], corpus[doc_id]["text"])
                jobs.append({"doc": doc_id, "experts": added, "job": page.find("#job").text,
                             "error": page.error("kb")})
            page.ask(args.question, max_tokens=args.max_tokens)
            attributed = [s for s in page.find_all("#answer-dmoe .seg")
                          if (s.get_attribute("data-experts") or "").strip()]
            if attributed:
                attributed[0].click()
                page.wait(lambda: page.find("#detail-text").text not in ("", "loading…"))
            driver.execute_script("window.scrollTo(0, 0)")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
            print(json.dumps({
                "out": args.out, "server": page.find("#server").text, "jobs": jobs,
                "question": args.question,
                "base": page.find("#answer-base [data-role=text]").text,
                "dmoe": page.find("#answer-dmoe [data-role=text]").text,
                "dmoe_stats": page.find("#answer-dmoe [data-role=stats]").text,
                "legend": page.find("#legend").text, "detail": page.find("#detail-title").text,
                "errors": [page.error("ask"), page.error("kb")]}, indent=1))
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    main()
