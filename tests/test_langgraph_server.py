"""LangGraph Server: `langgraph dev` (in-memory runtime) serves the graphs of langgraph.json on 127.0.0.1, and the
`langgraph_sdk` client drives a thread through it: create it, stream a run, read the final state. Bad input gets
an error event or a clear HTTP error, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from langgraph_sdk import get_sync_client
from langgraph_sdk.errors import BadRequestError, NotFoundError
from PIL import Image
from scripted import TWO_OBJECT_CONCEPTS, FakeOpenAIServer, free_port, server_process
from test_openai_http import scripted_openai

pytestmark = pytest.mark.slow  # starts `langgraph dev`

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red heart on the left and a blue square on the right"


def config_for(folder: Path, guarded: bool = True) -> Path:
    """The repository's langgraph.json with its paths made absolute, so the server's working folder (where the
    in-memory runtime keeps its files) can be a temporary one. `guarded=False` drops the HTTP app that checks input,
    as servers before it were."""
    config = json.loads((REPO / "langgraph.json").read_text())
    config["dependencies"] = [str(REPO / d) if d.startswith(".") else d for d in config["dependencies"]]
    config["graphs"] = {
        name: str(REPO / spec) if spec.startswith("./") else spec for name, spec in config["graphs"].items()
    }
    if guarded:
        config["http"]["app"] = str(REPO / config["http"]["app"])
    else:
        del config["http"]
    path = folder / "langgraph.json"
    path.write_text(json.dumps(config))
    return path


@contextmanager
def langgraph_dev(folder: Path, data_dir: Path, guarded: bool = True, **extra_env: str) -> Iterator[str]:
    cli = Path(sys.executable).parent / "langgraph"
    assert cli.exists(), "langgraph-cli is missing: `make install` installs it (pyproject's dev extra)"
    port = free_port()
    env = {
        **os.environ,
        "IMAGERAG_PROFILE": "tiny",
        "IMAGERAG_DATA_DIR": str(data_dir),
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
        "HF_HUB_OFFLINE": "1",
        "ANONYMIZED_TELEMETRY": "False",
        **extra_env,
    }
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/ok", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    command = [
        str(cli),
        "dev",
        "--config",
        str(config_for(folder, guarded)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-browser",
        "--no-reload",
        "--n-jobs-per-worker",
        "1",
    ]
    log = folder / ("langgraph.log" if guarded else "langgraph-unguarded.log")
    log = log.with_stem(log.stem + ("-llm" if extra_env else ""))
    with server_process(command, log, answers, "langgraph dev", cwd=folder, env=env):
        yield url


@dataclass
class Server:
    url: str
    broken_thread: str  # broken by a server without the input check, before this one started on its files


@pytest.fixture(scope="module")
def langgraph_server(data_dir, tmp_path_factory) -> Iterator[Server]:
    """One `langgraph dev` for the module. Before it starts, a server without the input check (as every server was
    before agent/server_app.py) breaks a thread the way issue 23 found: a first turn, then a blank message. The
    in-memory runtime keeps its threads in the working folder, so the checked server finds that thread."""
    folder = tmp_path_factory.mktemp("langgraph")
    with langgraph_dev(folder, data_dir, guarded=False) as url:
        client = get_sync_client(url=url)
        thread = client.threads.create()["thread_id"]
        client.runs.wait(thread, "imagerag", input={"message": "a red square", "budget": {"max_rounds": 1}})
        with pytest.raises(Exception, match="the prompt is empty"):
            client.runs.wait(thread, "imagerag", input={"message": "   "})
        with pytest.raises(BadRequestError):
            client.threads.get_state(thread)
    with langgraph_dev(folder, data_dir) as url:
        yield Server(url, thread)


def test_a_thread_runs_through_langgraph_server(langgraph_server, data_dir):
    client = get_sync_client(url=langgraph_server.url)
    assistants = {a["graph_id"]: a for a in client.assistants.search()}
    assert set(assistants) == {"imagerag", "agent"}
    # Studio and the server show a caller only what it sets, gets back and may configure.
    for assistant in assistants.values():
        schemas = client.assistants.get_schemas(assistant["assistant_id"])
        assert set(schemas["input_schema"]["properties"]) == {
            "message",
            "messages",
            "seed",
            "budget",
            "review",
            "from_turn",
        }
        assert {"status", "concepts", "candidates"} <= set(schemas["output_schema"]["properties"])
        assert not {"hits", "started_at", "instruction", "messages"} & set(schemas["output_schema"]["properties"])
        assert {"profile", "data_dir", "retrieve_k"} <= set(schemas["context_schema"]["properties"])

    thread = client.threads.create()
    parts = list(
        client.runs.stream(
            thread["thread_id"],
            "imagerag",
            input={"message": PROMPT, "budget": {"max_rounds": 2}},
            stream_mode=["updates", "custom"],
        )
    )
    events = [p.event for p in parts]
    assert "error" not in events, [p.data for p in parts if p.event == "error"]
    updated = [node for p in parts if p.event == "updates" for node in p.data]
    assert updated[:3] == ["plan", "generate", "critique"] and updated[-2:] == ["finish", "reply"]
    assert any(p.event == "custom" and p.data.get("event") == "diffusion_step" for p in parts)

    state = client.threads.get_state(thread["thread_id"])["values"]
    assert state["status"] in {"satisfied", "budget_exhausted"} and 1 <= state["usage"]["rounds"] <= 2
    assert [c["text"] for c in state["concepts"]] == TWO_OBJECT_CONCEPTS
    assert {c["verdict"] for c in state["concepts"]} <= {"satisfied", "missing"}
    # The state holds ids; the images themselves are files in the thread's folder.
    for candidate in state["candidates"]:
        assert (data_dir / "runs" / thread["thread_id"] / "images" / f"{candidate['image_id']}.png").exists()

    # A second message on the thread refines its image: turn 2 starts from the best image of turn 1.
    refined = client.runs.wait(
        thread["thread_id"], "imagerag", input={"message": "make the square green", "budget": {"max_rounds": 1}}
    )
    assert refined["turn"] == 2 and "green square" in refined["prompt"] and len(refined["turns"]) == 2

    # Bad input never reaches a run: the server answers HTTP 422 naming the problem (tests below), and goes on serving.
    for bad, message in [
        ({"message": "   "}, "the prompt is empty"),
        ({"message": PROMPT, "budget": {"max_rounds": 0}}, "greater than or equal to 1"),
        ({"message": 5}, "Input should be a valid string"),
        ({"message": "a red heart " * 400}, "more than 4000"),
    ]:
        other = client.threads.create()["thread_id"]
        answer = post(langgraph_server, f"/threads/{other}/runs/stream", {"assistant_id": "imagerag", "input": bad})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    # A client says how to draw, never where the server keeps data or what it connects to.
    other = client.threads.create()["thread_id"]
    answer = post(
        langgraph_server,
        f"/threads/{other}/runs/stream",
        {"assistant_id": "imagerag", "input": {"message": PROMPT}, "context": {"data_dir": "/tmp/x"}},
    )
    assert answer.status_code == 422 and "a client cannot set data_dir" in answer.json()["detail"], answer.text
    assert not Path("/tmp/x/runs").exists()
    with pytest.raises(NotFoundError):
        list(client.runs.stream("00000000-0000-0000-0000-000000000000", "imagerag", input={"message": PROMPT}))

    again = client.runs.wait(
        client.threads.create()["thread_id"],
        "imagerag",
        input={"message": "a green square", "budget": {"max_rounds": 1}},
    )
    assert again["status"] in {"satisfied", "budget_exhausted"} and again["candidates"]


def post(server: Server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def snapshot(server: Server, thread: str) -> tuple[dict, int]:
    """A thread's state and the length of its history: both readable, and what a refused input must not change."""
    client = get_sync_client(url=server.url)
    state = client.threads.get_state(thread)
    return state, len(client.threads.get_history(thread, limit=1000))


@pytest.fixture(scope="module")
def first_turn(langgraph_server) -> str:
    """A thread with one finished turn ("a red square"), as the issue's case starts."""
    client = get_sync_client(url=langgraph_server.url)
    thread = client.threads.create()["thread_id"]
    done = client.runs.wait(thread, "imagerag", input={"message": "a red square", "budget": {"max_rounds": 1}})
    assert done["status"] in {"satisfied", "budget_exhausted"}
    return thread


BAD_INPUTS = {
    "blank message": ({"message": "   "}, "the prompt is empty"),
    "zero-width message": ({"message": "\u200b\u200d\ufeff\u2060"}, "the prompt is empty"),
    "message over 4,000 characters": ({"message": "a red square " * 400}, "more than 4000"),
    "no message": ({"budget": {"max_rounds": 1}}, "no message: send `message`, or `messages`"),
    "chat message over 4,000 characters": (
        {"messages": [{"role": "user", "content": "a red square " * 400}]},
        "messages[0] refused: the prompt has 5199 characters, more than 4000",
    ),
    "blank chat message": ({"messages": [{"role": "user", "content": " \u200b "}]}, "the prompt is empty"),
    "chat reply from a client": (
        {"messages": [{"role": "assistant", "content": "a red square"}]},
        "send only the person's messages",
    ),
    "empty chat": ({"messages": []}, "messages is empty"),
    "message and chat": ({"message": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
    "message not text": ({"message": ["a red square"]}, "Input should be a valid string"),
    "max_rounds 0": ({"message": "a blue ring", "budget": {"max_rounds": 0}}, "greater than or equal to 1"),
    "max_rounds 1.5": ({"message": "a blue ring", "budget": {"max_rounds": 1.5}}, "valid integer"),
    "max_rounds true": ({"message": "a blue ring", "budget": {"max_rounds": True}}, "valid integer"),
    "max_rounds 10**9": ({"message": "a blue ring", "budget": {"max_rounds": 10**9}}, "less than or equal to 100"),
    "seed 2**63": ({"message": "a blue ring", "seed": 2**63}, "less than 9223372036854775808"),
    "seed -1": ({"message": "a blue ring", "seed": -1}, "greater than or equal to 0"),
    "unknown field": ({"message": "a blue ring", "status": "satisfied"}, "unknown input field(s) 'status'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
@pytest.mark.parametrize("route", ["runs/stream", "runs/wait", "runs"])
def test_a_bad_input_is_refused_before_it_is_stored(langgraph_server, first_turn, case, route):
    bad, message = BAD_INPUTS[case]
    before = snapshot(langgraph_server, first_turn)
    answer = post(langgraph_server, f"/threads/{first_turn}/{route}", {"assistant_id": "imagerag", "input": bad})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert snapshot(langgraph_server, first_turn) == before  # the thread is as it was, state and history readable


def test_the_issue_sequence_refines_the_image_after_a_blank_message(langgraph_server):
    """Issue 23, item 1: "a red square", then a blank message, then "add a blue ring": the third message refines
    the first turn's image."""
    client = get_sync_client(url=langgraph_server.url)
    thread = client.threads.create()["thread_id"]
    client.runs.wait(thread, "imagerag", input={"message": "a red square", "budget": {"max_rounds": 1}})
    answer = post(
        langgraph_server, f"/threads/{thread}/runs/wait", {"assistant_id": "imagerag", "input": {"message": "   "}}
    )
    assert answer.status_code == 422
    refined = client.runs.wait(thread, "imagerag", input={"message": "add a blue ring", "budget": {"max_rounds": 1}})
    assert refined["turn"] == 2 and refined["prompt"] == "a red square and a blue ring", refined
    assert [t["message"] for t in refined["turns"]] == ["a red square", "add a blue ring"]
    assert len(client.threads.get_history(thread, limit=1000)) > 2


def test_stateless_runs_batches_and_state_updates_are_checked_too(langgraph_server, first_turn):
    before = snapshot(langgraph_server, first_turn)
    for path, body in [
        ("/runs/wait", {"assistant_id": "imagerag", "input": {"message": " "}}),
        ("/runs/stream", {"assistant_id": "imagerag", "input": {"message": "a", "seed": 2**63}}),
        (
            "/runs/batch",
            [
                {"assistant_id": "imagerag", "input": {"message": "a"}},
                {"assistant_id": "imagerag", "input": {"message": ""}},
            ],
        ),
        (f"/threads/{first_turn}/state", {"values": {"message": "   "}}),
        (f"/threads/{first_turn}/state", {"values": {"status": "done"}}),
        (f"/threads/{first_turn}/state", {"values": {"budget": {"max_rounds": 0}}}),
        (f"/threads/{first_turn}/runs/wait", {"assistant_id": "imagerag", "command": {"update": {"seed": -5}}}),
        ("/threads", {"supersteps": [{"updates": [{"values": {"message": ""}, "as_node": "finish"}]}]}),
    ]:
        answer = post(langgraph_server, path, body)
        assert answer.status_code == 422, (path, body, answer.text)
    assert snapshot(langgraph_server, first_turn) == before


def test_remote_context_gets_the_bounds_of_every_front_end(langgraph_server, first_turn):
    before = snapshot(langgraph_server, first_turn)
    for context, message in [
        ({"retrieve_k": 10**9}, "less than or equal to 20"),
        ({"retrieve_k": 0}, "greater than or equal to 1"),
        ({"samples": 17}, "less than or equal to 16"),
        ({"max_tool_errors": 10**6}, "less than or equal to 20"),
        ({"collection": "../../x"}, "collection must be a name"),
        ({"profile": "p" * 10_000}, "profile must be a name"),
        ({"chroma_url": "http://10.0.0.1:8000"}, "a client cannot set chroma_url"),
    ]:
        for body in [{"context": context}, {"config": {"configurable": context}}]:
            body = {"assistant_id": "imagerag", "input": {"message": "add a blue ring"}, **body}
            answer = post(langgraph_server, f"/threads/{first_turn}/runs/wait", body)
            assert answer.status_code == 422 and message in answer.json()["detail"], (context, answer.text)
    assert snapshot(langgraph_server, first_turn) == before


def png_base64(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_review_answer_is_bounded_and_checked_before_it_is_stored(langgraph_server):
    """Issue 23, item 4: five uploads with a 2 MB caption each used to be stored whole in the thread."""
    client = get_sync_client(url=langgraph_server.url)
    thread = client.threads.create()["thread_id"]
    client.runs.wait(thread, "imagerag", input={"message": PROMPT, "budget": {"max_rounds": 2}, "review": True})
    before = snapshot(langgraph_server, thread)
    assert before[0]["next"] == ["review"]  # paused: a person's answer is awaited
    interrupt_id = before[0]["tasks"][0]["interrupts"][0]["id"]
    upload = png_base64("red")
    for answer_value, message in [
        ({"action": "replace", "uploads": [upload] * 5, "caption": "x" * 2_000_000}, "5 uploads, more than 4"),
        ({"action": "replace", "uploads": [upload], "caption": "x" * 2_000_000}, "more than 1000"),
        ({"action": "replace", "uploads": ["A" * 6_000_000]}, "upload 1 is over 4 MiB"),
        ({"action": "replace", "uploads": ["bm90IGFuIGltYWdl"]}, "upload 1 is not an image"),
        ({"action": "replace", "images": ["/etc/passwd"]}, "not as paths"),
        ({"action": "replace"}, "needs at least one image"),
        ({"action": "burn"}, "action: Input should be 'accept', 'drop' or 'replace'"),
        ({"action": "accept", "keep": ["x" * 65]}, "keep names at most 256 hit ids"),
        ({interrupt_id: {"action": "replace", "uploads": [upload] * 5}}, "5 uploads, more than 4"),
    ]:
        body = {"assistant_id": "imagerag", "command": {"resume": answer_value}}
        answer = post(langgraph_server, f"/threads/{thread}/runs/wait", body)
        assert answer.status_code == 422 and message in answer.json()["detail"], (message, answer.text[:300])
    too_big = httpx.post(
        f"{langgraph_server.url}/threads/{thread}/runs/wait",
        content=b'{"assistant_id": "imagerag", "command": {"resume": {"caption": "' + b"x" * 24_000_000 + b'"}}}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert too_big.status_code == 413 and "over 22 MiB" in too_big.json()["detail"], too_big.text[:300]
    assert snapshot(langgraph_server, thread) == before

    # A good answer within the bounds goes through: its upload becomes the reference of the regeneration.
    done = client.runs.wait(
        thread, "imagerag", command={"resume": {"action": "replace", "uploads": [upload], "caption": "a red heart"}}
    )
    assert done["status"] in {"satisfied", "budget_exhausted"}, done
    assert any(ref.get("caption") == "a red heart" for c in done["candidates"] for ref in c.get("references") or []), (
        done["candidates"]
    )


def test_a_thread_broken_before_the_check_names_its_repair_and_the_repair_restores_it(langgraph_server):
    client = get_sync_client(url=langgraph_server.url)
    thread = langgraph_server.broken_thread
    repair_path = f"/imagerag/threads/{thread}/repair"
    state = httpx.get(f"{langgraph_server.url}/threads/{thread}/state", timeout=60)
    history = post(langgraph_server, f"/threads/{thread}/history", {"limit": 10})
    run = post(
        langgraph_server,
        f"/threads/{thread}/runs/wait",
        {"assistant_id": "imagerag", "input": {"message": "add a blue ring"}},
    )
    for answer in (state, history, run):
        assert answer.status_code == 409, answer.text[:300]
        assert f"POST {repair_path}" in answer.json()["detail"] and "the prompt is empty" in answer.json()["detail"]

    repaired = post(langgraph_server, repair_path, {})
    assert repaired.status_code == 200 and repaired.json()["repaired"] and repaired.json()["turns"] == 1, repaired.text
    values = client.threads.get_state(thread)["values"]
    assert values["message"] == "a red square" and len(values["turns"]) == 1 and values["candidates"]
    refined = client.runs.wait(thread, "imagerag", input={"message": "add a blue ring", "budget": {"max_rounds": 1}})
    assert refined["turn"] == 2 and refined["prompt"] == "a red square and a blue ring", refined
    client.threads.get_history(thread, limit=1000)

    again = post(langgraph_server, repair_path, {})
    assert again.status_code == 200 and not again.json()["repaired"]
    unknown = post(langgraph_server, "/imagerag/threads/00000000-0000-0000-0000-000000000000/repair", {})
    assert unknown.status_code == 404


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reply_of(message: dict, server: Server) -> tuple[str, Image.Image, httpx.Response]:
    """A chat reply's text, the image of its image block and the answer of its link."""
    assert message["type"] == "ai" and message["name"] == "imagerag", message
    [text_block, image_block] = message["content"]
    assert text_block["type"] == "text" and image_block["type"] == "image", message["content"]
    assert image_block["url"].startswith("data:image/png;base64,") and image_block["mime_type"] == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(image_block["url"].split(",", 1)[1])))
    link = re.search(r"Best image: (/imagerag/threads/\S+\.png)", text_block["text"])
    assert link, text_block["text"]
    return text_block["text"], image, httpx.get(server.url + link[1], timeout=60)


def test_a_chat_client_sends_messages_and_gets_a_reply_with_the_best_image(langgraph_server, data_dir):
    """Issue 25, item 7: the chat convention. The last human message is the message; each turn appends an AI
    message with the verdict, the best image inline and its link; a `message` turn still works in between."""
    client = get_sync_client(url=langgraph_server.url)
    thread = client.threads.create()["thread_id"]
    done = client.runs.wait(thread, "imagerag", input={"messages": chat(PROMPT), "budget": {"max_rounds": 1}})
    values = client.threads.get_state(thread)["values"]
    assert done["turns"][0]["message"] == PROMPT and values["message"] == PROMPT
    assert [c["text"] for c in values["concepts"]] == TWO_OBJECT_CONCEPTS
    human, answer = values["messages"]
    assert human["type"] == "human" and human["content"] == PROMPT
    text, image, served = reply_of(answer, langgraph_server)
    best = done["turns"][0]["best_image"]
    assert text.startswith(f"Turn 1: {done['status']} ") and "a red heart on the left" in text
    stored = data_dir / "runs" / thread / "images" / f"{best}.png"
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == stored.read_bytes()
    assert image.size == Image.open(stored).size  # the tiny profile's images are far under the reply's 256 px

    # The next chat message refines the image; a `message` after it is read, not the chat's last human message.
    refined = client.runs.wait(thread, "imagerag", input={"messages": chat("make the square green")})
    assert refined["turn"] == 2 and "green square" in refined["prompt"], refined
    plain = client.runs.wait(thread, "imagerag", input={"message": "add a blue ring", "budget": {"max_rounds": 1}})
    assert plain["turn"] == 3 and "blue ring" in plain["prompt"], plain
    values = client.threads.get_state(thread)["values"]
    assert [m["type"] for m in values["messages"]] == ["human", "ai", "human", "ai", "ai"]
    assert [t["message"] for t in values["turns"]] == [PROMPT, "make the square green", "add a blue ring"]
    assert reply_of(values["messages"][-1], langgraph_server)[0].startswith("Turn 3: ")

    # A message the thread cannot read gets the reason as the reply, and the image stays as it was.
    unclear = client.runs.wait(thread, "imagerag", input={"messages": chat("frobnicate the wibble")})
    assert unclear["status"] == "needs_clarification" and unclear["turn"] == 3, unclear
    last = client.threads.get_state(thread)["values"]["messages"][-1]
    assert last["type"] == "ai" and last["content"] == unclear["clarification"], last

    # The link serves only the images a thread made.
    for path in [
        f"/imagerag/threads/{thread}/images/{'0' * 32}.png",
        f"/imagerag/threads/{thread}/images/..%2Fsettings.png",
        f"/imagerag/threads/00000000-0000-0000-0000-000000000000/images/{best}.png",
    ]:
        assert httpx.get(langgraph_server.url + path, timeout=60).status_code == 404, path

    # An over-long chat message is refused like `message`, and the thread stays as it was.
    before = snapshot(langgraph_server, thread)
    for route in ["runs/wait", "runs/stream"]:
        answer = post(
            langgraph_server,
            f"/threads/{thread}/{route}",
            {"assistant_id": "imagerag", "input": {"messages": chat("a red square " * 400)}},
        )
        assert answer.status_code == 422 and "more than 4000" in answer.json()["detail"], answer.text
    assert snapshot(langgraph_server, thread) == before


@pytest.fixture(scope="module")
def llm_server(data_dir, tmp_path_factory) -> Iterator[tuple[Server, FakeOpenAIServer]]:
    """A `langgraph dev` whose LLM is a scripted OpenAI endpoint, for the agent policy."""
    folder = tmp_path_factory.mktemp("langgraph-llm")
    with FakeOpenAIServer(scripted_openai()) as llm:
        env = {"IMAGERAG_LLM__MODEL": "gpt-4o-2024-08-06", "IMAGERAG_LLM__BASE_URL": llm.base_url}
        with langgraph_dev(folder, data_dir, **env) as url:
            yield Server(url, ""), llm


def test_the_agent_policy_replies_in_the_chat_apart_from_its_tool_calls(llm_server):
    server, llm = llm_server
    client = get_sync_client(url=server.url)
    thread = client.threads.create()["thread_id"]
    done = client.runs.wait(thread, "agent", input={"messages": chat(PROMPT), "budget": {"max_rounds": 6}})
    assert done["status"] == "satisfied", done
    values = client.threads.get_state(thread)["values"]
    # The chat holds the person's message and the reply; the policy's tool calls stay in its own conversation.
    human, answer = values["messages"]
    assert human["content"] == PROMPT and reply_of(answer, server)[2].status_code == 200
    assert not answer.get("tool_calls")
    kinds = [m["type"] for m in values["conversation"]]
    assert "tool" in kinds and any(m.get("tool_calls") for m in values["conversation"])
    agent_calls = [r for r in llm.requests if not r.get("tool_choice")]
    assert agent_calls and PROMPT in json.dumps(agent_calls[0]["messages"])
