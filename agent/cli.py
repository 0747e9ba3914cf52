"""The `imagerag` command line."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from imagerag.tools.errors import user_errors, user_message

# Heavy libraries (torch, diffusers, langgraph, chromadb, ...) load inside the commands that need them, so
# `imagerag --help` answers at once; tests/test_cli_startup.py keeps it so.
if TYPE_CHECKING:
    from imagerag.agent.config import Settings
    from imagerag.agent.events import RunEvent
    from imagerag.agent.result import RunResult
    from imagerag.graphs.nodes import ReviewDecision, ReviewRequest
    from imagerag.tools.types import SceneObject


# Typer vendors click from 0.29 on: click's error classes, taken from typer's own BadParameter, whichever click it is.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]
_ClickException: type[Exception] = typer.BadParameter.__mro__[2]


class _Group(TyperGroup):
    """Usage errors (an unknown option, a run name that looks like one, a missing argument) print like every other
    error, as data: `error: ...` on stderr, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except _UsageError as error:
            err.print(plain(f"error: {error} (see `imagerag --help`)"))
            sys.exit(2)
        except _ClickException as error:
            err.print(plain(f"error: {error}"))
            sys.exit(getattr(error, "exit_code", 1))
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="Make text-to-image models draw what the prompt asks.",
)
# Prompts, captions, paths and error messages are data from users and third-party datasets: nothing printed is
# parsed as rich markup, and control characters (terminal escape sequences, bidi overrides) are shown, not obeyed.
stdout = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def plain(value: object) -> Text:
    """`value` as text that reaches the terminal as data: no markup, control characters made visible."""
    return styled(str(value))


def styled(*parts: str | tuple[str, str]) -> Text:
    """Strings, or (string, style) pairs for our own emphasis, as one Text; every string is sanitised."""
    text = Text()
    for part in parts:
        value, style = (part, "") if isinstance(part, str) else part
        text.append(_CONTROL.sub(_visible, value), style=style)
    return text


class PlainFormatter(logging.Formatter):
    """Log lines name files and captions from datasets: their control characters are shown, not obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(_visible, super().format(record))


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(styled(("error:", "bold red"), " ", message))
    raise typer.Exit(code)


def make_settings(budget: dict[str, Any] | None = None, **overrides: Any) -> Settings:
    """Settings from env/TOML with the CLI's explicit flags on top (None means: not given)."""
    from pydantic import ValidationError

    from imagerag.agent.config import Settings
    from imagerag.graphs.state import Budget
    from imagerag.tools.errors import ConfigError

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        given = {k: v for k, v in (budget or {}).items() if v is not None}
        if given:
            settings = settings.model_copy(
                update={"budget": Budget.model_validate(settings.budget.model_dump() | given)}
            )
        return settings.check()
    except (ValidationError, ConfigError) as error:
        fail(user_message(error))


Profile = Annotated[
    str | None,
    typer.Option(help="Backend profile: sdxl, omnigen, sd15, tiny, mini, or one an installed package registers."),
]
Collection = Annotated[str | None, typer.Option(help="Reference collection (default: the profile's).")]
DataDir = Annotated[Path | None, typer.Option(help="Data folder for chromadb and built models.")]
ChromaUrl = Annotated[str | None, typer.Option(help="A Chroma server (http://host:8000) instead of the data folder's.")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw; with an existing --thread, how to change its image.")],
    profile: Profile = None,
    policy: Annotated[str | None, typer.Option(help="imagerag (deterministic) or agent (LLM).")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Policy turns, the first generation included.")] = None,
    max_generations: Annotated[int | None, typer.Option(help="Images generated in all.")] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Wall-clock budget.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="LLM token budget.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    samples: Annotated[
        int | None,
        typer.Option(min=1, max=16, help="Images per round in one batched call; each is judged and counts as one."),
    ] = None,
    edits: Annotated[
        bool | None,
        typer.Option(
            "--edits/--no-edits",
            help="Redraw only what is missing when the best image holds the rest (default), or always redraw all.",
        ),
    ] = None,
    collection: Collection = None,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder that receives the run folder.")] = Path("runs"),
    thread: Annotated[
        str | None, typer.Option(help="Name the run as a thread; an existing thread is continued.")
    ] = None,
    from_turn: Annotated[
        int | None,
        typer.Option(min=1, help="With an existing --thread: continue from this turn's image and objects (a branch)."),
    ] = None,
    review: Annotated[
        bool, typer.Option("--review", help="Pause before each regeneration to review references.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Generate an image, critique it per concept, retrieve references and regenerate until satisfied."""
    from imagerag.agent.run import stream

    settings = make_settings(
        budget={
            "max_rounds": max_rounds,
            "max_generations": max_generations,
            "max_seconds": max_seconds,
            "max_tokens": max_tokens,
        },
        profile=profile,
        policy=policy,
        seed=seed,
        samples=samples,
        edits=edits,
        collection=collection,
        data_dir=data_dir,
        review=review or None,
    )
    settings = recorded(thread, settings)
    drive(settings, lambda: stream(prompt, settings, out, thread, from_turn=from_turn), json_output)


@app.command()
def resume(
    run: Annotated[str, typer.Argument(help="A run folder, or a thread name.")],
    decision: Annotated[str | None, typer.Option(help="For a run paused for review: accept or drop.")] = None,
    replace: Annotated[
        list[Path] | None, typer.Option(help="For a run paused for review: use these images instead.")
    ] = None,
    data_dir: DataDir = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Continue a run that was killed, failed, or paused for review, from its last checkpoint."""
    from imagerag.agent.run import resume as resume_run
    from imagerag.graphs.nodes import ReviewDecision

    settings = make_settings(data_dir=data_dir)
    answer = None
    if replace:
        answer = ReviewDecision(action="replace", images=[str(p) for p in replace])
    elif decision:
        if decision not in ("accept", "drop"):
            fail(f"--decision must be accept or drop, not {decision!r}")
        answer = ReviewDecision.model_validate({"action": decision})
    drive(
        settings, lambda: resume_run(run, answer, settings), json_output, load=False
    )  # the run folder names its profile


@app.command()
def chat(
    thread: Annotated[str | None, typer.Option(help="Thread to continue (default: a new one).")] = None,
    profile: Profile = None,
    policy: Annotated[str | None, typer.Option(help="imagerag or agent.")] = None,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder that receives the thread's folder.")] = Path("runs"),
) -> None:
    """An interactive session: the first message draws, each next one refines the current best image."""
    from imagerag.agent.run import stream

    settings = make_settings(profile=profile, policy=policy, data_dir=data_dir)
    if thread is not None:
        settings = recorded(thread, settings)
    thread = thread or f"chat-{datetime.now():%Y%m%d-%H%M%S}"
    err.print(styled("thread ", (thread, "bold"), ": describe an image, then refine it; an empty line or 'exit' ends"))
    while True:
        try:
            message = typer.prompt("you", default="", show_default=False, err=True).strip()
        except (EOFError, typer.Abort):
            break
        if message in ("", "exit", "quit"):
            break
        drive(settings, partial(stream, message, settings, out, thread), json_output=False, exit_on_failure=False)


@app.command()
def history(
    thread: Annotated[str, typer.Argument(help="Thread name.")],
    concepts: Annotated[
        bool, typer.Option("--concepts", help="Also show the objects and concepts after each turn.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """List a thread's turns, with the turn each continued from (a branch when it is not the one before)."""
    from imagerag.agent.run import history as thread_history

    try:
        turns = thread_history(thread, make_settings(data_dir=data_dir))
    except user_errors() as error:
        fail(user_message(error))
    table = Table(title=plain(f"thread {thread}"))
    columns = ("turn", "from", "message", "status", "best image", "satisfied", "missing")
    for column in (*columns, "objects", "concepts") if concepts else columns:
        table.add_column(column)
    for t in turns:
        parent = "" if t.parent is None else str(t.parent) + ("" if t.parent == t.index - 1 else " (branch)")
        row = [str(t.index), parent, t.message, t.status, t.best_image or "", "; ".join(t.satisfied)]
        row.append("; ".join(t.missing))
        if concepts:
            row.append("\n".join(f"{o.id}: {describe_object(o)}" for o in t.scene.objects) if t.scene else "")
            row.append("\n".join(f"{c.id} {c.kind}: {c.text} ({c.verdict})" for c in t.concepts))
        table.add_row(*map(plain, row))
    stdout.print(table)


def describe_object(obj: SceneObject) -> str:
    """An object as the history shows it: its words and its place."""
    place = obj.cell or (f"{obj.relation} {obj.relative_to}" if obj.relation else obj.place) or "anywhere"
    words = " ".join([*obj.attributes.values(), obj.noun])
    return f"{obj.count} x {words}, {place}" if obj.count > 1 else f"{words}, {place}"


def drive(
    settings: Settings,
    start: Callable[[], Iterator[RunEvent]],
    json_output: bool,
    exit_on_failure: bool = True,
    load: bool = True,
) -> None:
    """Load the backends of `settings` (with `load`; a local profile builds its collection on first use) with
    progress, run an event stream with live progress, answer review pauses at the terminal, print the result."""
    from imagerag.agent.run import drive as drive_run
    from imagerag.agent.run import prepare

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("loading models", total=None)

        def review(request: ReviewRequest) -> ReviewDecision:
            progress.stop()
            try:
                return ask_reviewer(request)
            finally:
                progress.start()

        try:
            if load:
                prepare(
                    settings,
                    lambda stage, done, total: progress.update(task, description=stage, completed=done, total=total),
                )
            progress.update(task, description="starting", completed=0, total=None)
            result = drive_run(start(), settings, on_event=lambda e: show_event(e, progress, task), reviewer=review)
        except user_errors() as error:
            progress.stop()
            if exit_on_failure:
                fail(user_message(error))
            err.print(styled(("error:", "bold red"), " ", user_message(error)))  # a chat goes on
            return
    if json_output:
        typer.echo(result.model_dump_json(indent=2))
    else:
        show_result(result)
    if exit_on_failure and result.status in EXIT_CODES:
        raise typer.Exit(EXIT_CODES[result.status])


def show_event(event: RunEvent, progress: Progress, task: TaskID) -> None:
    if event.kind == "diffusion_step":
        progress.update(task, description="diffusion", completed=event.step, total=event.total)
    elif event.kind == "node_started":
        progress.update(task, description=event.node, completed=0, total=None)
    elif event.kind == "node_finished":
        for step in event.steps:
            err.print(styled((f"round {step.round}", "dim"), " ", (step.node, "bold"), " ", step.summary))


def ask_reviewer(req: ReviewRequest) -> ReviewDecision:
    """Show the references a regeneration would use and read the person's decision."""
    from imagerag.graphs.nodes import ReviewDecision

    table = Table(
        title=plain(f"review before round {req.round}: references for {', '.join(req.concepts) or 'the prompt'}")
    )
    for column in ("id", "caption", "similarity", "source"):
        table.add_column(column)
    for hit in req.hits:
        table.add_row(*map(plain, (hit.id[:12], hit.caption, f"{hit.similarity:.3f}", hit.source)))
    err.print(table)
    if req.error:  # the previous answer could not be used
        err.print(styled(("previous answer refused: ", "red"), req.error))
    while True:
        answer = typer.prompt("accept | drop | keep ID[,ID] | replace PATH[,PATH]", default="accept", err=True).strip()
        verb, _, rest = answer.partition(" ")
        items = [x.strip() for x in rest.split(",") if x.strip()]
        if verb == "accept" or verb == "drop":
            return ReviewDecision(action=verb)
        if verb == "keep" and items:
            return ReviewDecision(
                action="accept", keep=[h.id for h in req.hits if any(h.id.startswith(i) for i in items)]
            )
        if verb == "replace" and items:
            return ReviewDecision(action="replace", images=items)
        err.print(styled(("answer with accept, drop, keep ID[,ID] or replace PATH[,PATH]", "red")))


def recorded(thread: str | None, settings: Settings) -> Settings:
    """How a message to `thread` draws: as the thread was started (its recorded profile, ...), loaded before any
    model is; `settings` for a new thread."""
    from imagerag.agent.run import thread_settings

    try:
        return thread_settings(thread, settings)
    except user_errors() as error:
        fail(user_message(error))


# A run that failed exits 1; an instruction that was not understood is the caller's to fix, like any bad input.
EXIT_CODES = {"failed": 1, "needs_clarification": 2}


def show_result(result: RunResult) -> None:
    if result.clarification:
        err.print(styled(("needs clarification:", "bold yellow"), " ", result.clarification))
        err.print(plain(f"the thread is as it was (turn {result.turn}); send a clearer instruction"))
        return
    title = f"{result.status} ({result.stop_reason}) · {result.rounds} round(s), {result.generations} image(s)"
    table = Table(title=plain(f"{title}, {result.elapsed:.1f} s"))
    for column in ("concept", "verdict", "score"):
        table.add_column(column)
    for c in result.concepts:
        table.add_row(*map(plain, (c.text, c.verdict, f"{c.score:.2f}" if c.score is not None else "")))
    err.print(table)
    if result.error:
        err.print(styled((result.error, "red")))
    err.print(plain(f"best image: {result.best_image or 'none'}"))
    err.print(plain(f"report:     {result.report}"))


thread_app = typer.Typer(no_args_is_help=True, help="Manage threads.")
app.add_typer(thread_app, name="thread")


@thread_app.command("undo")
def thread_undo(
    thread: Annotated[str, typer.Argument(help="Thread name.")],
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder that holds the thread's folder.")] = Path("runs"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Undo the thread's last change: a new turn with the objects and the image of the turn before it (the message
    'undo' does the same)."""
    from imagerag.agent.run import stream

    settings = recorded(thread, make_settings(data_dir=data_dir))
    drive(settings, lambda: stream("undo", settings, out, thread), json_output)


@thread_app.command("delete")
def thread_delete(
    thread: Annotated[str, typer.Argument(help="Thread name.")],
    folder: Annotated[
        bool, typer.Option("--folder", help="Also delete its run folder (images, run.json, report).")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Delete a thread's checkpoints (and with --folder its run folder), e.g. when its folder was removed by hand."""
    from imagerag.agent.run import delete_thread

    try:
        removed = delete_thread(thread, make_settings(data_dir=data_dir), remove_folder=folder)
    except user_errors() as error:
        fail(user_message(error))
    err.print(plain(f"thread {thread!r} deleted" + (f", with its folder {removed}" if removed else "")))


@app.command()
def index(
    sources: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image folders (recursive; captions from sidecar .txt/.json), webdataset .tar shards (img2dataset: jpg/png + txt + json) or .parquet files (image bytes + caption columns)."
        ),
    ] = None,
    collection: Collection = None,
    profile: Profile = None,
    data_dir: DataDir = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per embedding forward and per database write.")] = 64,
    chroma_url: ChromaUrl = None,
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            max=8,
            help="Decode/preprocess worker processes (0: in the main process; 1 overlaps decoding with embedding).",
        ),
    ] = 1,
    image_column: Annotated[
        str | None, typer.Option(help="Parquet column with the image bytes (default: found by name and type).")
    ] = None,
    caption_column: Annotated[
        str | None, typer.Option(help="Parquet column with the caption (default: caption or text).")
    ] = None,
    follow_external_links: Annotated[
        bool,
        typer.Option(
            "--follow-external-links", help="Also index files that links in the folders point to outside them."
        ),
    ] = False,
    background: Annotated[
        str, typer.Option(help="Colour shown through transparent pixels (a name or #rrggbb).")
    ] = "white",
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Seconds to wait for another writer of the data folder's database before stopping "
            "(default: wait as long as it takes).",
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Rebuild a collection chromadb can no longer read from the folders it records (no SOURCES); "
            "it replaces the damaged one once complete.",
        ),
    ] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray", help="Index on Ray Data (a local runtime unless --ray-address) into the --chroma-url server."
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(help="The Ray cluster to index on ('auto', HOST:6379, ray://HOST:10001); implies --ray."),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option(min=1, help="Embedding actors with --ray (default: one per GPU of the cluster, else 1)."),
    ] = None,
    reference_cache: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the images taken from shards and parquet files (default DATA_DIR/references); on a "
            "cluster, a shared path every node and the searching machine see alike. Recorded in the collection."
        ),
    ] = None,
) -> None:
    """Embed images with the profile's CLIP and add them to a reference collection (incremental, resumable).

    Re-running skips what is indexed; after a crash or Ctrl-C it resumes where it stopped. Images from shards and
    parquet files are copied to DATA_DIR/references so the agent can open them later. One writer at a time per data
    folder: a second one waits for the first (or stops after --lock-timeout seconds). With --ray the same indexing
    runs on Ray Data into a Chroma server, with a per-source ledger (README: Indexing on a cluster).
    """
    from PIL import ImageColor
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    from imagerag.tools.backends.indexer import (
        IndexSummary,
        index_sources,
        open_sources,
        repair_collection,
        size_hint,
    )
    from imagerag.tools.backends.loading import load_embedder
    from imagerag.tools.backends.ray_indexer import RayIndexOptions, RayIndexSummary, ShardReport, index_on_ray
    from imagerag.tools.backends.sources import FolderSource, SourceError
    from imagerag.tools.backends.store import (
        ReferenceStore,
        StoreError,
        chroma_client,
        disk_full,
        disk_full_message,
        writer_lock,
    )
    from imagerag.tools.config import check_collection_name

    class ImagesPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:.1f} images/s" if task.speed else "", style="progress.data.speed")

    if repair == bool(sources):
        fail("pass the image folders, shards or parquet files to index, or --repair alone (it re-reads the "
             "folders the collection records)")  # fmt: skip
    on_ray = ray or ray_address is not None
    if on_ray and (repair or not chroma_url):
        fail("--ray indexes SOURCES into a Chroma server: pass --chroma-url http://HOST:8000 (start one with `chroma "
             "run --path DIR --host 0.0.0.0 --port 8000`), and no --repair")  # fmt: skip
    try:
        colour = ImageColor.getrgb(background)[:3]
    except ValueError:
        fail(f"--background {background!r} is not a colour: pass a name (white, black) or #rrggbb")
    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    name = settings.collection_name
    summary = RayIndexSummary() if on_ray else IndexSummary()
    columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(), TimeElapsedColumn())
    notes: list[str] = []
    try:
        check_collection_name(name)
        opened = [] if repair else open_sources(sources or [], image_column, caption_column, follow_external_links)
        if ray_address and reference_cache is None and not all(isinstance(s, FolderSource) for s in opened):
            fail("on a cluster, images from shards and parquet files are copied where every node and the searching "
                 "machine see them: pass --reference-cache on a shared filesystem")  # fmt: skip
        cache = reference_cache.resolve() if reference_cache else settings.data_dir / "references"
        with writer_lock(settings.data_dir, chroma_url, lock_timeout):  # before the database is opened
            client = chroma_client(settings.data_dir, chroma_url)
            embedder = load_embedder(settings)
            with Progress(*columns, console=err) as progress:
                task = progress.add_task("index", total=size_hint(opened) if opened else None)

                def advance(n: int) -> None:
                    progress.advance(task, n)

                if repair:
                    store, notes = repair_collection(
                        client, name, embedder, settings.data_dir, batch_size, workers, advance, summary, colour
                    )
                elif on_ray:
                    assert chroma_url is not None and isinstance(summary, RayIndexSummary)
                    store = ReferenceStore.open(client, name, embedder, create=True)
                    options = RayIndexOptions(
                        address=ray_address,
                        batch_size=batch_size,
                        embed_actors=ray_actors,
                        image_column=image_column,
                        caption_column=caption_column,
                        background=colour,
                    )

                    def shard_done(report: ShardReport) -> None:
                        counts = f"added {report.added}, skipped {report.skipped}, failed {report.failed}"
                        progress.console.print(plain(f"done: {report.uri}: {counts}"))

                    index_on_ray(store, opened, settings, chroma_url, cache, options, advance, shard_done, summary)
                else:
                    store = ReferenceStore.open(client, name, embedder, create=True)
                    index_sources(store, opened, batch_size, cache, workers, advance, summary, background=colour)
            held = store.count()
    except KeyboardInterrupt:
        err.print(plain(f"interrupted: {summary.line()}; run the same command again to resume"))
        raise typer.Exit(130) from None
    except (SourceError, StoreError) as error:
        fail(user_message(error))
    except Exception as error:  # a full disk surfaces from chromadb, safetensors, the lock file, ...
        if not disk_full(error):
            raise
        fail(disk_full_message(settings.data_dir, error, f"Kept: the {summary.added} image(s) added before it."))
    for note in notes:
        err.print(plain(f"note: {note}"))
    for failure in getattr(summary, "failures", []):
        err.print(plain(f"failed: {failure}"))
    done = "repaired: " if repair else ""
    err.print(plain(f"{done}{summary.line()}; collection {name!r} holds {held}"))


@app.command()
def search(
    caption: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1, help="Hits to return at most.")] = 5,
    min_similarity: Annotated[
        float | None,
        typer.Option(help="Drop hits below this cosine similarity (default: the profile's calibrated value)."),
    ] = None,
    mmr: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Diversify with maximal marginal relevance: 1 = by similarity only, 0 = by difference only.",
        ),
    ] = None,
    sheet: Annotated[
        bool,
        typer.Option("--sheet", help="Also write a contact sheet of the hits to ./<caption>.png (never overwriting)."),
    ] = False,
    sheet_to: Annotated[
        Path | None, typer.Option(help="Write the contact sheet to this PNG instead (implies --sheet).")
    ] = None,
    collection: Collection = None,
    profile: Profile = None,
    data_dir: DataDir = None,
    chroma_url: ChromaUrl = None,
) -> None:
    """Search a reference collection by caption: print the hits, and with --sheet a contact sheet of them."""
    from imagerag.tools.backends.loading import calibrated, load_embedder
    from imagerag.tools.backends.store import (
        ReferenceStore,
        chroma_client,
        contact_sheet,
        default_sheet_path,
    )

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    try:
        store = ReferenceStore.open(
            chroma_client(settings.data_dir, chroma_url), settings.collection_name, load_embedder(settings)
        )
        threshold = calibrated(settings).retrieval_min_similarity if min_similarity is None else min_similarity
        hits = store.search(caption, k, threshold, mmr_lambda=mmr)  # a damaged collection says so here
    except user_errors() as error:
        fail(user_message(error))
    table = Table(title=plain(f"{len(hits)} hit(s) for {caption!r} at similarity >= {threshold:.3f}"))
    for column in ("similarity", "caption", "source"):
        table.add_column(column)
    for hit in hits:
        table.add_row(*map(plain, (f"{hit.similarity:.3f}", hit.caption, hit.source)))
    stdout.print(table)
    if hits and (sheet or sheet_to):
        path = contact_sheet(hits, sheet_to or default_sheet_path(caption))
        err.print(plain(f"contact sheet: {path}"))


@app.command()
def calibrate(
    collection: Collection = None,
    profile: Profile = None,
    data_dir: DataDir = None,
    chroma_url: ChromaUrl = None,
    max_images: Annotated[int, typer.Option(min=4, help="Images of the collection used at most (two halves).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the split into halves.")] = 0,
) -> None:
    """Choose the judge and retrieval thresholds on a collection's own images and captions: chosen on one half
    (balanced accuracy of each image's caption against other captions), checked on the other; the profile then
    reads them for this collection. Corpus images stand in for generated ones."""
    from imagerag.tools.backends.calibration import calibrate as measure
    from imagerag.tools.backends.calibration import calibration_path, write_calibration
    from imagerag.tools.backends.loading import load_embedder
    from imagerag.tools.backends.store import ReferenceStore, chroma_client

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    try:
        client = chroma_client(settings.data_dir, chroma_url)
        store = ReferenceStore.open(client, settings.collection_name, load_embedder(settings))
        result = measure(store, seed=seed, max_images=max_images)
    except user_errors() as error:
        fail(user_message(error))
    path = write_calibration(result, calibration_path(settings.data_dir, settings.collection_name))
    table = Table(
        title=plain(f"calibration of {settings.collection_name!r} ({result.images_held_out} images held out)")
    )
    for column in ("threshold", "value", "balanced accuracy, chosen on", "balanced accuracy, held out"):
        table.add_column(column)
    for name, measured in (("judge", result.judge), ("retrieval minimum", result.retrieval)):
        row = (
            name,
            f"{measured.threshold:.4f}",
            f"{measured.balanced_accuracy_choosing:.3f}",
            f"{measured.balanced_accuracy_held_out:.3f}",
        )
        table.add_row(*map(plain, row))
    stdout.print(table)
    err.print(plain(f"written to {path}; the {settings.profile} profile reads it for this collection"))


@app.command()
def profiles(data_dir: DataDir = None) -> None:
    """Each profile's generator: where its weights are, parameters per component, and their memory in the profile's
    dtype (read from the safetensors headers of local or cached weights; nothing is downloaded)."""
    from imagerag.tools.backends.loading import profile_footprint
    from imagerag.tools.config import PROFILES

    base = make_settings(data_dir=data_dir)
    table = Table(title=plain("profiles (weights memory on a GPU; a CPU runs float32; activations come on top)"))
    for column in ("profile", "generator", "weights", "parameters", "dtype", "weights memory", "components"):
        table.add_column(column)
    for name, profile in PROFILES.items():
        size = profile_footprint(base.model_copy(update={"profile": name}))
        found = size.weights is not None
        parts = ", ".join(f"{c.name} {c.parameters / 1e6:.1f}M" for c in size.components)
        row = (
            name,
            profile.generator.model_id,
            "local or cached" if found else "not here (downloaded on first use)",
            f"{size.parameters / 1e6:,.1f}M" if found else "",
            size.dtype,
            f"{size.weight_bytes / 2**30:.2f} GiB" if found else "",
            parts,
        )
        table.add_row(*map(plain, row))
    stdout.print(table)


eval_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(eval_app, name="eval")


@eval_app.command("miniworld")
def eval_miniworld(
    split: Annotated[
        str, typer.Option(help="The world's prompt split: dev (to choose settings) or test (to report).")
    ] = "test",
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="A JSONL file of your own prompts instead of a split (schema: PromptSpec in evals/miniworld/grammar.py)."
        ),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated generator seeds; every condition runs on each.")
    ] = "0,1,2",
    images: Annotated[int, typer.Option(min=2, help="The loop's image budget, and N of best-of-N.")] = 4,
    conditions: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of text_alone,best_of_n,best_of_time,one_pass,loop,loop_edits,"
            "loop_edits_one_ref,loop_edits_no_retrieval (default: all)."
        ),
    ] = None,
    time_matched_n: Annotated[
        int | None,
        typer.Option(
            min=1, help="best_of_time's images (default 6: matches loop_edits' seconds on version 2's dev timings)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts (a quick look).")] = None,
    data_dir: DataDir = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of results.jsonl (resumed when it exists) and summary.md (default: evals/results/miniworld-SPLIT)."
        ),
    ] = None,
) -> None:
    """The loop against text alone, compute-matched best-of-N and the paper's one pass on the miniature world, judged
    by its oracle. Appends each result as it finishes; rerun the same command to resume."""
    from imagerag.evals.miniworld.benchmark import PROMPTS_DIR, evaluate, load_prompts, markdown

    if split not in ("dev", "test"):
        raise typer.BadParameter(f"unknown split {split!r}: use dev or test", param_hint="--split")
    source = prompts or PROMPTS_DIR / f"{split}.jsonl"
    try:
        specs = load_prompts(source)
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except (OSError, ValueError) as e:
        err.print(plain(f"error: {e}"))
        raise typer.Exit(2) from e
    folder = out or Path("evals/results") / f"miniworld-{prompts.stem if prompts else split}"
    names = [c.strip() for c in conditions.split(",")] if conditions else None
    report = evaluate(
        specs if limit is None else specs[:: max(1, len(specs) // limit)][:limit],  # keeps the mix of k and rare
        folder,
        data_dir,
        seeds=seed_list,
        images=images,
        names=names,
        time_matched_n=time_matched_n,
        on_outcome=lambda o: err.print(
            plain(f"{o.condition} {o.prompt_id} seed {o.seed}: {'all right' if o.all_right else 'not all right'}")
        ),
    )
    typer.echo(markdown(report))
    err.print(plain(f"written to {folder / 'summary.md'}"))


@eval_app.command("conversations")
def eval_conversations(
    split: Annotated[
        str,
        typer.Option(
            help="The conversation split: dev (every choice is made there) or test (sealed: run once to report)."
        ),
    ] = "dev",
    file: Annotated[
        Path | None,
        typer.Option(
            help="A JSONL file of your own conversations instead of a split (schema: Conversation in "
            "evals/miniworld/conversation_grammar.py)."
        ),
    ] = None,
    seeds: Annotated[
        str,
        typer.Option(help="Comma-separated benchmark seeds (generator seed = seed x 1000); every condition runs each."),
    ] = "0,1,2",
    conversations: Annotated[
        int | None, typer.Option(min=1, help="Only N conversations, spread over the instruction kinds (a quick look).")
    ] = None,
    conditions: Annotated[
        str | None, typer.Option(help="Comma-separated subset of thread,restated,thread_no_edits (default: all).")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Image budget of each turn (rounds and images).")] = 4,
    data_dir: DataDir = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder of results.jsonl (resumed when it exists), summary.json and summary.md "
            "(default: evals/results/conversations-SPLIT, or conversations-STEM of --file)."
        ),
    ] = None,
) -> None:
    """Multi-turn refinement on the miniature world: a thread message by message against one run of the whole
    request restated, judged by the oracle after every turn. Appends each conversation as it finishes; rerun the same
    command to resume."""
    from imagerag.evals.miniworld.conversation_grammar import load_conversations, split_path
    from imagerag.evals.miniworld.conversations import evaluate_conversations, markdown

    if split not in ("dev", "test"):
        raise typer.BadParameter(f"unknown split {split!r}: use dev or test", param_hint="--split")
    try:
        specs = load_conversations(file or split_path(split))
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except (OSError, ValueError) as e:
        fail(str(e))
    if conversations is not None:  # every kind in turn, so a quick look keeps the mix
        by_kind: dict[str, list] = {}
        for c in specs:
            by_kind.setdefault(c.kind, []).append(c)
        rounds = [c for i in range(max(map(len, by_kind.values()))) for cs in by_kind.values() for c in cs[i : i + 1]]
        specs = rounds[:conversations]
    folder = out or Path("evals/results") / f"conversations-{file.stem if file else split}"
    names = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    try:
        report = evaluate_conversations(
            specs,
            folder,
            data_dir,
            seeds=seed_list,
            images=images,
            names=names,
            on_outcome=lambda o: err.print(
                plain(
                    f"{o.condition} {o.conversation_id} seed {o.seed}: "
                    f"{sum(t.all_right for t in o.turns)}/{len(o.turns)} turns all right, "
                    f"final {'all right' if o.final_all_right else 'not all right'} ({o.seconds:.0f} s)"
                )
            ),
        )
    except ValueError as e:
        fail(str(e))
    typer.echo(markdown(report))
    err.print(plain(f"written to {folder / 'summary.md'}"))


@eval_app.command("paper")
def eval_paper(
    imagenet: Annotated[
        Path | None, typer.Option(help="ImageNet root: train/<wnid>/, val/<wnid>/, LOC_synset_mapping.txt.")
    ] = None,
    cub: Annotated[
        Path | None, typer.Option(help="CUB_200_2011 root: images/, classes.txt, train_test_split.txt, ...")
    ] = None,
    inaturalist: Annotated[
        Path | None, typer.Option(help="iNaturalist 2021 root: train/ (or train_mini/) and val/.")
    ] = None,
    classes: Annotated[int | None, typer.Option(min=1, help="Classes per dataset (default: the paper's).")] = None,
    images_per_class: Annotated[int | None, typer.Option(min=1, help="Real test images per class.")] = None,
    train_images_per_class: Annotated[
        int | None, typer.Option(min=1, help="Training images per class in the retrieval collection (default: all).")
    ] = None,
    dsg_prompts: Annotated[Path | None, typer.Option(help="JSONL of long prompts for the DSG score.")] = None,
    dsg_model: Annotated[str | None, typer.Option(help="VLM for DSG questions and answers (default: the LLM).")] = None,
    dsg_base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint of --dsg-model.")] = None,
    tiny_metrics: Annotated[
        bool, typer.Option("--tiny-metrics", help="Random tiny stand-ins of CLIP, SigLIP and DINO (plumbing only).")
    ] = False,
    profile: Profile = None,
    policy: Annotated[str | None, typer.Option(help="imagerag or agent.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="The loop's round budget.")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed of every generation.")] = None,
    data_dir: DataDir = None,
    workers: Annotated[int, typer.Option(min=0, max=8, help="Decode workers while indexing the training images.")] = 1,
    out: Annotated[Path, typer.Option(help="Results folder (a rerun resumes it).")] = Path("evals/results/paper"),
) -> None:
    """The ImageRAG paper's protocol: class prompts of ImageNet, CUB and iNaturalist scored by CLIP, SigLIP and
    DINO against real images of the class, text alone vs the loop; a DSG score for long prompts."""
    from imagerag.evals.paper import MetricModels, PaperOptions, evaluate_paper, markdown
    from imagerag.tools.config import LLMSettings

    settings = make_settings(
        budget={"max_rounds": max_rounds}, profile=profile, policy=policy, seed=seed, data_dir=data_dir
    )
    roots: dict[str, Path | None] = {"imagenet": imagenet, "cub": cub, "inaturalist": inaturalist}
    try:
        options = PaperOptions.model_validate(
            {
                "datasets": {kind: root for kind, root in roots.items() if root},
                "classes": classes,
                "images_per_class": images_per_class,
                "train_images_per_class": train_images_per_class,
                "metrics": MetricModels.tiny() if tiny_metrics else MetricModels(),
                "dsg_prompts": dsg_prompts,
                "dsg_llm": LLMSettings(model=dsg_model, base_url=dsg_base_url) if dsg_model else None,
                "index_workers": workers,
            }
        )
        report = evaluate_paper(settings, options, out, on_progress=lambda line: err.print(plain(line)))
    except user_errors() as error:
        fail(user_message(error))
    typer.echo(markdown(report))
    err.print(plain(f"written to {out / 'paper.json'} and {out / 'paper.md'}"))


serve_app = typer.Typer(no_args_is_help=True, help="Serve the loop to larger assistants.")
app.add_typer(serve_app, name="serve")


@serve_app.command("mcp")
def serve_mcp(
    profile: Profile = None,
    collection: Collection = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="Folder that receives run folders (default: DATA_DIR/runs).")] = None,
    http: Annotated[
        bool, typer.Option("--http", help="Streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
    ] = False,
    host: Annotated[
        str, typer.Option(help="With --http: the address to bind (loopback unless told otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="With --http: the port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="IMAGERAG_MCP_TOKEN",
            help="With --http: the bearer token every request must carry (required off loopback; prefer the "
            "environment variable, a flag shows in `ps`).",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="With --http: another name the server is reached by (Host/Origin checks); repeatable."),
    ] = None,
) -> None:
    """An MCP server with the tools generate_image, refine_image and search_references (stdio by default)."""
    from imagerag.agent.mcp_server import serve_mcp as serve
    from imagerag.tools.errors import ConfigError

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    if out is not None:
        from imagerag.agent.runfolder import RunError, check_out_dir

        try:
            check_out_dir(out)
        except RunError as error:
            fail(user_message(error))
    if http:
        err.print(plain(f"MCP over streamable HTTP at http://{host}:{port}/mcp (profile {settings.profile})"))
    try:
        serve(settings, out, http=http, host=host, port=port, token=token, allowed_hosts=allowed_host)
    except ConfigError as error:  # no token on a network address, a bad token or allowed host: before any bind
        fail(user_message(error))


@serve_app.command("web")
def serve_web(
    profile: Profile = None,
    collection: Collection = None,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder that receives the threads' folders (as `imagerag chat`).")] = Path(
        "runs"
    ),
    host: Annotated[str, typer.Option(help="The address to bind (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port.")] = 7860,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="IMAGERAG_WEB_TOKEN",
            help="The token the page needs (required off loopback); open the URL with ?token=... once, a cookie "
            "keeps it. Prefer the environment variable: a flag shows in `ps`.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another name the page is reached by (Host/Origin checks); repeatable."),
    ] = None,
) -> None:
    """A chat page: converse with the loop, watch each round arrive, correct the object list by hand."""
    from imagerag.agent.runfolder import RunError, check_out_dir
    from imagerag.agent.web import serve_web as serve
    from imagerag.tools.errors import ConfigError

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    try:
        check_out_dir(out)
        serve(
            settings,
            out,
            host=host,
            port=port,
            token=token,
            allowed_hosts=allowed_host or (),
            on_ready=lambda url: err.print(plain(f"chat page at {url} (profile {settings.profile}); Ctrl-C stops it")),
        )
    except (ConfigError, RunError) as error:  # no token off loopback, a bad token or host: before any bind
        fail(user_message(error))


def main() -> None:
    import warnings

    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Library chatter (load bars, deprecation notes) would bury our own progress; errors still show. Set through
    # the libraries' environment variables, so that nothing heavy is imported before a command needs it.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
