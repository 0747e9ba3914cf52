"""LangGraph Server: `langgraph dev` (in-memory runtime) serves the graphs of langgraph.json on 127.0.0.1, and the
`langgraph_sdk` client drives a thread through it: create it, stream a run, read the final state. Bad input gets
an error event or a clear HTTP error, and the server keeps serving."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest
from langgraph_sdk import get_sync_client
from langgraph_sdk.errors import NotFoundError
from scripted import TWO_OBJECT_CONCEPTS, free_port, server_process

pytestmark = pytest.mark.slow  # starts `langgraph dev`

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red heart on the left and a blue square on the right"


def config_for(folder: Path) -> Path:
    """The repository's langgraph.json with its paths made absolute, so the server's working folder (where the
    in-memory runtime keeps its files) can be a temporary one."""
    config = json.loads((REPO / "langgraph.json").read_text())
    config["dependencies"] = [str(REPO / d) if d.startswith(".") else d for d in config["dependencies"]]
    config["graphs"] = {
        name: str(REPO / spec) if spec.startswith("./") else spec for name, spec in config["graphs"].items()
    }
    path = folder / "langgraph.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def langgraph_server(data_dir, tmp_path):
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
        str(config_for(tmp_path)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-browser",
        "--no-reload",
        "--n-jobs-per-worker",
        "1",
    ]
    with server_process(command, tmp_path / "langgraph.log", answers, "langgraph dev", cwd=tmp_path, env=env):
        yield url


def test_a_thread_runs_through_langgraph_server(langgraph_server, data_dir):
    client = get_sync_client(url=langgraph_server)
    assistants = {a["graph_id"]: a for a in client.assistants.search()}
    assert set(assistants) == {"imagerag", "agent"}
    # Studio and the server show a caller only what it sets, gets back and may configure.
    for assistant in assistants.values():
        schemas = client.assistants.get_schemas(assistant["assistant_id"])
        assert set(schemas["input_schema"]["properties"]) == {"message", "seed", "budget", "review"}
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
    assert updated[:3] == ["plan", "generate", "critique"] and updated[-1] == "finish"
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

    # Bad input: an error event naming the problem, and the server goes on serving.
    for bad, message in [
        ({"message": "   "}, "the prompt is empty"),
        ({"message": PROMPT, "budget": {"max_rounds": 0}}, "greater than or equal to 1"),
        ({"message": 5}, "Input should be a valid string"),
        ({"message": "a red heart " * 400}, "more than 4000"),
    ]:
        other = client.threads.create()
        errors = [p.data for p in client.runs.stream(other["thread_id"], "imagerag", input=bad) if p.event == "error"]
        assert errors and message in errors[0]["message"], errors
    # A client says how to draw, never where the server keeps data or what it connects to.
    other = client.threads.create()
    refused = client.runs.stream(
        other["thread_id"], "imagerag", input={"message": PROMPT}, context={"data_dir": "/tmp/x"}
    )
    errors = [p.data for p in refused if p.event == "error"]
    assert errors and "a client cannot set data_dir" in errors[0]["message"], errors
    assert not Path("/tmp/x/runs").exists()
    with pytest.raises(NotFoundError):
        list(client.runs.stream("00000000-0000-0000-0000-000000000000", "imagerag", input={"message": PROMPT}))

    again = client.runs.wait(
        client.threads.create()["thread_id"],
        "imagerag",
        input={"message": "a green square", "budget": {"max_rounds": 1}},
    )
    assert again["status"] in {"satisfied", "budget_exhausted"} and again["candidates"]
