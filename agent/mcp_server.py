"""An MCP server (the official `mcp` SDK's MCPServer, formerly FastMCP): the loop as tools for larger assistants.

Tools:
- `generate_image(prompt, max_rounds, thread?)`: a new image, checked per concept, refined within the budget;
- `refine_image(thread, instruction, max_rounds)`: change the best image of an earlier thread;
- `search_references(caption, k)`: reference images from the collection.

An image result is the best image as MCP image content (PNG), the per-concept verdicts as JSON text, and the same
as structured content (schema: `RunSummary`). While a run goes, its typed events (`agent.events`) arrive as
progress notifications. The run is synchronous and heavy, so it runs in a worker thread; the event loop keeps
serving. Bad input comes back as an error result naming the fix, and the server keeps going.

    imagerag serve mcp --profile tiny            # stdio
    imagerag serve mcp --http --port 8000        # streamable HTTP on 127.0.0.1:8000/mcp
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent

from imagerag.agent.assistant import (
    AssistantError,
    Caption,
    HitCount,
    ImageRAGAssistant,
    Instruction,
    PromptText,
    Rounds,
    SearchOutput,
    ThreadName,
    describe_event,
    png_bytes,
)
from imagerag.agent.config import Settings
from imagerag.agent.events import RunEvent
from imagerag.agent.result import RunSummary
from imagerag.tools.toolkit import Backends

INSTRUCTIONS = (
    "Draws images that show everything a prompt asks for. generate_image returns the best image, a verdict per "
    "concept and a thread id; pass that id to refine_image to change the image. search_references shows what the "
    "reference collection holds."
)
REFERENCE_THUMBNAIL = 256


def build_server(settings: Settings, out: Path | None = None, backends: Backends | None = None) -> MCPServer:
    """The MCP server over one `ImageRAGAssistant` (backends are loaded on the first call, then reused)."""
    assistant = ImageRAGAssistant(settings, out, backends)
    server = MCPServer("imagerag", instructions=INSTRUCTIONS)

    async def run_with_progress(ctx: Context, message: str, max_rounds: int, thread: str | None) -> CallToolResult:
        count = 0

        async def report(line: str) -> None:
            nonlocal count
            count += 1  # progress must grow with every notification; the total is unknown in advance
            await ctx.report_progress(count, None, line)

        def on_event(event: RunEvent) -> None:  # in the worker thread: hand each event to the event loop
            line = describe_event(event)
            if line:
                anyio.from_thread.run(report, line)

        try:
            result = await anyio.to_thread.run_sync(lambda: assistant.run(message, max_rounds, thread, on_event))
        except AssistantError as error:
            raise ToolError(str(error)) from None
        return image_result(result.brief())

    @server.tool(
        description="Generate an image for a prompt. Every concept of the prompt is checked; missing ones are "
        "fixed with retrieved reference images until all are drawn or the round budget is spent. Returns the "
        "best image, a verdict per concept, and a thread id for refine_image."
    )
    async def generate_image(
        prompt: PromptText, ctx: Context, max_rounds: Rounds = 3, thread: ThreadName | None = None
    ) -> Annotated[CallToolResult, RunSummary]:
        if thread is not None and await anyio.to_thread.run_sync(assistant.thread_exists, thread):
            raise ToolError(
                f"thread {thread!r} exists: change its image with refine_image, or choose another thread name"
            )
        return await run_with_progress(ctx, prompt, max_rounds, thread)

    @server.tool(
        description="Change the best image of an earlier thread with an instruction (e.g. 'make the scarf "
        "green'); the concepts that already hold are kept. Returns the new best image and its verdicts."
    )
    async def refine_image(
        thread: ThreadName, instruction: Instruction, ctx: Context, max_rounds: Rounds = 3
    ) -> Annotated[CallToolResult, RunSummary]:
        if not await anyio.to_thread.run_sync(assistant.thread_exists, thread):
            raise ToolError(f"unknown thread {thread!r}: pass a thread id that generate_image returned")
        return await run_with_progress(ctx, instruction, max_rounds, thread)

    @server.tool(
        description="Search the reference collection for images matching a caption; returns the hits "
        "(caption, similarity, source) and a thumbnail of each."
    )
    async def search_references(caption: Caption, k: HitCount = 5) -> Annotated[CallToolResult, SearchOutput]:
        try:
            found = await anyio.to_thread.run_sync(assistant.search, caption, k)
        except AssistantError as error:
            raise ToolError(str(error)) from None
        content: list = [TextContent(type="text", text=found.model_dump_json(indent=2))]
        for hit in found.hits:
            try:
                data = png_bytes(hit.source, REFERENCE_THUMBNAIL)
            except OSError:  # a moved or unreadable file: the hit's metadata still helps
                continue
            content.append(ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type="image/png"))
        return CallToolResult(content=content, structured_content=found.model_dump(mode="json"))

    return server


def image_result(output: RunSummary) -> CallToolResult:
    """Best image (PNG) + verdicts as JSON text + structured content; a failed run is an error result."""
    verdicts = {
        "thread": output.thread,
        "status": output.status,
        "stop_reason": output.stop_reason,
        "error": output.error,
        "concepts": [c.model_dump() for c in output.concepts],
    }
    content: list = []
    best = Path(output.best_image) if output.best_image else None
    if best is not None and best.exists():
        content.append(
            ImageContent(type="image", data=base64.b64encode(best.read_bytes()).decode(), mime_type="image/png")
        )
    content.append(TextContent(type="text", text=json.dumps(verdicts, indent=2)))
    if output.status == "failed":
        content.append(
            TextContent(type="text", text=f"the run failed: {output.error}; its record is in {output.report}")
        )
        return CallToolResult(content=content, is_error=True)
    return CallToolResult(content=content, structured_content=output.model_dump(mode="json"))


def serve_mcp(
    settings: Settings, out: Path | None = None, http: bool = False, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Serve over stdio, or over streamable HTTP at http://host:port/mcp."""
    server = build_server(settings, out)
    if http:
        server.run("streamable-http", host=host, port=port)
    else:
        server.run("stdio")
