"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright (as tests/test_report_browser.py),
against `imagerag serve web`'s app on a small mini corpus. Every request to anything but loopback is aborted and
recorded, and each test ends asserting there was none. Screenshots go to $TEST_ARTIFACTS_DIR when set, else to the
test's tmp folder.

Two pages are served: the mini profile as shipped, and the same backends with a critic that is never satisfied
(its runs go on until their budget is spent), for what needs a run that lasts: a stop, a queue, review pauses."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from test_report_browser import CHROMIUM, CHROMIUM_ARGS

from imagerag.agent.config import Settings
from imagerag.agent.serving import serving_in_thread
from imagerag.agent.web import ChatPage, build_app
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.loading import load_backends, load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.miniworld.world import write_corpus
from imagerag.tools.profiles import MINI_COLLECTION
from imagerag.tools.types import Critique

pytestmark = pytest.mark.slow  # a server and a headless Chromium

PROMPT = "a large red crescent in the top left, a blue ring at the bottom and a yellow square on the right"
WAIT = 240_000  # ms: the shared 2-core machine can be slow; nothing asserts on time
LOOPBACK = ("http://127.0.0.1", "data:", "blob:")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Settings:
    """A data folder whose mini collection holds a small corpus (open_store reuses it: the profile's 20,000-image
    corpus is never rendered)."""
    root = tmp_path_factory.mktemp("mini")
    write_corpus(root / "corpus", n=200, seed=1)
    settings = Settings(profile="mini", data_dir=root)
    store = ReferenceStore.open(chroma_client(root), MINI_COLLECTION, load_embedder(settings), create=True)
    assert index_folders(store, [root / "corpus"]).failed == 0
    return settings


class NeverSatisfied:
    """The profile's critic with every verdict turned to missing: a run goes on until its budget is spent."""

    def __init__(self, critic):
        self.critic = critic

    def critique(self, image, concepts, prompt) -> Critique:
        critique = self.critic.critique(image, concepts, prompt)
        return critique.model_copy(
            update={"verdicts": [v.model_copy(update={"satisfied": False}) for v in critique.verdicts]}
        )


@pytest.fixture(scope="module")
def url(mini, tmp_path_factory) -> Iterator[str]:
    with serving_in_thread(build_app(ChatPage(mini, tmp_path_factory.mktemp("runs")))) as address:
        yield address


@pytest.fixture(scope="module")
def stubborn(mini, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    backends = load_backends(mini)
    out = tmp_path_factory.mktemp("stubborn-runs")
    page = ChatPage(mini, out, replace(backends, critic=NeverSatisfied(backends.critic)))
    with serving_in_thread(build_app(page)) as address:
        yield address, out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Visitor:
    """One browser context on the page: every request off loopback aborted and kept in `outside`."""

    def __init__(self, browser: Browser, url: str):
        self.outside: list[str] = []
        self.problems: list[str] = []
        self.context: BrowserContext = browser.new_context(viewport={"width": 1500, "height": 1000})
        self.context.route("**/*", self._route)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(WAIT)
        self.page.on("pageerror", lambda error: self.problems.append(str(error)))
        self.page.goto(url, wait_until="load")
        self.page.wait_for_selector("#send")

    def _route(self, route: Route) -> None:
        if route.request.url.startswith(LOOPBACK):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def budget(self, rounds: int, images: int | None = None) -> None:
        self.page.fill("#rounds input", str(rounds))
        self.page.fill("#images input", str(images or rounds))

    def send(self, message: str) -> None:
        self.page.fill("#message textarea", message)
        self.page.click("#send")

    def final(self, turn: int | None = None) -> str:
        """The status once the run has ended (of `turn`, when given)."""
        selector = "#status .final:not([data-status=running])" + (f":has-text('turn {turn} ·')" if turn else "")
        found = self.page.wait_for_selector(selector)
        assert found is not None
        return found.inner_text()

    def choose(self, elem_id: str, text: str) -> None:
        self.page.click(f"#{elem_id} input")
        self.page.get_by_role("option", name=text).first.click()

    def images(self) -> list[str]:
        return self.page.eval_on_selector_all("#conversation img.round", "els => els.map(e => e.getAttribute('src'))")

    def shot(self, name: str, tmp_path: Path) -> Path:
        folder = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.outside, f"requests left the machine: {self.outside}"
        assert not self.problems, self.problems


@pytest.fixture
def visit(browser) -> Iterator:
    visitors: list[Visitor] = []

    def open_page(url: str) -> Visitor:
        visitors.append(Visitor(browser, url))
        return visitors[-1]

    yield open_page
    for visitor in visitors:
        visitor.close()


RECORD = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const n = document.querySelectorAll('#conversation img.round').length;
    const done = document.querySelector('#status .final') !== null;
    const last = window.__seen[window.__seen.length - 1];
    if (!last || last[0] !== n || last[1] !== done) window.__seen.push([n, done]);
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def test_a_conversation_streams_rounds_refines_removes_a_concept_and_goes_back(url, visit, tmp_path):
    you = visit(url)
    you.budget(4, 6)
    you.page.evaluate(RECORD)
    you.send(PROMPT)
    first = you.final(1)
    seen = you.page.evaluate("window.__seen")
    # Round images arrive one by one while the run goes, before its final status.
    assert [n for n, done in seen if not done and n >= 1][:2] == [1, 2], seen
    assert "turn 1" in first
    assert len(you.images()) >= 2
    assert (
        you.page.eval_on_selector("#conversation img.round", "e => getComputedStyle(e).imageRendering") == "pixelated"
    )
    assert you.page.eval_on_selector("#conversation img.round", "e => e.width") > e_natural(you)
    assert "round 1 · generate" in you.page.inner_text("#conversation")
    for name in ("best image", "run.json", "report.html"):
        assert you.page.locator(f"#downloads a:has-text('{name}')").count() == 1
    you.shot("web-chat.png", tmp_path)

    you.send("make the ring green")  # a refinement of the same thread
    assert "turn 2" in you.final(2)
    assert "you: make the ring green" in you.page.inner_text("#conversation")
    assert "green ring" in you.page.inner_text("#objects")

    you.choose("concept-pick", "a crescent")  # its object concept: the crescent goes
    you.page.click("#remove-concept")
    assert "turn 3" in you.final(3)
    assert "typed change sent as: 'remove the large red crescent'" in you.page.inner_text("#status")
    you.send("make the square blue")  # the next turn leaves it out
    assert "turn 4" in you.final(4)
    objects = you.page.inner_text("#objects")
    concepts = you.page.eval_on_selector_all(
        "#objects tr[data-concept] td:nth-child(3)", "els => els.map(e => e.innerText)"
    )
    assert "crescent, top left" not in objects.split("removed:")[0]
    assert [c for c in concepts if "crescent" in c] == ["no large red crescent"], concepts

    you.choose("turn-pick", "turn 1:")  # undo to turn 1, then go on from there
    you.page.click("#go-back")
    you.page.wait_for_selector("#status .branch:has-text('continues from turn 1')")
    assert "objects and concepts of turn 1" in you.page.inner_text("#objects")
    you.send("make the ring yellow")
    assert "turn 5" in you.final(5)
    assert "turn 5 (from turn 1)" in you.page.inner_text("#conversation")
    assert "large red crescent, top left" in you.page.inner_text("#objects")
    you.shot("web-chat-branch.png", tmp_path)


def e_natural(you: Visitor) -> int:
    return you.page.eval_on_selector("#conversation img.round", "e => e.naturalWidth")


def test_an_empty_prompt_shows_an_error_and_the_page_goes_on(url, visit):
    you = visit(url)
    you.budget(2)
    you.send("   ")
    error = you.page.wait_for_selector("#status .error")
    assert "the prompt is empty" in error.inner_text()
    you.send("a blue ring at the bottom")
    assert "turn 1" in you.final(1)
    assert you.page.locator("#status .error").count() == 0 and you.images()


def test_stop_ends_the_run_with_the_best_image_so_far(stubborn, visit, tmp_path):
    address, out = stubborn
    you = visit(address)
    you.budget(40)
    you.send(PROMPT)
    you.page.wait_for_selector("#conversation img.round")
    you.page.click("#stop")
    status = you.final(1)
    assert "stopped_by_person" in status
    thread = you.page.get_attribute("#conversation .conversation", "data-thread")
    result = json.loads((out / thread / "run.json").read_text())
    assert result["stop_reason"] == "stopped_by_person" and result["best_image"] and result["rounds"] < 40
    assert you.page.locator("#downloads a:has-text('best image')").count() == 1
    you.shot("web-stopped.png", tmp_path)
    you.budget(2)
    you.send("make the ring green")  # the thread goes on after a stop
    assert "turn 2" in you.final(2)


def test_each_review_button_answers_a_pause(stubborn, visit, tmp_path):
    address, _ = stubborn
    you = visit(address)
    you.budget(6)
    you.page.check("#review input")
    you.send(PROMPT)
    upload = tmp_path / "mine.png"
    Image.new("RGB", (48, 48), "white").save(upload)

    def paused(before_round: int) -> None:
        you.page.wait_for_selector(f"#review-box #review-hits .review:has-text('before round {before_round}:')")
        you.page.wait_for_selector("#status .paused")

    paused(2)
    you.shot("web-review.png", tmp_path)
    you.page.locator("#review-choice input[type=checkbox]").first.check()  # the first pause has hits
    you.page.click("#accept-chosen")
    paused(3)
    you.page.click("#accept-all")
    paused(4)
    you.page.click("#drop-all")
    paused(5)
    you.page.set_input_files("#review-upload input[type=file]", str(upload))
    you.page.wait_for_selector("#review-upload :text('mine.png')")
    you.page.click("#review-replace")
    paused(6)
    steps = you.page.inner_text("#conversation")
    assert "round 5" in steps  # four answers, four regenerations
    you.page.click("#stop")  # a stop answers a pause too
    assert "stopped_by_person" in you.final(1)


def test_two_visitors_queue_on_the_pipeline_and_keep_their_own_images(stubborn, visit):
    address, _ = stubborn
    first, second = visit(address), visit(address)
    first.budget(40)
    first.send(PROMPT)
    first.page.wait_for_selector("#conversation img.round")
    second.budget(2)
    second.send("a blue ring at the bottom")
    second.page.wait_for_selector("#status .waiting")  # told it waits for the other visitor's run
    first.page.click("#stop")
    assert "stopped_by_person" in first.final(1)
    assert "turn 1" in second.final(1)
    threads = [v.page.get_attribute("#conversation .conversation", "data-thread") for v in (first, second)]
    assert threads[0] != threads[1]
    for visitor, thread in zip((first, second), threads, strict=True):
        images = visitor.images()
        assert images and all(src.startswith(f"/files/{thread}/images/") for src in images), images
    assert not set(first.images()) & set(second.images())
