"""An MCP server (the official `mcp` SDK's MCPServer, formerly FastMCP): the loop as tools for larger assistants.

Tools:
- `generate_image(prompt, max_rounds, thread?)`: a new image, checked per concept, refined within the budget;
- `refine_image(thread, instruction, max_rounds)`: change the best image of an earlier thread;
- `search_references(caption, k)`: reference images from the collection.

An image result is the best image as MCP image content (PNG), the per-concept verdicts as JSON text, and the same
as structured content (schema: `RunSummary`). While a run goes, its typed events (`agent.events`) arrive as
progress notifications. The run is synchronous and heavy, so it runs in a worker thread; the event loop keeps
serving, and runs of different threads go at once. Bad input comes back as an error result naming the fix, and the
server keeps going. Tool arguments are strict: a boolean is not a number, and an argument a tool does not take is
an error that names it (an assistant that misspells `max_rounds` learns so, instead of silently getting 3 rounds).

Over HTTP the server keeps the MCP SDK's Host and Origin checks on whatever address it binds, with an allowed list
of the names clients reach it by (loopback names, the bound address and `allowed_hosts`): a web page on another
site cannot drive it through DNS rebinding. On an address other than loopback it also requires a bearer token
(`token`, or IMAGERAG_MCP_TOKEN), compared in constant time, and refuses to start without one.

    imagerag serve mcp --profile tiny            # stdio
    imagerag serve mcp --http --port 8000        # streamable HTTP on 127.0.0.1:8000/mcp
    IMAGERAG_MCP_TOKEN=... imagerag serve mcp --http --host 0.0.0.0 --allowed-host imagerag.lan
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ImageContent, TextContent
from pydantic import ConfigDict, model_validator
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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
    ThreadStateError,
    describe_event,
    png_bytes,
)
from imagerag.agent.config import Settings
from imagerag.agent.events import RunEvent
from imagerag.agent.result import RunSummary
from imagerag.tools.backends.store import ReferenceStore
from imagerag.tools.errors import ConfigError
from imagerag.tools.toolkit import Backends

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Draws images that show everything a prompt asks for. generate_image returns the best image, a verdict per "
    "concept and a thread id; pass that id to refine_image to change the image. search_references shows what the "
    "reference collection holds."
)
REFERENCE_THUMBNAIL = 256
TOKEN_ENV = "IMAGERAG_MCP_TOKEN"
MIN_TOKEN_CHARS = 16
# Printable ASCII without spaces: what an HTTP header carries unchanged (RFC 6750's b64token is narrower still).
TOKEN_PATTERN = re.compile(rf"[\x21-\x7e]{{{MIN_TOKEN_CHARS},}}")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "[::]", "")
# A DNS name or IPv4 address, or a bracketed IPv6 address, and an optional port: what a URL's authority holds.
ALLOWED_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def build_server(settings: Settings, out: Path | None = None, backends: Backends | None = None) -> MCPServer:
    """The MCP server over one `ImageRAGAssistant` (backends are loaded on the first call, then reused)."""
    assistant = ImageRAGAssistant(settings, out, backends)

    async def run_with_progress(
        ctx: Context, message: str, max_rounds: int, thread: str | None, new: bool
    ) -> CallToolResult:
        count = 0

        async def report(line: str) -> None:
            nonlocal count
            count += 1  # progress must grow with every notification; the total is unknown in advance
            await ctx.report_progress(count, None, line)

        def on_event(event: RunEvent) -> None:  # in the worker thread: hand each event to the event loop
            line = describe_event(event)
            if line:
                anyio.from_thread.run(report, line)

        def work() -> CallToolResult:
            try:
                result = assistant.run(message, max_rounds, thread, on_event, require="new" if new else "existing")
            except ThreadStateError as error:
                raise ToolError(
                    f"thread {error.thread!r} exists: change its image with refine_image, or choose another thread name"
                    if error.exists
                    else f"unknown thread {error.thread!r}: pass a thread id that generate_image returned"
                ) from None
            except AssistantError as error:
                raise ToolError(str(error)) from None
            return image_result(result.brief())

        return await anyio.to_thread.run_sync(work)

    async def generate_image(
        prompt: PromptText, ctx: Context, max_rounds: Rounds = 3, thread: ThreadName | None = None
    ) -> Annotated[CallToolResult, RunSummary]:
        return await run_with_progress(ctx, prompt, max_rounds, thread, new=True)

    async def refine_image(
        thread: ThreadName, instruction: Instruction, ctx: Context, max_rounds: Rounds = 3
    ) -> Annotated[CallToolResult, RunSummary]:
        return await run_with_progress(ctx, instruction, max_rounds, thread, new=False)

    async def search_references(caption: Caption, k: HitCount = 5) -> Annotated[CallToolResult, SearchOutput]:
        try:
            found = await anyio.to_thread.run_sync(assistant.search, caption, k)
        except AssistantError as error:
            raise ToolError(str(error)) from None
        content: list = [TextContent(type="text", text=found.model_dump_json(indent=2))]
        for hit in found.hits:
            try:  # through the store: only files inside the indexed folders, within the pixel limit
                data = png_bytes(ReferenceStore.load_image(hit), REFERENCE_THUMBNAIL)
            except (OSError, ValueError):  # moved, unreadable or refused: the hit's metadata still helps
                continue
            content.append(ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type="image/png"))
        return CallToolResult(content=content, structured_content=found.model_dump(mode="json"))

    tools = [
        strict_tool(
            generate_image,
            "Generate an image for a prompt. Every concept of the prompt is checked; missing ones are fixed with "
            "retrieved reference images until all are drawn or the round budget is spent. Returns the best image, "
            "a verdict per concept, and a thread id for refine_image.",
        ),
        strict_tool(
            refine_image,
            "Change the best image of an earlier thread with an instruction (e.g. 'make the scarf green'); the "
            "concepts that already hold are kept. Returns the new best image and its verdicts.",
        ),
        strict_tool(
            search_references,
            "Search the reference collection for images matching a caption; returns the hits (caption, "
            "similarity, source) and a thumbnail of each.",
        ),
    ]
    return MCPServer("imagerag", instructions=INSTRUCTIONS, tools=tools)


def strict_tool(fn: Callable[..., Any], description: str) -> Tool:
    """An MCP tool whose arguments are validated strictly.

    The SDK builds each tool's argument model from the function's signature in pydantic's lax mode, and ignores
    arguments it does not know: `max_rounds: true` became 1 round and a misspelt `max_round: 5` vanished. This
    model forbids both (strict types, no extra arguments), and the published input schema says so
    (`additionalProperties: false`), so a client can see it before calling.
    """
    tool = Tool.from_function(fn, description=description)
    lax = tool.fn_metadata.arg_model
    accepted = [field.alias or name for name, field in lax.model_fields.items()]  # in the signature's order

    def only_known(data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(key) for key in data if key not in accepted)
            if unknown:
                raise ValueError(
                    f"unknown argument(s) {', '.join(map(repr, unknown))}: {tool.name} takes {', '.join(accepted)}"
                )
        return data

    config: ConfigDict = {**lax.model_config, "strict": True, "extra": "forbid"}
    strict = cast(
        type[ArgModelBase],
        type(
            lax.__name__,
            (lax,),
            {
                "model_config": config,
                "__module__": __name__,
                "check_argument_names": model_validator(mode="before")(only_known),
            },
        ),
    )
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool


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
    settings: Settings,
    out: Path | None = None,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> None:
    """Serve over stdio, or over streamable HTTP at http://host:port/mcp.

    Over HTTP, `token` (default: IMAGERAG_MCP_TOKEN) is the bearer token every request must carry; it is required
    on any address but loopback. `allowed_hosts` are further names or addresses clients reach the server by (a
    DNS name, the machine's LAN address), for the Host and Origin checks. Bad settings raise ConfigError before
    anything is loaded or bound.
    """
    if not http:
        build_server(settings, out).run("stdio")
        return
    import uvicorn

    token = required_token(host, token)
    security = transport_security(host, allowed_hosts or ())
    server = build_server(settings, out)
    app = http_app(server, host, token, security)
    if not is_loopback(host):
        log.warning(
            "MCP over HTTP on %s, reachable from other machines: every request needs the bearer token; accepted "
            "Host names: %s",
            host,
            ", ".join(h for h in security.allowed_hosts if not h.endswith(":*")),
        )
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=server.settings.log_level.lower())).run()


def http_app(
    server: MCPServer,
    host: str = "127.0.0.1",
    token: str | None = None,
    security: TransportSecuritySettings | None = None,
) -> ASGIApp:
    """The server's streamable HTTP app (at /mcp) with its Host and Origin checks on and, given a token, a bearer
    check in front. Its lifespan runs the SDK's session manager: serve it with an ASGI server (uvicorn)."""
    token = required_token(host, token)
    app = server.streamable_http_app(transport_security=security or transport_security(host), host=host)
    return BearerTokenAuth(app, token) if token is not None else app


def is_loopback(host: str) -> bool:
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def required_token(host: str, token: str | None) -> str | None:
    """The bearer token to require (`token`, else IMAGERAG_MCP_TOKEN; None: no check, only allowed on loopback)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token:  # an empty --token or an empty variable is no token, not a token anyone can guess
        token = None
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            f"the MCP bearer token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces: "
            'make one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`'
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve MCP on {host} without authentication (anyone who reaches that address could run the "
            f"tools and read the reference collection): pass --token or set {TOKEN_ENV}, and clients send "
            "`Authorization: Bearer <token>`; or serve on 127.0.0.1"
        )
    return token


def transport_security(host: str, allowed_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """The SDK's DNS rebinding protection, on, for the names clients reach the server by.

    A browser tricked by DNS rebinding sends the attacker's name as Host (and its page as Origin), so accepting
    only our own names stops it. The SDK turns the check on only for a loopback bind; a server bound to 0.0.0.0
    had it off. Loopback names are always accepted; so are the bound address (unless it is a wildcard, which no
    client writes in a URL) and each of `allowed_hosts`, on any port unless one is given.
    """
    hosts: list[str] = []
    origins: list[str] = []
    names = list(LOOPBACK_NAMES)
    if host.strip() not in WILDCARD_ADDRESSES:
        names.append(host.strip())
    names += [_allowed_name(name) for name in allowed_hosts]
    for name in dict.fromkeys(_bracketed(n) for n in names):
        has_port = re.search(r":\d+$", name) is not None and not name.endswith("]")
        for value in [name] if has_port else [name, f"{name}:*"]:
            hosts.append(value)
            origins += [f"http://{value}", f"https://{value}"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def _bracketed(name: str) -> str:
    """An IPv6 address as a Host header writes it ([::1]); other names unchanged."""
    return f"[{name}]" if name.count(":") >= 2 and not name.startswith("[") else name


def _allowed_name(name: str) -> str:
    name = _bracketed(name.strip())
    if name in WILDCARD_ADDRESSES or not ALLOWED_HOST.fullmatch(name):
        raise ConfigError(
            f"--allowed-host {name!r} is not a host name: give a name or address as clients write it in the "
            "server's URL, e.g. 'imagerag.lan', '192.168.1.20' or 'imagerag.lan:8000' (no scheme, path or wildcard)"
        )
    return name


class BearerTokenAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`, else 401.

    A static token, not the SDK's OAuth (which needs an authorization server). Compared in constant time
    (hmac.compare_digest), so response times do not leak how much of a guess was right.
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = token.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: this server has none, and nothing unauthenticated gets one
            await send({"type": "websocket.close", "code": 1008})
            return
        response = PlainTextResponse(
            "missing or wrong bearer token: send the header `Authorization: Bearer <token>` with the token the server "
            f"was started with (--token or {TOKEN_ENV})",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="imagerag"'},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        values = [value for key, value in scope["headers"] if key.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, presented = values[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._expected)
