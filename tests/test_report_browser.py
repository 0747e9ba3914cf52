"""report.html in a real browser: Debian's Chromium, headless, driven by Playwright. A real run with the tiny profile
writes the report; every image on the page loads, the console stays clean, and a screenshot is kept.

The screenshot goes to $TEST_ARTIFACTS_DIR when set (CI uploads that folder), else to the test's tmp folder; its
path is printed either way (pytest -s, or -rA)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from imagerag.agent.run import run
from imagerag.graphs.state import Budget

pytestmark = pytest.mark.slow  # drives a headless Chromium

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "a red heart on the left and a blue square on the right"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium, or set CHROMIUM_PATH"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_report_renders_every_image_without_console_errors(browser, tiny_settings, tmp_path):
    result = run(PROMPT, tiny_settings.model_copy(update={"budget": Budget(max_rounds=3)}), tmp_path / "runs")
    report = Path(result.run_dir) / "report.html"

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda message: problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None,
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url[:80]}"))
    page.goto(report.as_uri(), wait_until="load")

    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src.slice(0, 40), complete: e.complete, width: e.naturalWidth}))"
    )
    # One image per candidate at least, plus the references used.
    assert len(images) >= result.generations, images
    assert all(img["complete"] and img["width"] > 0 for img in images), images
    text = page.inner_text("body")
    for concept in result.concepts:
        assert concept.text in text
    assert result.status in text
    assert not problems, problems

    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    assert shot.stat().st_size > 10_000
    shutil.copy(report, folder / "report.html")
    print(f"report screenshot: {shot}")
