"""`imagerag serve web`: a chat page for people (Gradio), mounted in the project's own ASGI app.

A conversation is a thread (agent.run): the first message draws, each next one refines. Each round's image shows as
soon as its node has checkpointed it (the page reads the thread's state after every node), enlarged with
nearest-neighbour scaling when small (the miniature world draws 48 px), with what the round did and the references
it used. Beside it, the objects and concepts with their verdicts; editing them sends the typed change
(tools.revision) as the thread's next message, so it is recorded as a turn like any other. Runs are the CLI's:
same settings, threads, run folders, the process-wide backends cache; runs queue per loaded pipeline (pipelines
are not re-entrant) and a waiting visitor is told so.

Security (`guarded`): Host and Origin are checked on every request, loopback included (DNS rebinding); off
loopback a token is required: a one-time `?token=` sets an HttpOnly cookie, compared in constant time, on the page,
the API and the file routes alike. Files are served only from run folders (`/files/<thread>/...`). Gradio's
analytics are off and the theme uses the system's fonts: the page makes no request off the machine.
"""

from __future__ import annotations

import hmac
import html
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no usage pings, no version check

import gradio as gr
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from imagerag.agent.config import Settings
from imagerag.agent.events import Finished, ReviewRequested, RunEvent
from imagerag.agent.mcp_server import TOKEN_PATTERN, is_loopback, transport_security
from imagerag.agent.run import checked_decision, prepare, resume, stream, thread_settings, thread_state
from imagerag.graphs.nodes import ReviewDecision, ReviewRequest
from imagerag.graphs.state import MAX_GENERATIONS, MAX_ROUNDS, MAX_SEED, THREAD_PATTERN, Budget, RunInput, RunState
from imagerag.tools.backends.llm import image_data_url
from imagerag.tools.backends.store import ReferenceStore
from imagerag.tools.errors import ConfigError, ImageRAGError, user_errors, user_message
from imagerag.tools.files import RunFolder
from imagerag.tools.grid import CELL_NAMES, CELL_PHRASES
from imagerag.tools.revision import (
    Add,
    Change,
    Move,
    NewObject,
    ObjectRef,
    Remove,
    SetAttribute,
    head_text,
    understand_by_rules,
    vocabulary_for,
)
from imagerag.tools.toolkit import Backends
from imagerag.tools.types import Candidate, Concept, RetrievalHit, SceneObject, ScenePlan

TOKEN_ENV = "IMAGERAG_WEB_TOKEN"
COOKIE = "imagerag_web"
SMALL_IMAGE = 128  # pixels: smaller images are enlarged with nearest-neighbour scaling
SHOWN_WIDTH = 240
REFERENCE_THUMBNAIL = 96
MAX_WEB_SAMPLES = 16  # RunContext.samples' bound
FILE_NAMES = re.compile(r"(?:run\.json|report\.html|images/[0-9A-Za-z_-]{1,64}\.png)")
# System fonts only: Gradio's default theme fetches its fonts from Google.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
CSS = """
.conversation img.round, .objects img.round { image-rendering: pixelated; }
.turn { border-top: 1px solid #ddd; padding: 6px 0; }
.you { font-weight: 600; margin: 4px 0; }
.rounds { display: flex; flex-wrap: wrap; gap: 12px; }
.round-card { width: 250px; }
.shot { position: relative; display: inline-block; line-height: 0; }
.region { position: absolute; border: 2px dashed #e11; box-sizing: border-box; }
.refs { display: flex; gap: 6px; flex-wrap: wrap; font-size: 12px; }
.refs img { width: 64px; height: 64px; image-rendering: pixelated; }
.ref { margin: 0; }
.best { outline: 3px solid #2a2; }
.error { color: #b00; font-weight: 600; }
.waiting { color: #a60; font-weight: 600; }
.verdict-satisfied { color: #170; } .verdict-missing, .verdict-pending { color: #b00; }
"""


class WebError(ImageRAGError):
    """Something the page cannot do as asked; the message says what to do instead."""


# ----------------------------------------------------------------------------- security


def required_token(host: str, token: str | None) -> str | None:
    """The token to require (`token`, else IMAGERAG_WEB_TOKEN; None only on loopback); ConfigError otherwise."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    token = token or None  # an empty token is no token
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            "the page's token must be at least 16 printable ASCII characters without spaces: make one with "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`'
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the page on {host} without a token (anyone who reaches that address could run the "
            f"loop and read its images): pass --token or set {TOKEN_ENV}, then open the URL with ?token=<token> "
            "once; or serve on 127.0.0.1"
        )
    return token


def _matches(value: str, patterns: Sequence[str]) -> bool:
    """Whether a Host or Origin is one of `patterns` ('name' exactly, 'name:*' with any port)."""
    for pattern in patterns:
        if value == pattern:
            return True
        if pattern.endswith(":*"):
            base = pattern[:-2]
            if value == base.split("://")[-1] or value == base:
                return True
            if value.startswith(base + ":") and value[len(base) + 1 :].isdigit():
                return True
    return False


class Guard:
    """ASGI middleware in front of everything the page serves: Host and Origin must be names the server is reached
    by; with a token, every request must carry the cookie (or the token, which a page load turns into the cookie)."""

    def __init__(self, app: ASGIApp, host: str, token: str | None, allowed_hosts: Sequence[str] = ()):
        self.app = app
        security = transport_security(host, allowed_hosts)
        self.hosts = list(security.allowed_hosts or [])
        self.origins = list(security.allowed_origins or [])
        self.token = token.encode("ascii") if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None and self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if self._same(query.get("token")):
                if scope["type"] == "http" and scope["method"] == "GET":
                    await self._set_cookie(scope, query, receive, send)
                    return
            elif not self._same(_cookie(headers.get("cookie", ""))):
                refusal = (
                    401,
                    f"open the page with ?token=<token> (the token the server was started with, {TOKEN_ENV})",
                )
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await PlainTextResponse(refusal[1], status_code=refusal[0])(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not _matches(host, self.hosts):
            return 421, f"unknown Host {host[:100]!r}: reach the page by an address the server allows (--allowed-host)"
        origin = headers.get("origin")
        if origin is not None and not _matches(origin, self.origins):
            return 403, f"requests from {origin[:100]!r} are refused: open the page itself"
        return None

    def _same(self, presented: str | None) -> bool:
        return self.token is not None and presented is not None and hmac.compare_digest(presented.encode(), self.token)

    async def _set_cookie(self, scope: Scope, query: dict[str, str], receive: Receive, send: Send) -> None:
        """A page load with the token: the cookie is set and the token leaves the address bar (and history)."""
        rest = urlencode({k: v for k, v in query.items() if k != "token"})
        response = RedirectResponse(scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else ""), 303)
        response.set_cookie(COOKIE, self.token.decode() if self.token else "", httponly=True, samesite="strict")
        await response(scope, receive, send)


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def run_file(out: Path, thread: str, name: str) -> Path:
    """A file of a run folder the page may serve (its images, run.json, report.html); WebError for anything else."""
    folder = Path(out) / thread
    if not re.fullmatch(THREAD_PATTERN, thread) or not FILE_NAMES.fullmatch(name):
        raise WebError("no such file")
    path = folder / name
    if (
        folder.is_symlink()
        or not RunFolder(folder).settings.is_file()
        or path.is_symlink()
        or not path.is_file()
        or not path.resolve().is_relative_to(folder.resolve())
    ):
        raise WebError("no such file")
    return path


# ----------------------------------------------------------------------------- typed changes from the page


def reference_words(obj: SceneObject, with_place: bool) -> str:
    """'the large red crescent' (with its place words when asked: 'the ring at the bottom')."""
    words = "the " + head_text(obj, list(obj.attributes.values())).split(" ", 1)[1]
    return f"{words} {CELL_PHRASES[obj.cell]}" if with_place and obj.cell else words


def phrase(change: Change, scene: ScenePlan, with_place: bool = False) -> str:
    """The words that carry out one typed change (the thread's reader turns them back into it)."""
    if isinstance(change, Add):
        new = change.objects[0]
        text = head_text(SceneObject(id="new", noun=new.noun, count=new.count), new.attributes)
        return f"add {text} {CELL_PHRASES[new.cell]}" if new.cell else f"add {text}"
    if not isinstance(change, Remove | SetAttribute | Move) or (isinstance(change, Move) and not change.cell):
        raise WebError(f"the page does not phrase {type(change).__name__} changes: type the instruction")
    target = scene.object(change.target.id or "")
    if target is None:
        raise WebError(f"there is no object {change.target.id!r} in this turn: pick one from the list")
    ref = reference_words(target, with_place)
    if isinstance(change, Remove):
        return f"remove {ref}"
    if isinstance(change, SetAttribute):
        return f"make {ref} {change.value}"
    return f"move {ref} to the {change.cell}"


def _key(change: Change) -> tuple[Any, ...]:
    """What a change does, without the words that said it."""
    if isinstance(change, Add):
        return ("add", tuple((o.noun, tuple(sorted(o.attributes)), o.cell, o.count) for o in change.objects))
    if isinstance(change, Remove | SetAttribute | Move):
        detail = change.value if isinstance(change, SetAttribute) else change.cell if isinstance(change, Move) else None
        return (change.op, change.target.id, detail)
    return (change.op,)


def as_message(changes: Sequence[Change], scene: ScenePlan, vocabulary_name: str) -> str:
    """A message that the thread's reader understands as exactly `changes` (checked here with the rules reader and
    the profile's vocabulary): each object named by its words, with its place when the words alone could mean
    another. WebError when no message says it."""
    vocabulary = vocabulary_for(vocabulary_name)
    for with_place in (False, True):
        message = " and ".join(phrase(change, scene, with_place) for change in changes)
        understood = understand_by_rules(message, scene, vocabulary)
        if understood.understood and [_key(c) for c in understood.changes] == [_key(c) for c in changes]:
            return message
    raise WebError("the page cannot say this change unambiguously: type it as a message instead")


# ----------------------------------------------------------------------------- the page's state and views


class Controls(BaseModel):
    """The budget and drawing controls of the page."""

    rounds: int = 4
    images: int = 6
    samples: int = 1
    seed: int = 0
    review: bool = False
    policy: str = "imagerag"


class Session(BaseModel):
    """One visitor's conversation: which thread, which turn the next message continues from, a pending review."""

    thread: str | None = None
    from_turn: int | None = None
    paused: str | None = None
    error: str | None = None
    note: str = ""
    waiting: bool = False
    running: bool = False


def new_thread_name() -> str:
    return f"web-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _node_of(candidate: Candidate) -> str:
    if candidate.round == 0:
        return "carried over from the turn it continues"
    if candidate.edit is not None:
        return "edit"
    return "retrieve + regenerate" if candidate.references else "generate"


def _reference_html(hit: RetrievalHit) -> str:
    try:
        image = ReferenceStore.load_image(hit)
        image.thumbnail((REFERENCE_THUMBNAIL, REFERENCE_THUMBNAIL))
        img = f'<img src="{image_data_url(image)}" alt="reference" width="64" height="64">'
    except (OSError, ValueError):
        img = ""
    return f'<figure class="ref">{img}<figcaption>{_e(hit.caption)} ({hit.similarity:.2f})</figcaption></figure>'


class Views:
    """HTML of a thread's state: the conversation, the object and concept list, the status and downloads."""

    def __init__(self, out: Path):
        self.out = out

    def image_url(self, thread: str, image_id: str, download: bool = False) -> str:
        return f"/files/{_e(thread)}/images/{_e(image_id)}.png" + ("?download=1" if download else "")

    def round_card(self, thread: str, c: Candidate, best: bool, size: tuple[int, int] | None) -> str:
        small = size is not None and max(size) < SMALL_IMAGE
        regions = "".join(
            f'<div class="region" title="{_e(r.text or "cleared")}" style="left:{r.box.x0 * 100:.1f}%;'
            f"top:{r.box.y0 * 100:.1f}%;width:{(r.box.x1 - r.box.x0) * 100:.1f}%;"
            f'height:{(r.box.y1 - r.box.y0) * 100:.1f}%"></div>'
            for r in (c.edit.regions if c.edit else [])
        )
        width = f' width="{SHOWN_WIDTH}"' if small else ' style="max-width:100%"'
        refs = "".join(_reference_html(h) for h in c.references)
        satisfied = f"{c.satisfied_count}/{len(c.verdicts)} satisfied" if c.verdicts else "being judged"
        return (
            f'<div class="round-card" data-image="{_e(c.image_id)}" data-turn="{c.turn}">'
            f'<div class="shot{" best" if best else ""}"><img class="round" src="{self.image_url(thread, c.image_id)}"'
            f' alt="round {c.round}"{width}>{regions}</div>'
            f"<div>round {c.round} · {_e(_node_of(c))} · {satisfied}{' · best' if best else ''}</div>"
            + (f'<div class="refs">{refs}</div>' if refs else "")
            + "</div>"
        )

    def conversation(self, session: Session, state: RunState | None) -> str:
        if state is None:
            return '<div class="conversation"><p>Describe an image to draw; then tell it what to change.</p></div>'
        thread = session.thread or ""
        folder = Path(state.run_dir) if state.run_dir else self.out / thread
        finished = {t.index: t for t in state.turns}
        indices = sorted({c.turn for c in state.candidates} | set(finished))
        if state.status in ("running", "paused") and state.turn not in indices:
            indices.append(state.turn)
        parts = []
        for index in indices:
            turn = finished.get(index)
            message = turn.message if turn else state.message
            cards = [
                self.round_card(
                    thread, c, turn is not None and turn.best_image == c.image_id, _size(folder, c.image_id)
                )
                for c in state.candidates
                if c.turn == index
            ]
            if turn is not None:
                branch = f" (from turn {turn.parent})" if turn.parent not in (None, index - 1) else ""
                end = f"turn {index}{branch}: {turn.status} ({turn.stop_reason})"
            else:
                end = f"turn {index}: {state.status}"
            parts.append(
                f'<div class="turn" data-turn="{index}"><div class="you">you: {_e(message)}</div>'
                f'<div class="rounds">{"".join(cards)}</div><div class="turn-status">{_e(end)}</div></div>'
            )
        if state.status == "needs_clarification" and state.clarification:
            parts.append(
                f'<div class="turn"><div class="you">you: {_e(state.message)}</div>'
                f'<div class="clarify">needs clarification: {_e(state.clarification)}</div></div>'
            )
        return f'<div class="conversation" data-thread="{_e(thread)}">{"".join(parts)}</div>'

    def objects(self, session: Session, state: RunState | None) -> str:
        scene, concepts, title = base_of(session, state)
        if scene is None:
            return '<div class="objects"><p>No objects yet.</p></div>'
        rows = "".join(
            f'<li data-object="{_e(o.id)}">{_e(o.id)}: {_e(describe_object(o))}</li>' for o in scene.objects
        ) + "".join(f'<li class="removed">removed: {_e(describe_object(o))}</li>' for o in scene.removed)
        concept_rows = "".join(
            f'<tr data-concept="{_e(c.id)}"><td>{_e(c.id)}</td><td>{_e(c.kind)}</td><td>{_e(c.text)}</td>'
            f'<td class="verdict-{_e(c.verdict)}">{_e(c.verdict)}</td>'
            f"<td>{'' if c.score is None else f'{c.score:.2f}'}</td><td>{_e(c.evidence)}</td></tr>"
            for c in concepts
        )
        return (
            f'<div class="objects"><h4>{_e(title)}</h4><ul>{rows}</ul>'
            "<table><tr><th>id</th><th>kind</th><th>concept</th><th>verdict</th><th>score</th><th>evidence</th></tr>"
            f"{concept_rows}</table></div>"
        )

    def status(self, session: Session, state: RunState | None) -> str:
        parts = []
        if session.waiting:
            parts.append(
                '<p class="waiting">waiting: another visitor\'s run is drawing on this model; yours starts next</p>'
            )
        if session.running and not session.waiting:
            parts.append('<p class="running">drawing…</p>')
        if session.error:
            parts.append(f'<p class="error">error: {_e(session.error)}</p>')
        if session.note:
            parts.append(f'<p class="note">{_e(session.note)}</p>')
        if state is not None and session.paused:
            parts.append(f'<p class="paused">turn {state.turn} is paused: answer the review below, or stop the run</p>')
        elif state is not None and not session.running:
            parts.append(
                f'<p class="final" data-status="{_e(state.status)}">thread {_e(session.thread)} · turn {state.turn} · '
                f"{_e(state.status)} ({_e(state.stop_reason)}) · {state.usage.rounds} round(s), "
                f"{state.usage.generations} image(s)</p>"
            )
        if session.from_turn is not None:
            parts.append(f'<p class="branch">the next message continues from turn {session.from_turn}</p>')
        return "".join(parts)

    def downloads(self, session: Session, state: RunState | None) -> str:
        if state is None or not session.thread or session.running:
            return ""
        best = next((t.best_image for t in reversed(state.turns) if t.best_image), None)
        links = [
            f'<a href="/files/{_e(session.thread)}/{name}?download=1" download>{name}</a>'
            for name in ("run.json", "report.html")
        ]
        if best:
            links.insert(0, f'<a href="{self.image_url(session.thread, best, download=True)}" download>best image</a>')
        return '<div class="downloads">download: ' + " · ".join(links) + "</div>"

    def review(self, session: Session) -> tuple[str, list[tuple[str, str]]]:
        request = pending_review(session)
        if request is None:
            return "", []
        hits = "".join(_reference_html(h) for h in request.hits)
        about = ", ".join(request.concepts) or "the prompt"
        error = f'<p class="error">previous answer refused: {_e(request.error)}</p>' if request.error else ""
        text = f'<div class="review"><p>Review before round {request.round}: references for {_e(about)}</p>{error}<div class="refs">{hits}</div></div>'
        return text, [(f"{h.caption} ({h.similarity:.2f})", h.id) for h in request.hits]


def _size(folder: Path, image_id: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(RunFolder(folder).image(image_id)) as image:
            return image.size
    except OSError:
        return None


def describe_object(obj: SceneObject) -> str:
    place = obj.cell or (f"{obj.relation} {obj.relative_to}" if obj.relation else obj.place) or "anywhere"
    words = " ".join([*obj.attributes.values(), obj.noun])
    return f"{obj.count} x {words}, {place}" if obj.count > 1 else f"{words}, {place}"


def base_of(session: Session, state: RunState | None) -> tuple[ScenePlan | None, list[Concept], str]:
    """The objects and concepts the next message changes: the chosen earlier turn's, else the thread's now."""
    if state is None:
        return None, [], ""
    if session.from_turn is not None:
        turn = next((t for t in state.turns if t.index == session.from_turn), None)
        if turn is not None and turn.scene is not None:
            return turn.scene, turn.concepts, f"objects and concepts of turn {turn.index}"
    return state.scene, state.concepts, f"objects and concepts (turn {state.turn})"


def pending_review(session: Session) -> ReviewRequest | None:
    return _reviews.get(session.paused) if session.paused else None


_reviews: dict[str, ReviewRequest] = {}  # run folder -> the review it waits for (this process's runs)
# One lock per loaded generator, for the whole process: a pipeline is not re-entrant, whichever page drives it.
_pipelines: dict[int, threading.Lock] = {}
_pipelines_guard = threading.Lock()


# ----------------------------------------------------------------------------- the page


class ChatPage:
    """The page's handlers over one process's runs. `backends`: hand over loaded backends (tests); default: the
    profile's, loaded once per process (agent.run.prepare)."""

    def __init__(self, settings: Settings, out: Path, backends: Backends | None = None):
        self.settings = settings
        self.out = Path(out)
        self.views = Views(self.out)
        self._backends = backends
        self._stops: dict[str, threading.Event] = {}
        self._guard = threading.Lock()

    # -- settings and backends

    def settings_for(self, session: Session, controls: Controls) -> Settings:
        """The CLI's settings for this message: the thread's recorded recipe, the page's budget on top."""
        base = self.settings
        if session.thread is None:
            base = base.model_copy(
                update={"policy": controls.policy, "seed": controls.seed, "samples": controls.samples}
            )
        settings = thread_settings(session.thread, base)
        budget = Budget.model_validate(
            settings.budget.model_dump() | {"max_rounds": controls.rounds, "max_generations": controls.images}
        )
        settings = settings.model_copy(update={"budget": budget, "review": controls.review})
        return settings.check(has_llm=None if self._backends is None else self._backends.llm is not None)

    def backends(self, settings: Settings) -> Backends:
        return self._backends if self._backends is not None else prepare(settings)

    def _pipeline_lock(self, backends: Backends) -> threading.Lock:
        with _pipelines_guard:
            return _pipelines.setdefault(id(backends.generator), threading.Lock())

    def _stop_event(self, thread: str) -> threading.Event:
        with self._guard:
            event = self._stops[thread] = threading.Event()
            return event

    # -- rendering

    def state(self, session: Session) -> RunState | None:
        if not session.thread:
            return None
        try:
            return thread_state(session.thread, thread_settings(session.thread, self.settings))
        except user_errors():
            return None

    def render(self, session: Session) -> tuple[Any, ...]:
        state = self.state(session)
        scene, concepts, _ = base_of(session, state)
        review_html, review_choices = self.views.review(session)
        objects = [(f"{o.id}: {describe_object(o)}", o.id) for o in (scene.objects if scene else [])]
        concept_choices = [(f"{c.id}: {c.text}", c.id) for c in concepts if c.kind != "absent"]
        turns = [(f"turn {t.index}: {t.message[:60]}", t.index) for t in (state.turns if state else [])]
        return (
            session,
            self.views.conversation(session, state),
            self.views.objects(session, state),
            self.views.status(session, state),
            gr.update(visible=bool(review_html)),
            review_html,
            gr.update(choices=review_choices, value=[]),
            gr.update(choices=objects, value=None),
            gr.update(choices=concept_choices, value=None),
            gr.update(choices=turns, value=None),
            self.views.downloads(session, state),
            gr.update(choices=self.threads(), value=session.thread),
        )

    def open_thread(self, name: str | None) -> tuple[Any, ...]:
        """A thread from the list, with its pending review when one of this process's runs waits for it."""
        folder = str(self.out / name) if name else None
        return self.render(Session(thread=name or None, paused=folder if folder in _reviews else None))

    def threads(self) -> list[str]:
        """Thread folders of the output folder, newest first."""
        if not self.out.is_dir():
            return []
        folders = [
            p for p in self.out.iterdir() if p.is_dir() and not p.is_symlink() and RunFolder(p).settings.is_file()
        ]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    # -- runs

    def _run(
        self, session: Session, settings: Settings, start: Callable[[Backends, threading.Event], Iterator[RunEvent]]
    ) -> Iterator[tuple[Any, ...]]:
        """Drive a run's events, rendering after every node; queued behind other runs on the same pipeline."""
        thread = session.thread or ""
        session = session.model_copy(update={"running": True, "error": None})
        yield self.render(session)
        backends = self.backends(settings)
        lock = self._pipeline_lock(backends)
        while not lock.acquire(timeout=0.2):
            if not session.waiting:
                session = session.model_copy(update={"waiting": True})
                yield self.render(session)
        session = session.model_copy(update={"waiting": False})
        try:
            stop = self._stop_event(thread)
            for event in start(backends, stop):
                if isinstance(event, ReviewRequested):
                    _reviews[event.run_dir] = ReviewRequest.model_validate(event.request)
                    session = session.model_copy(update={"paused": event.run_dir, "running": False})
                elif isinstance(event, Finished):
                    _reviews.pop(event.result.run_dir, None)
                    _reviews.pop(str(Path(self.out) / thread), None)
                    asked = event.result.clarification and f"needs clarification: {event.result.clarification}"
                    session = session.model_copy(
                        update={"paused": None, "running": False, "note": asked or session.note}
                    )
                if event.kind in ("node_finished", "verdicts", "edited", "review", "finished"):
                    yield self.render(session)
        finally:
            lock.release()
            with self._guard:
                self._stops.pop(thread, None)

    def _guarded(self, session: Session, work: Callable[[], Iterator[tuple[Any, ...]]]) -> Iterator[tuple[Any, ...]]:
        """Errors a person can fix appear on the page with the fix; the page keeps working."""
        try:
            yield from work()
        except user_errors() as error:
            failed = session.model_copy(update={"error": user_message(error), "running": False, "waiting": False})
            if failed.paused and self.state(failed) is None:
                failed.paused = None
            yield self.render(failed)

    def send(self, message: str, controls: Controls, session: Session) -> Iterator[tuple[Any, ...]]:
        """A message: the first draws, each next one refines (from `session.from_turn` when one was chosen)."""

        def work() -> Iterator[tuple[Any, ...]]:
            if session.paused:
                raise WebError("the run waits for your review: answer it (or stop the run) before the next message")
            try:  # before any model loads: an empty prompt is answered at once
                RunInput(message=message)
            except ValidationError as error:
                raise WebError(error.errors()[0]["msg"].removeprefix("Value error, ")) from None
            settings = self.settings_for(session, controls)
            thread, from_turn = session.thread or new_thread_name(), session.from_turn

            def start(backends: Backends, stop: threading.Event) -> Iterator[RunEvent]:
                return stream(message, settings, self.out, thread, backends, from_turn, stop)

            yield from self._run(session.model_copy(update={"thread": thread, "from_turn": None}), settings, start)

        yield from self._guarded(session, work)

    def change(self, changes: Sequence[Change], controls: Controls, session: Session) -> Iterator[tuple[Any, ...]]:
        """A typed change from the object list, sent as the thread's next message (recorded as a turn)."""

        def work() -> Iterator[tuple[Any, ...]]:
            state = self.state(session)
            scene, _, _ = base_of(session, state)
            if state is None or scene is None:
                raise WebError("draw something first: the object list belongs to a thread's image")
            vocabulary = self.settings_for(session, controls).resolved_profile().vocabulary
            message = as_message(changes, scene, vocabulary)
            yield from self.send(
                message, controls, session.model_copy(update={"note": f"typed change sent as: {message!r}"})
            )

        yield from self._guarded(session, work)

    def review(
        self, decision: ReviewDecision | dict[str, Any], controls: Controls, session: Session
    ) -> Iterator[tuple[Any, ...]]:
        def work() -> Iterator[tuple[Any, ...]]:
            if not session.paused:
                raise WebError("no run waits for a review")
            answer = checked_decision(decision)
            settings = self.settings_for(session, controls)
            run_dir = session.paused

            def start(backends: Backends, stop: threading.Event) -> Iterator[RunEvent]:
                return resume(run_dir, answer, settings, backends, stop)

            yield from self._run(session.model_copy(update={"paused": None}), settings, start)

        yield from self._guarded(session, work)

    def stop(self, controls: Controls, session: Session) -> Iterator[tuple[Any, ...]]:
        """End the visitor's run after the node that is running, with the best image so far."""

        def work() -> Iterator[tuple[Any, ...]]:
            if session.paused:
                settings = self.settings_for(session, controls)
                run_dir = session.paused

                def start(backends: Backends, stop: threading.Event) -> Iterator[RunEvent]:
                    stop.set()
                    return resume(run_dir, None, settings, backends, stop)

                yield from self._run(session.model_copy(update={"paused": None}), settings, start)
                return
            with self._guard:
                event = self._stops.get(session.thread or "")
            if event is None:
                raise WebError("no run of this thread is going")
            event.set()
            yield self.render(session.model_copy(update={"running": True, "note": "stopping after the current step"}))

        yield from self._guarded(session, work)


def _controls(rounds: float, images: float, samples: float, seed: float, review: bool, policy: str) -> Controls:
    try:
        return Controls(
            rounds=int(rounds), images=int(images), samples=int(samples), seed=int(seed), review=review, policy=policy
        )
    except (TypeError, ValueError):
        raise WebError("rounds, images, samples and seed are whole numbers") from None


def _failing(page: ChatPage, session: Session, error: ImageRAGError) -> Iterator[tuple[Any, ...]]:
    yield page.render(session.model_copy(update={"error": user_message(error)}))


def build_page(page: ChatPage) -> gr.Blocks:
    """The page: threads and budget on the left, the conversation in the middle, the objects and concepts on the
    right. Every handler renders the whole page from the thread's state (ChatPage.render)."""
    profile = page.settings.resolved_profile()
    vocabulary = vocabulary_for(profile.vocabulary)
    nouns = sorted(vocabulary.nouns or ())
    colours = ["", *vocabulary.attributes.get("colour", ())]
    sizes = ["", *vocabulary.attributes.get("size", ())]
    budget = page.settings.budget
    with gr.Blocks(title="imagerag chat", analytics_enabled=False) as blocks:
        session = gr.State(Session())
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                thread_pick = gr.Dropdown(
                    label="threads", choices=page.threads(), allow_custom_value=True, elem_id="thread-pick"
                )
                new_thread = gr.Button("New thread", elem_id="new-thread")
                rounds = gr.Number(
                    budget.max_rounds, label="rounds", precision=0, minimum=1, maximum=MAX_ROUNDS, elem_id="rounds"
                )
                images = gr.Number(
                    budget.max_generations,
                    label="images",
                    precision=0,
                    minimum=1,
                    maximum=MAX_GENERATIONS,
                    elem_id="images",
                )
                samples = gr.Number(
                    page.settings.samples,
                    label="samples per round",
                    precision=0,
                    minimum=1,
                    maximum=MAX_WEB_SAMPLES,
                    elem_id="samples",
                )
                seed = gr.Number(
                    page.settings.seed, label="seed", precision=0, minimum=0, maximum=MAX_SEED - 1, elem_id="seed"
                )
                review = gr.Checkbox(
                    page.settings.review, label="pause for review before each regeneration", elem_id="review"
                )
                policy = gr.Radio(
                    ["imagerag", "agent"], value=page.settings.policy, label="policy (new thread)", elem_id="policy"
                )
                gr.Markdown(
                    f"profile **{_e(profile.name)}**; a thread keeps the profile, seed and samples it began with"
                )
            with gr.Column(scale=3):
                conversation = gr.HTML(page.views.conversation(Session(), None), elem_id="conversation")
                status = gr.HTML("", elem_id="status")
                with gr.Row():
                    message = gr.Textbox(
                        label="message",
                        placeholder="a large red crescent in the top left and a blue ring at the bottom",
                        elem_id="message",
                        scale=5,
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                with gr.Column(visible=False, elem_id="review-box") as review_box:
                    review_html = gr.HTML("", elem_id="review-hits")
                    review_choice = gr.CheckboxGroup(label="references to keep", elem_id="review-choice")
                    with gr.Row():
                        accept_all = gr.Button("Accept all", elem_id="accept-all")
                        accept_chosen = gr.Button("Accept chosen", elem_id="accept-chosen")
                        drop_all = gr.Button("Drop all", elem_id="drop-all")
                    upload = gr.File(
                        label="replacement image", file_types=["image"], type="filepath", elem_id="review-upload"
                    )
                    replace = gr.Button("Use my image", elem_id="review-replace")
                downloads = gr.HTML("", elem_id="downloads")
            with gr.Column(scale=2):
                objects_html = gr.HTML(page.views.objects(Session(), None), elem_id="objects")
                object_pick = gr.Dropdown(label="object", elem_id="object-pick")
                with gr.Row():
                    colour = gr.Dropdown(
                        colours, value="", label="colour", allow_custom_value=not vocabulary.closed, elem_id="colour"
                    )
                    size = gr.Dropdown(
                        sizes, value="", label="size", allow_custom_value=not vocabulary.closed, elem_id="size"
                    )
                    cell = gr.Dropdown(["", *CELL_NAMES], value="", label="place", elem_id="cell")
                with gr.Row():
                    remove_object = gr.Button("Remove object", elem_id="remove-object")
                    edit_object = gr.Button("Apply to object", elem_id="edit-object")
                shape = gr.Dropdown(
                    nouns, label="new object", allow_custom_value=not vocabulary.closed, elem_id="shape"
                )
                add_object = gr.Button("Add object", elem_id="add-object")
                concept_pick = gr.Dropdown(label="concept", elem_id="concept-pick")
                remove_concept = gr.Button("Remove concept", elem_id="remove-concept")
                turn_pick = gr.Dropdown(label="earlier turn", elem_id="turn-pick")
                with gr.Row():
                    go_back = gr.Button("Continue from this turn", elem_id="go-back")
                    undo = gr.Button("Undo last change", elem_id="undo")

        outputs = [
            session, conversation, objects_html, status, review_box, review_html, review_choice,
            object_pick, concept_pick, turn_pick, downloads, thread_pick,
        ]  # fmt: skip
        controls = [rounds, images, samples, seed, review, policy]

        def on_send(text: str, *args: Any) -> Iterator[tuple[Any, ...]]:
            *values, state = args
            try:
                chosen = _controls(*values)
            except ImageRAGError as error:
                yield from _failing(page, state, error)
                return
            yield from page.send(text, chosen, state.model_copy(update={"note": ""}))

        def on_change(make: Callable[..., list[Change]]) -> Callable[..., Iterator[tuple[Any, ...]]]:
            def handler(*args: Any) -> Iterator[tuple[Any, ...]]:
                *values, state = args
                try:
                    changes = make(*values[: len(values) - len(controls)], state)
                    chosen = _controls(*values[len(values) - len(controls) :])
                except ImageRAGError as error:
                    yield from _failing(page, state, error)
                    return
                yield from page.change(changes, chosen, state)

            return handler

        def target(object_id: str | None) -> ObjectRef:
            if not object_id:
                raise WebError("choose an object from the list first")
            return ObjectRef(id=object_id)

        def edits(object_id: str | None, colour: str, size: str, cell: str, state: Session) -> list[Change]:
            ref = target(object_id)
            changes: list[Change] = [SetAttribute(target=ref, value=v) for v in (size, colour) if v]
            changes += [Move(target=ref, cell=cell)] if cell else []
            if not changes:
                raise WebError("choose a colour, size or place to give the object")
            return changes

        def additions(noun: str | None, colour: str, size: str, cell: str, state: Session) -> list[Change]:
            if not noun:
                raise WebError("choose the new object's shape first")
            return [Add(objects=[NewObject(noun=noun, attributes=[v for v in (size, colour) if v], cell=cell or None)])]

        def concept_removal(concept_id: str | None, state: Session) -> list[Change]:
            _, concepts, _ = base_of(state, page.state(state))
            concept = next((c for c in concepts if c.id == concept_id), None)
            if concept is None:
                raise WebError("choose a concept from the list first")
            if concept.kind not in ("object", "count") or concept.object_id is None:
                raise WebError(
                    f"{concept.text!r} is part of an object: change its colour, size or place with 'Apply to object', "
                    "or remove the object's own concept"
                )
            return [Remove(target=ObjectRef(id=concept.object_id))]

        def on_review(make: Callable[..., ReviewDecision | dict[str, Any]]) -> Callable[..., Iterator[tuple[Any, ...]]]:
            def handler(*args: Any) -> Iterator[tuple[Any, ...]]:
                *values, state = args
                try:
                    chosen = _controls(*values[len(values) - len(controls) :])
                    decision = make(*values[: len(values) - len(controls)])
                except ImageRAGError as error:
                    yield from _failing(page, state, error)
                    return
                yield from page.review(decision, chosen, state)

            return handler

        def keep_chosen(ids: list[str]) -> ReviewDecision:
            if not ids:
                raise WebError("tick the references to keep first (or drop them all)")
            return ReviewDecision(action="accept", keep=ids)

        def replacement(path: str | None) -> dict[str, Any]:
            if not path:
                raise WebError("upload an image first")
            return {"action": "replace", "images": [path]}

        def on_stop(*args: Any) -> Iterator[tuple[Any, ...]]:
            *values, state = args
            try:
                chosen = _controls(*values)
            except ImageRAGError as error:
                yield from _failing(page, state, error)
                return
            yield from page.stop(chosen, state)

        def on_undo(*args: Any) -> Iterator[tuple[Any, ...]]:
            yield from on_send("undo", *args)

        send.click(on_send, [message, *controls, session], outputs, concurrency_limit=None)
        message.submit(on_send, [message, *controls, session], outputs, concurrency_limit=None)
        undo.click(on_undo, [*controls, session], outputs, concurrency_limit=None)
        stop.click(on_stop, [*controls, session], outputs, concurrency_limit=None)
        pick = [colour, size, cell]
        remove_object.click(
            on_change(lambda o, s: [Remove(target=target(o))]),
            [object_pick, *controls, session],
            outputs,
            concurrency_limit=None,
        )
        edit_object.click(on_change(edits), [object_pick, *pick, *controls, session], outputs, concurrency_limit=None)
        add_object.click(on_change(additions), [shape, *pick, *controls, session], outputs, concurrency_limit=None)
        remove_concept.click(
            on_change(concept_removal), [concept_pick, *controls, session], outputs, concurrency_limit=None
        )
        accept_all.click(
            on_review(lambda: ReviewDecision(action="accept")), [*controls, session], outputs, concurrency_limit=None
        )
        accept_chosen.click(
            on_review(keep_chosen), [review_choice, *controls, session], outputs, concurrency_limit=None
        )
        drop_all.click(
            on_review(lambda: ReviewDecision(action="drop")), [*controls, session], outputs, concurrency_limit=None
        )
        replace.click(on_review(replacement), [upload, *controls, session], outputs, concurrency_limit=None)
        thread_pick.input(page.open_thread, [thread_pick], outputs)
        new_thread.click(lambda: page.render(Session()), [], outputs)

        def continue_from(turn: int | None, state: Session) -> tuple[Any, ...]:
            if turn is None:
                return page.render(state.model_copy(update={"error": "choose an earlier turn first"}))
            return page.render(state.model_copy(update={"from_turn": int(turn), "error": None, "note": ""}))

        go_back.click(continue_from, [turn_pick, session], outputs)
    return blocks


def build_app(
    page: ChatPage, host: str = "127.0.0.1", token: str | None = None, allowed_hosts: Sequence[str] = ()
) -> ASGIApp:
    """The project's ASGI app: run-folder files, the Gradio page at /, all behind Guard."""
    token = required_token(host, token)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/files/{thread}/{name:path}")
    def files(thread: str, name: str, download: bool = False) -> Response:
        try:
            path = run_file(page.out, thread, name)
        except WebError:
            return PlainTextResponse("no such file", status_code=404)
        # A report is our own self-contained page: nothing in it may run or load anything.
        headers = {"Content-Security-Policy": "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'"}
        filename = f"{thread}-{path.name}" if download else None
        return FileResponse(path, filename=filename, headers=headers)

    blocks = build_page(page)
    blocks.queue(default_concurrency_limit=None)
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    gr.mount_gradio_app(app, blocks, path="/", theme=theme, css=CSS, ssr_mode=False, mcp_server=False, pwa=False)
    return Guard(app, host, token, allowed_hosts)


def serve_web(
    settings: Settings,
    out: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    token: str | None = None,
    allowed_hosts: Sequence[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the page until interrupted; ConfigError (before anything is bound) off loopback without a token."""
    import uvicorn

    token = required_token(host, token)
    app = build_app(ChatPage(settings, out), host, token, allowed_hosts)
    name = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{name}:{port}/" + (f"?token={token}" if token else "")
    if on_ready is not None:
        on_ready(url)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
