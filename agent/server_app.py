"""The LangGraph Server's own HTTP app (langgraph.json `http.app`): every input is checked before LangGraph stores it.

LangGraph's START writer stores a run's input keys as they come (pydantic validates the state only when a node reads
it), so one bad message used to break a thread for good: every later run failed on it, and reading the thread's
state or history answered HTTP 400. `InputGuard` wraps the whole server (langgraph-api puts a custom app's middleware
outside its own routes) and reads the body of every request that writes a thread's state: a run's `input`,
`context` (or `config.configurable`) and `command` (`resume`: a review answer; `update`), a state update's `values`,
a new thread's `supersteps`. A bad one is answered HTTP 422 with what is wrong and how to fix it, and the thread
stays as it was. Bounds are those of every front end (graphs/state.py, graphs/context.py).

A run's chat input (`messages`, the LangGraph chat convention) holds only a person's messages, each within the bounds
of `message`; the last is the message. `GET /imagerag/threads/{id}/images/{image}.png` serves the images a thread
made (the links of the chat replies, agent/langgraph_app.py), and nothing else.

A thread broken before this check existed answers HTTP 409 with the way out: `POST /imagerag/threads/{id}/repair`
puts the thread back on its last finished turn (same thread id; the unreadable checkpoints are dropped).
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import anyio.to_thread
import orjson
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from pydantic import ValidationError, model_validator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagerag.graphs.context import ClientContext
from imagerag.graphs.nodes import ReviewDecision, review_uploads
from imagerag.graphs.state import (
    MAX_ID_CHARS,
    MAX_REVIEW_KEEP,
    MAX_REVIEW_UPLOADS,
    MAX_UPLOAD_BYTES,
    REPLY_NAME,
    THREAD_PATTERN,
    AgentState,
    RunInput,
    fitted_message,
)
from imagerag.tools.backends.sources import MAX_CAPTION_CHARS
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.files import RunFolder

# Base64 of the largest upload, plus room for a data: URL's header.
MAX_UPLOAD_CHARS = 4 * math.ceil(MAX_UPLOAD_BYTES / 3) + 100
# A request body: the largest review answer, plus 1 MiB for everything else (a prompt is 4,000 characters).
MAX_BODY_BYTES = MAX_REVIEW_UPLOADS * MAX_UPLOAD_CHARS + 1024 * 1024
INTERRUPT_ID = re.compile(r"[0-9a-f]{32}")
THREAD = r"/threads/(?P<thread>[^/]+)"
RUN_PATHS = re.compile(rf"(?:{THREAD})?/runs(?:/stream|/wait|/crons)?")
BATCH_PATH = re.compile(r"/runs/batch")
STATE_UPDATE_PATH = re.compile(rf"{THREAD}/state")
NEW_THREAD_PATH = re.compile(r"/threads")
THREAD_READ_PATHS = re.compile(rf"{THREAD}/(?:state|history)(?:/.*)?")
REPAIR_PATH = "/imagerag/threads/{thread_id}/repair"
IMAGE_PATH = "/imagerag/threads/{thread_id}/images/{image_id}.png"
IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # as the chat page's /files route takes them (agent/web.py)
BROKEN_MARKS = (b"validation error for RunState", b"validation error for AgentState")


class InputRefused(ImageRAGError):
    """A request whose input the server does not store; the message says what is wrong and how to fix it."""


class RemoteReviewDecision(ReviewDecision):
    """A review answer from a server client: ReviewDecision within the bounds every front end has, its uploads
    decoded and checked to be images (`review_uploads`), before the answer is stored in the thread."""

    @model_validator(mode="after")
    def _within_bounds(self) -> RemoteReviewDecision:
        if len(self.uploads) > MAX_REVIEW_UPLOADS:
            raise ValueError(f"{len(self.uploads)} uploads, more than {MAX_REVIEW_UPLOADS}: send at most that many")
        for i, upload in enumerate(self.uploads, 1):
            if len(upload) > MAX_UPLOAD_CHARS:
                raise ValueError(
                    f"upload {i} is over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB: send a smaller image (a reference "
                    "is seen at 224 px)"
                )
        if self.caption is not None and len(self.caption) > MAX_CAPTION_CHARS:
            raise ValueError(f"the caption has {len(self.caption)} characters, more than {MAX_CAPTION_CHARS}")
        if self.keep is not None and (
            len(self.keep) > MAX_REVIEW_KEEP or any(len(hit) > MAX_ID_CHARS for hit in self.keep)
        ):
            raise ValueError(f"keep names at most {MAX_REVIEW_KEEP} hit ids of at most {MAX_ID_CHARS} characters")
        review_uploads(self)  # ValueError naming a path, bad base64 or an upload that is no image
        return self


def explain(error: ValidationError) -> str:
    """Pydantic's errors as one line: where, and what is wrong (the fix is in our validators' messages)."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def check_run_input(value: Any) -> None:
    """A run's input: RunInput's fields only, each within its bounds, checked strictly (no `true` for a number)."""
    if value is None:
        return  # a run that continues the thread from its checkpoint
    if not isinstance(value, dict):
        raise InputRefused('input must be an object, e.g. {"message": "a red fox in the snow"}')
    unknown = sorted(set(value) - set(RunInput.model_fields))
    if unknown:
        raise InputRefused(
            f"unknown input field(s) {', '.join(map(repr, unknown))}: a run takes {', '.join(RunInput.model_fields)}"
        )
    if "messages" in value:
        if "message" in value:
            raise InputRefused("send `message` or `messages` (a chat), not both")
        chat = check_chat(value["messages"], replies=False)
        if not chat:
            raise InputRefused("messages is empty: send the person's message last")
        # The chat's last message is the message: checked as one, with the other fields, below.
        value = {k: v for k, v in value.items() if k != "messages"} | {"message": chat[-1].text}
    elif "message" not in value:
        raise InputRefused("no message: send `message`, or `messages` ending with a person's message")
    try:
        RunInput.model_validate_json(json.dumps(value), strict=True)
    except ValidationError as error:
        raise InputRefused(f"input refused: {explain(error)}") from None


def check_context(value: Any) -> None:
    """How to draw, as ClientContext takes it: never where data lives, each setting within its bounds."""
    if value is None or value == {}:
        return
    if not isinstance(value, dict):
        raise InputRefused('context must be an object, e.g. {"profile": "tiny", "retrieve_k": 2}')
    try:
        ClientContext(**value)
    except ValidationError as error:
        raise InputRefused(f"context refused: {explain(error)}") from None
    except ImageRAGError as error:
        raise InputRefused(f"context refused: {error}") from None


def check_review_answer(value: Any) -> None:
    """`command.resume`: a review answer, or a map of interrupt ids to answers."""
    answers = (
        list(value.values())
        if isinstance(value, dict) and value and all(INTERRUPT_ID.fullmatch(str(k)) for k in value)
        else [value]
    )
    for answer in answers:
        try:
            RemoteReviewDecision.model_validate(answer)
        except ValidationError as error:
            raise InputRefused(f"review answer refused: {explain(error)}") from None


def check_state_update(values: Any) -> None:
    """Values written straight into a thread's state (a state update, `command.update`, a superstep): each a field
    of the graphs' state, valid as that field (a node reading it must not fail on it later)."""
    if values is None:
        return
    for update in values if isinstance(values, list) else [values]:
        if not isinstance(update, dict):
            raise InputRefused("state values must be an object of state fields")
        for key, value in update.items():
            if key == "conversation":  # the agent's: LangGraph's add_messages checks it as it is written
                continue
            if key == "messages":
                check_chat(value if isinstance(value, list) else [value], replies=True)
                continue
            if key not in AgentState.model_fields:
                raise InputRefused(f"unknown state field {key!r}")
            try:
                AgentState.__pydantic_validator__.validate_assignment(AgentState.model_construct(), key, value)
            except ValidationError as error:
                raise InputRefused(f"state update refused: {explain(error)}") from None


def check_chat(value: Any, replies: bool) -> list[BaseMessage]:
    """Chat messages a client writes: a person's, each within the bounds of `message` (the last is read as one);
    with `replies`, also the graphs' own replies (a thread's values written back, as the repair does). Any other
    message would be taken for the agent policy's conversation of an earlier version (graphs/agent.py)."""
    if not isinstance(value, list):
        raise InputRefused('messages must be a list, e.g. [{"role": "user", "content": "a red fox in the snow"}]')
    try:
        messages = convert_to_messages(value)
    # langchain_core raises NotImplementedError for a message type or role it does not know: a client's bad input.
    except (ValueError, TypeError, NotImplementedError) as error:
        raise InputRefused(f"messages refused: {str(error).splitlines()[0]}") from None
    for i, message in enumerate(messages):
        if isinstance(message, HumanMessage):
            try:
                fitted_message(message.text)
            except ValueError as error:
                raise InputRefused(f"messages[{i}] refused: {error}") from None
        elif not (replies and isinstance(message, AIMessage) and message.name == REPLY_NAME):
            raise InputRefused(
                f"messages[{i}] is a {message.type!r} message: send only the person's messages (the graph replies)"
            )
    return messages


def check_run(payload: Any) -> None:
    if not isinstance(payload, dict):
        return  # the server answers a body that is no run
    check_run_input(payload.get("input"))
    config = payload.get("config")
    configurable = config.get("configurable") if isinstance(config, dict) else None
    check_context(payload.get("context") or configurable)
    command = payload.get("command")
    if isinstance(command, dict):
        if command.get("resume") is not None:
            check_review_answer(command["resume"])
        check_state_update(command.get("update"))


def check_request(method: str, path: str, payload: Any) -> None:
    """InputRefused when a state-writing request carries input the graphs must not store."""
    if method != "POST":
        return
    if BATCH_PATH.fullmatch(path):
        for run in payload if isinstance(payload, list) else []:
            check_run(run)
    elif RUN_PATHS.fullmatch(path):
        check_run(payload)
    elif STATE_UPDATE_PATH.fullmatch(path) and isinstance(payload, dict):
        check_state_update(payload.get("values"))
    elif NEW_THREAD_PATH.fullmatch(path) and isinstance(payload, dict):
        for step in payload.get("supersteps") or []:
            for update in (step or {}).get("updates") or [] if isinstance(step, dict) else []:
                if isinstance(update, dict):
                    check_state_update(update.get("values"))
                    command = update.get("command")
                    if isinstance(command, dict):
                        check_state_update(command.get("update"))


def broken_thread_message(thread: str, detail: str) -> str:
    first = detail.strip().splitlines()[:3]
    return (
        f"thread {thread} holds input stored before this server checked input ({' '.join(s.strip() for s in first)}), "
        f"so its runs and state cannot be read: POST {REPAIR_PATH.format(thread_id=thread)} puts it back on its "
        "last finished turn (same thread id), then send the message again"
    )


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _local_path(scope: Scope) -> str:
    """The path the server's routes see (without a mount prefix), with no trailing slash."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


class InputGuard:
    """ASGI middleware: checks the body of every state-writing request (HTTP 422, 413 when over MAX_BODY_BYTES)
    before the server sees it; answers 409 with the repair path for threads that earlier input broke."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], _local_path(scope)
        reading = THREAD_READ_PATHS.fullmatch(path)
        if reading:
            send = _broken_thread_answer(send, reading["thread"])
        if method != "POST" or not (
            reading or RUN_PATHS.fullmatch(path) or BATCH_PATH.fullmatch(path) or NEW_THREAD_PATH.fullmatch(path)
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            await _respond(send, 413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB")
            return
        try:  # parsing and checking (uploads are decoded) take a worker thread, not the server's event loop
            await anyio.to_thread.run_sync(_check_body, method, path, body)
        except InputRefused as error:
            await _respond(send, 422, str(error))
            return
        run = RUN_PATHS.fullmatch(path)
        if run and run["thread"]:
            problem = await _thread_problem(run["thread"])
            if problem:
                await _respond(send, 409, problem)
                return
        await self.app(scope, _replay(body, receive), send)


def _check_body(method: str, path: str, body: bytes) -> None:
    try:  # parsed as the server parses it (orjson), so both see the same values
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return  # not JSON: the server answers it as it does
    check_request(method, path, payload)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None once it passes MAX_BODY_BYTES (read no further)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replayed


def _broken_thread_answer(send: Send, thread: str) -> Send:
    """`send` with the server's HTTP 400 for a thread whose stored input fails validation turned into a 409 that
    names the repair."""
    held: list[Message] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held.append(message)
            return
        if not held:
            await send(message)
            return
        held.append(message)
        if message.get("more_body", False):
            return
        body = b"".join(m.get("body", b"") for m in held[1:])
        if any(mark in body for mark in BROKEN_MARKS):
            try:
                detail = str(json.loads(body).get("detail", body.decode(errors="replace")))
            except ValueError:
                detail = body.decode(errors="replace")
            await _respond(send, 409, broken_thread_message(thread, detail))
        else:
            for m in held:
                await send(m)
        held.clear()

    return wrapped


@cache
def _client() -> Any:
    """The server's own routes, called in process (langgraph_sdk's client without a URL); one for the process."""
    from langgraph_sdk import get_client

    return get_client()


async def _thread_problem(thread: str) -> str | None:
    """The repair message when `thread` holds input that fails validation; None otherwise (or when it is unknown)."""
    from langgraph_sdk.errors import APIStatusError

    try:
        await _client().threads.get_state(thread)
    except APIStatusError as error:
        text = str(getattr(error, "message", "") or error)
        if error.status_code == 409:
            return text
        if any(mark.decode() in text for mark in BROKEN_MARKS):
            return broken_thread_message(thread, text)
    return None


async def repair(request: Request) -> JSONResponse:
    """Put a thread that unchecked input broke back on its last finished turn: the thread is recreated under the
    same id with the values of that turn (the server keeps them on the thread), written as the `finish` node."""
    from langgraph_sdk.errors import NotFoundError

    thread = request.path_params["thread_id"]
    client = _client()
    try:
        problem = await _thread_problem(thread)
        if problem is None:
            await client.threads.get(thread)  # NotFoundError for an unknown thread
            return JSONResponse({"thread_id": thread, "repaired": False, "detail": "the thread reads fine"})
        found = await client.threads.get(thread)
    except NotFoundError:
        return JSONResponse({"detail": f"no thread {thread}"}, status_code=404)
    values = {}
    for key, value in (found.get("values") or {}).items():
        try:
            check_state_update({key: value})
        except InputRefused:
            continue  # a field that would break the thread again: its default serves
        values[key] = value
    await client.threads.delete(thread)
    await client.threads.create(thread_id=thread, metadata=found.get("metadata") or {})
    if values:
        await client.threads.update_state(thread, values, as_node="reply")
    turns = len(values.get("turns") or [])
    return JSONResponse(
        {
            "thread_id": thread,
            "repaired": True,
            "turns": turns,
            "detail": f"thread {thread} is back on turn {turns}" if turns else f"thread {thread} starts afresh",
        }
    )


async def image(request: Request) -> Response:
    """An image the thread made (one of its candidates), from the run folder its state records; 404 otherwise."""
    from langgraph_sdk.errors import APIStatusError

    thread, image_id = request.path_params["thread_id"], request.path_params["image_id"]
    missing = PlainTextResponse("no such image", status_code=404)
    if not re.fullmatch(THREAD_PATTERN, thread) or not IMAGE_ID.fullmatch(image_id):
        return missing
    try:
        values = (await _client().threads.get_state(thread)).get("values") or {}
    except APIStatusError:
        return missing
    if not values.get("run_dir") or image_id not in {c.get("image_id") for c in values.get("candidates") or []}:
        return missing
    images = RunFolder(Path(values["run_dir"])).images
    path = images / f"{image_id}.png"
    if (
        images.is_symlink()
        or path.is_symlink()
        or not path.is_file()
        or not path.resolve().is_relative_to(images.resolve())
    ):
        return missing
    return FileResponse(path, media_type="image/png", headers={"Content-Security-Policy": "default-src 'none'"})


app = Starlette(
    routes=[Route(REPAIR_PATH, repair, methods=["POST"]), Route(IMAGE_PATH, image, methods=["GET"])],
    middleware=[Middleware(InputGuard)],
)

__all__ = [
    "IMAGE_PATH",
    "MAX_BODY_BYTES",
    "InputGuard",
    "InputRefused",
    "RemoteReviewDecision",
    "app",
    "check_chat",
    "check_context",
    "check_request",
    "check_review_answer",
    "check_run_input",
    "check_state_update",
]
