"""The MCP server, driven by the official SDK's own client: over stdio (a spawned `imagerag serve mcp`) and over
streamable HTTP on 127.0.0.1. Images arrive as PNG image content, verdicts as JSON, progress as notifications,
and bad input as error results that leave the server serving."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from PIL import Image
from scripted import TWO_OBJECT_CONCEPTS, free_port, server_process

PROMPT = "a red heart on the left and a blue square on the right"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "PYTHONUNBUFFERED": "1",
}


def imagerag_command() -> list[str]:
    """The installed `imagerag` script next to this interpreter (the package's console entry point)."""
    script = Path(sys.executable).parent / "imagerag"
    if script.exists():
        return [str(script)]
    found = shutil.which("imagerag")
    return [found] if found else [sys.executable, "-c", "from imagerag.agent.cli import main; main()"]


def serve_args(data_dir: Path, out: Path) -> list[str]:
    return ["serve", "mcp", "--profile", "tiny", "--data-dir", str(data_dir), "--out", str(out)]


def text_of(result) -> str:
    return " ".join(c.text for c in result.content if c.type == "text")


async def exercise(client: Client) -> dict:
    """A good run, a refinement, a search, and every kind of bad input in between; returns what it saw."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"generate_image", "refine_image", "search_references"}
    assert tools["generate_image"].output_schema["properties"]["concepts"]

    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    result = await client.call_tool(
        "generate_image", {"prompt": PROMPT, "max_rounds": 2}, progress_callback=on_progress
    )
    assert not result.is_error, text_of(result)
    image, verdicts = result.content[0], json.loads(result.content[1].text)
    assert image.type == "image" and image.mime_type == "image/png"
    with Image.open(io.BytesIO(base64.b64decode(image.data))) as png:
        assert png.format == "PNG" and png.size == (32, 32)
    assert [c["text"] for c in verdicts["concepts"]] == TWO_OBJECT_CONCEPTS
    assert {c["verdict"] for c in verdicts["concepts"]} <= {"satisfied", "missing"}
    structured = result.structured_content
    assert structured["thread"] == verdicts["thread"] and structured["concepts"] == verdicts["concepts"]
    assert structured["status"] in {"satisfied", "budget_exhausted"} and 1 <= structured["rounds"] <= 2
    assert Path(structured["best_image"]).exists() and Path(structured["report"]).exists()
    # Progress notifications arrived while the run went, in order, naming the graph's steps.
    messages = [m for _, m in progress]
    assert [v for v, _ in progress] == sorted(v for v, _ in progress) and len(progress) >= 5
    assert "plan" in messages and any(m.startswith("diffusion step") for m in messages)
    assert any("concept(s) satisfied" in m for m in messages)

    thread = structured["thread"]
    bad = {
        "empty prompt": ("generate_image", {"prompt": "   "}, "the prompt is empty"),
        "no prompt": ("generate_image", {}, "prompt"),
        "huge prompt": ("generate_image", {"prompt": "a red heart " * 400}, "at most 4000 characters"),
        "budget of zero": ("generate_image", {"prompt": PROMPT, "max_rounds": 0}, "greater than or equal to 1"),
        "wrong type": ("generate_image", {"prompt": PROMPT, "max_rounds": "three"}, "max_rounds"),
        "prompt not a string": ("generate_image", {"prompt": ["a", "list"]}, "prompt"),
        "taken thread": (
            "generate_image",
            {"prompt": PROMPT, "thread": thread},
            "exists: change its image with refine_image",
        ),
        "unknown thread": (
            "refine_image",
            {"thread": "ghost", "instruction": "make it green"},
            "unknown thread 'ghost'",
        ),
        "bad thread name": ("refine_image", {"thread": "../etc", "instruction": "make it green"}, "thread"),
        "empty caption": ("search_references", {"caption": "  "}, "the caption is empty"),
        "k of zero": ("search_references", {"caption": "a red square", "k": 0}, "greater than or equal to 1"),
    }
    for case, (tool, args, message) in bad.items():
        answer = await client.call_tool(tool, args)
        assert answer.is_error, case
        assert message in text_of(answer), (case, text_of(answer))

    # The server kept serving: refine the first thread, then search.
    refined = await client.call_tool(
        "refine_image", {"thread": thread, "instruction": "make the square green", "max_rounds": 1}
    )
    assert not refined.is_error, text_of(refined)
    assert refined.structured_content["turn"] == 2 and refined.structured_content["thread"] == thread
    assert refined.structured_content["prompt"] == "a red heart on the left and a green square on the right"
    assert refined.content[0].type == "image"

    found = await client.call_tool("search_references", {"caption": "a red square", "k": 2})
    assert not found.is_error, text_of(found)
    hits = found.structured_content["hits"]
    assert len(hits) == 2 and {h["caption"] for h in hits} <= {
        f"a {c} square" for c in ("red", "blue", "green", "yellow", "purple")
    }
    assert [c.type for c in found.content] == ["text", "image", "image"]
    return {"progress": progress, "thread": thread}


@pytest.mark.slow
def test_mcp_over_stdio(data_dir, tmp_path):
    params = StdioServerParameters(
        command=imagerag_command()[0],
        args=[*imagerag_command()[1:], *serve_args(data_dir, tmp_path / "runs")],
        env=OFFLINE_ENV,
    )

    async def main():
        async with Client(params, read_timeout_seconds=120) as client:
            seen = await exercise(client)
        assert (tmp_path / "runs" / seen["thread"] / "report.html").exists()

    anyio.run(main)


@pytest.fixture
def http_server(data_dir, tmp_path):
    """`imagerag serve mcp --http` on a free loopback port; yields its URL and stops it after the test."""
    port = free_port()

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    command = [*imagerag_command(), *serve_args(data_dir, tmp_path / "runs"), "--http", "--port", str(port)]
    with server_process(
        command, tmp_path / "server.log", listening, "the MCP server", env={**os.environ, **OFFLINE_ENV}
    ):
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.mark.slow
def test_mcp_over_streamable_http(http_server, tmp_path):
    async def main():
        async with Client(http_server, read_timeout_seconds=120) as client:
            await exercise(client)

    anyio.run(main)
    assert "127.0.0.1" in (tmp_path / "server.log").read_text()  # bound to loopback by default
