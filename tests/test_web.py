"""The chat page's guard and its typed changes, without a browser: the token (a one-time ?token= sets an HttpOnly
cookie) on the page, the API and the file routes; Host and Origin checks (DNS rebinding), loopback included; files
only from run folders; no start off loopback without a token; edits of the object list said as messages the
thread's reader understands as exactly those changes; errors a person can fix shown with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from imagerag.agent.config import Settings
from imagerag.agent.run import STOPPED_BY_PERSON, history, run, stream
from imagerag.agent.web import COOKIE, ChatPage, Controls, Session, WebError, as_message, build_app, required_token
from imagerag.graphs.state import Budget
from imagerag.tools.errors import ConfigError
from imagerag.tools.revision import Add, Move, NewObject, ObjectRef, Remove, SetAttribute
from imagerag.tools.types import SceneObject, ScenePlan

TOKEN = "a-token-of-at-least-16-characters"
PROMPT = "a red heart on the left and a blue square on the right"
LOCAL = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> ChatPage:
    root = tmp_path_factory.mktemp("web")
    out = root / "runs"
    (out / "t1" / "images").mkdir(parents=True)
    (out / "t1" / "settings.json").write_text("{}")
    (out / "t1" / "run.json").write_text('{"status": "satisfied"}')
    (out / "t1" / "images" / "abc.png").write_bytes(b"\x89PNG")
    (out / "not-a-run").mkdir()
    (out / "not-a-run" / "run.json").write_text("{}")
    (root / "secret.txt").write_text("secret")
    (out / "t1" / "images" / "link.png").symlink_to(root / "secret.txt")
    return ChatPage(Settings(profile="mini", data_dir=root / "data"), out)


@pytest.fixture(scope="module")
def guarded(page) -> TestClient:
    return TestClient(build_app(page, "127.0.0.1", TOKEN), base_url=LOCAL, follow_redirects=False)


@pytest.fixture(scope="module")
def open_app(page) -> TestClient:
    return TestClient(build_app(page, "127.0.0.1", None), base_url=LOCAL, follow_redirects=False)


ROUTES = ["/", "/gradio_api/info", "/config", "/files/t1/run.json", "/files/t1/images/abc.png"]


@pytest.mark.parametrize("path", ROUTES)
def test_without_the_cookie_or_token_the_page_api_and_files_are_refused(guarded, path):
    guarded.cookies.clear()
    assert guarded.get(path).status_code == 401
    assert guarded.get(path, params={"token": TOKEN[:-1] + "x"}).status_code == 401
    assert guarded.get(path, cookies={COOKIE: "wrong-but-long-enough-token"}).status_code == 401
    assert guarded.post("/gradio_api/queue/join", json={}).status_code == 401


def test_the_token_sets_an_httponly_cookie_and_leaves_the_address(guarded):
    guarded.cookies.clear()
    answer = guarded.get("/", params={"token": TOKEN, "x": "1"})
    assert answer.status_code == 303 and answer.headers["location"] == "/?x=1"
    cookie = answer.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    for path in ROUTES:
        assert guarded.get(path).status_code == 200, path  # the client keeps the cookie
    assert guarded.get("/files/t1/run.json").json() == {"status": "satisfied"}
    guarded.cookies.clear()


@pytest.mark.parametrize("client", ["guarded", "open_app"])
def test_a_foreign_host_or_origin_is_refused_on_loopback_too(client, request):
    app: TestClient = request.getfixturevalue(client)
    cookies = {COOKIE: TOKEN}
    assert app.get("/", cookies=cookies).status_code == 200
    assert app.get("/", headers={"host": "localhost:9999"}, cookies=cookies).status_code == 200
    assert app.get("/", headers={"host": "evil.example"}, cookies=cookies).status_code == 421
    assert app.get("/", headers={"host": "127.0.0.1.evil.example"}, cookies=cookies).status_code == 421
    refused = app.post("/gradio_api/queue/join", json={}, headers={"origin": "http://evil.example"}, cookies=cookies)
    assert refused.status_code == 403
    assert app.get("/", headers={"origin": "http://127.0.0.1:7860"}, cookies=cookies).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/files/t1/settings.json",  # not a file the page shows
        "/files/t1/images/link.png",  # a link out of the run folder
        "/files/not-a-run/run.json",  # no run folder
        "/files/t1/../secret.txt",
        "/files/t1/images/..%2F..%2Fsecret.txt",
        "/files/..%2Fsecret.txt/run.json",
        "/gradio_api/file=/etc/passwd",
    ],
)
def test_files_come_only_from_run_folders(open_app, path):
    answer = open_app.get(path)
    assert answer.status_code in (403, 404), (path, answer.status_code)
    assert b"secret" not in answer.content and b"root:" not in answer.content


def test_a_download_names_its_thread_and_a_report_may_load_nothing(open_app):
    answer = open_app.get("/files/t1/run.json", params={"download": 1})
    assert answer.status_code == 200 and 'filename="t1-run.json"' in answer.headers["content-disposition"]
    assert "default-src 'none'" in answer.headers["content-security-policy"]


def test_off_loopback_a_token_is_required():
    with pytest.raises(ConfigError, match="without a token"):
        required_token("0.0.0.0", None)
    with pytest.raises(ConfigError, match="at least 16"):
        required_token("0.0.0.0", "short")
    assert required_token("192.168.1.20", TOKEN) == TOKEN
    assert required_token("127.0.0.1", None) is None and required_token("::1", "") is None


@pytest.mark.slow  # a subprocess of the CLI
def test_the_cli_refuses_to_serve_off_loopback_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IMAGERAG_WEB_TOKEN"}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("imagerag")), "serve", "web", "--host", "0.0.0.0", "--profile", "mini"],
        check=False,
        capture_output=True,
        text=True,
        env=env | {"IMAGERAG_DATA_DIR": str(tmp_path)},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "without a token" in done.stderr and "Traceback" not in done.stderr


SCENE = ScenePlan(
    objects=[
        SceneObject(id="o1", noun="crescent", attributes={"size": "large", "colour": "red"}, cell="top left"),
        SceneObject(id="o2", noun="ring", attributes={"colour": "blue"}, cell="bottom"),
        SceneObject(id="o3", noun="ring", attributes={"colour": "blue"}, cell="right"),
    ]
)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ([Remove(target=ObjectRef(id="o1"))], "remove the large red crescent"),
        ([SetAttribute(target=ObjectRef(id="o1"), value="green")], "make the large red crescent green"),
        ([Move(target=ObjectRef(id="o1"), cell="centre")], "move the large red crescent to the centre"),
        # Two blue rings: the words alone could mean either, so the place is said.
        ([Remove(target=ObjectRef(id="o3"))], "remove the blue ring on the right"),
        (
            [Add(objects=[NewObject(noun="star", attributes=["small", "yellow"], cell="top right")])],
            "add a small yellow star in the top right",
        ),
    ],
)
def test_an_edit_of_the_object_list_is_said_as_the_message_that_makes_it(changes, said):
    assert as_message(changes, SCENE, "miniworld") == said


def test_an_edit_the_reader_would_not_make_is_refused():
    with pytest.raises(WebError, match="no object"):
        as_message([Remove(target=ObjectRef(id="o9"))], SCENE, "miniworld")
    with pytest.raises(WebError):  # the miniature world has no such colour
        as_message([SetAttribute(target=ObjectRef(id="o1"), value="mauve")], SCENE, "miniworld")


def _last_error(updates) -> str | None:
    last = list(updates)[-1]
    return last[0].error


@pytest.mark.slow  # opens the profile's CLIP model for the missing collection
def test_errors_a_person_can_fix_are_shown_with_the_fix(page):
    empty = _last_error(page.send("  \u200b ", Controls(), Session()))
    assert empty and "the prompt is empty" in empty
    agent = _last_error(page.send("a red square", Controls(policy="agent"), Session()))
    assert agent and "needs an LLM" in agent and "IMAGERAG_LLM__MODEL" in agent
    missing = ChatPage(page.settings.model_copy(update={"collection": "no-such-collection"}), page.out)
    error = _last_error(missing.send("a red square", Controls(), Session()))
    assert error and "no-such-collection" in error and "imagerag index" in error
    answer = _last_error(page.review({"action": "accept"}, Controls(), Session()))
    assert answer == "no run waits for a review"


@pytest.mark.slow  # two runs of the tiny profile
def test_a_stop_ends_the_run_with_its_best_image_and_the_thread_goes_on(tiny_settings, tmp_path):
    """agent.run's stop (the page's Stop button): taken where the next node would start; the turn is recorded with
    the best image so far under its own stop reason, and the thread takes its next message."""
    settings = tiny_settings.model_copy(update={"budget": Budget(max_rounds=20, max_generations=20)})
    stop = threading.Event()
    events = []
    for event in stream(PROMPT, settings, tmp_path, "stopped", None, None, stop):
        events.append(event)
        if event.kind == "verdicts":
            stop.set()
    result = events[-1].result
    assert result.stop_reason == STOPPED_BY_PERSON and result.status == "budget_exhausted"
    assert result.rounds == 1 and result.best_image and Path(result.best_image).is_file()
    assert history("stopped", settings)[-1].stop_reason == STOPPED_BY_PERSON
    assert json.loads((tmp_path / "stopped" / "run.json").read_text())["stop_reason"] == STOPPED_BY_PERSON
    then = run(
        "make the square blue", settings.model_copy(update={"budget": Budget(max_rounds=1)}), tmp_path, "stopped"
    )
    assert then.turn == 2 and then.stop_reason != STOPPED_BY_PERSON
