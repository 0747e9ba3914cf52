"""Run a prompt through a policy, continue a thread, resume a killed or paused run; stream typed events.

A run lives in its own folder (agent.runfolder) and in the checkpointer under its thread id (the folder's name),
checkpointed after every node. So a run killed at any point resumes from its last checkpoint without regenerating
finished images, a thread's next message continues from its best image, and a run paused for review continues
with a person's decision.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command
from pydantic import ValidationError

from imagerag.agent import runfolder
from imagerag.agent.checkpoints import data_folder, open_checkpointer, thread_lock
from imagerag.agent.config import Settings
from imagerag.agent.events import (
    BudgetLeft,
    DiffusionStep,
    Edited,
    Finished,
    NodeFinished,
    NodeStarted,
    RetrievalHits,
    ReviewRequested,
    RunEvent,
    Verdicts,
)
from imagerag.agent.result import RunResult
from imagerag.agent.runfolder import RunError
from imagerag.graphs import build_graph
from imagerag.graphs.context import RunContext, register_backends
from imagerag.graphs.nodes import ReviewDecision, ReviewRequest, finish, review_uploads
from imagerag.graphs.state import THREAD_PATTERN, AgentState, Budget, RunInput, RunOutput, RunState, Turn, Usage
from imagerag.tools.backends.store import disk_full
from imagerag.tools.files import RunFolder, content_id
from imagerag.tools.toolkit import Backends, check_image

Reviewer = Callable[[ReviewRequest], ReviewDecision]
log = logging.getLogger(__name__)
# A run a person stopped (agent.web's stop button): it ends like a spent budget, with the best image so far, under
# a stop reason of its own (the agent policy's own early end is status `stopped`, reason `stopped_by_policy`).
STOPPED_BY_PERSON = "stopped_by_person"
__all__ = [
    "STOPPED_BY_PERSON",
    "RunError",
    "checked_decision",
    "delete_thread",
    "drive",
    "history",
    "prepare",
    "resume",
    "run",
    "stream",
    "thread_settings",
    "thread_state",
]


def stream(
    message: str,
    settings: Settings,
    out: Path = Path("runs"),
    thread: str | None = None,
    backends: Backends | None = None,
    from_turn: int | None = None,
    stop: threading.Event | None = None,
) -> Iterator[RunEvent]:
    """Start a run of `message`, or, when `thread` exists, continue it with `message` as a refinement (from its
    last turn, or from turn `from_turn`: a branch). Once `stop` is set, the run ends after the node that is running,
    with the best image so far (stop reason STOPPED_BY_PERSON).

    Yields typed events; the last one is Finished (with the RunResult) or ReviewRequested (paused). The thread is
    locked for one writer until that last event, which comes once the lock is released: a caller may resume the
    paused run from it without closing this stream first.
    """
    # An unknown profile, or the agent policy without an LLM, fails before anything else.
    settings.check(has_llm=None if backends is None else backends.llm is not None)
    graph_input = _input(message, settings, from_turn)
    if thread is not None and not re.fullmatch(THREAD_PATTERN, thread):
        raise RunError(f"invalid thread name {thread!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    run_dir = Path(out) / thread if thread else runfolder.new_run_dir(Path(out), message)
    # Locked before the thread is read: two messages at once would both continue the same turn, and two new runs
    # of one new thread would both try to create its folder.
    with open_checkpointer(settings) as saver, thread_lock(settings, run_dir.name):
        existing = _thread_values(saver, thread) if thread else None
        if thread and existing:
            run_dir = _recorded_folder(thread, existing)
            if existing.get("status") == "running":  # crashed, failed or paused for review
                raise RunError(
                    f"thread {thread!r} has an unfinished run: continue it with `imagerag resume {thread}` first"
                )
            settings = settings.with_recipe(runfolder.read_recipe(run_dir))
            graph_input = _input(message, settings, from_turn)
        else:
            if from_turn is not None:
                raise RunError(f"--from-turn {from_turn} continues a thread, and there is no thread {thread!r} yet")
            runfolder.check_out_dir(Path(out))  # before loading models, which can take minutes
            if run_dir.exists():
                raise RunError(f"{run_dir} exists and is not a thread here: choose another --thread or --out")
        backends = backends or prepare(settings)  # a missing collection or model fails before the folder exists
        if not existing:
            runfolder.create(run_dir, settings)
        final = yield from _drive(saver, settings, backends, run_dir, graph_input, stop)
    yield final


def resume(
    run: str | Path,
    decision: ReviewDecision | dict[str, Any] | None = None,
    settings: Settings | None = None,
    backends: Backends | None = None,
    stop: threading.Event | None = None,
) -> Iterator[RunEvent]:
    """Continue a run folder (or a thread id) from its last checkpoint: after a crash, or a review pause with
    `decision` (or, with `stop` set, end a paused run as stopped). Finished images are not regenerated; the time budget counts only time spent running. Where data
    lives comes from `settings` (default: the environment's), never from the run folder. Like stream, it holds
    the thread until its last event."""
    base = settings or Settings()
    # Checked before the checkpoint is opened: LangGraph stores an answer before the graph reads it, so a bad one
    # would stay and fail every later resume.
    answer = None if decision is None else checked_decision(decision)
    with open_checkpointer(base) as saver:
        run_dir = Path(run) if Path(run).is_dir() else None
        if run_dir is not None:  # a folder is resumed only where its checkpoint says its images are
            recorded = (_thread_values(saver, run_dir.name) or {}).get("run_dir")
            if recorded and Path(recorded).resolve() != run_dir.resolve():
                raise RunError(
                    f"{run_dir} is not the folder its run recorded ({recorded}): a copy, perhaps; resume {recorded} "
                    f"or the thread {run_dir.name!r}"
                )
        if run_dir is None:
            values = _thread_values(saver, str(run))
            if not values:
                raise RunError(f"no run folder or thread {str(run)!r}: pass a run folder path or a --thread name")
            run_dir = _recorded_folder(str(run), values)
        with thread_lock(base, run_dir.name):
            settings = base.with_recipe(runfolder.read_recipe(run_dir))
            graph, config = _compile(saver, settings, run_dir)
            snapshot = graph.get_state(config)
            backends = backends or prepare(settings)
            if not snapshot.values:
                raise RunError(f"no checkpoint for {run_dir.name!r} in {settings.data_dir}: it cannot be resumed")
            if not snapshot.tasks:  # (a node that finished just before a crash has a task with its result pending)
                raise RunError(
                    f"run {run_dir.name!r} already ended ({snapshot.values.get('status')}); send a new message to its thread instead"
                )
            paused = any(task.interrupts for task in snapshot.tasks)
            if paused and answer is None and not (stop is not None and stop.is_set()):
                raise RunError(
                    f"run {run_dir.name!r} waits for a review: resume it with a decision (accept, drop or replace)"
                )
            usage = Usage.model_validate(snapshot.values.get("usage") or {})
            # The clock restarts where it stopped: downtime and a person's thinking do not spend the time budget.
            clock = {"started_at": time.time() - usage.seconds}
            command: Command[Any] | None = None
            if answer is not None and paused:
                command = Command(resume=answer.model_dump(), update=clock)
            elif (
                not paused or stop is None or not stop.is_set()
            ):  # (a stopped pause keeps its interrupt: _drive ends it)
                graph.update_state(config, clock)
            final = yield from _drive(saver, settings, backends, run_dir, command, stop)
    yield final


def checked_decision(decision: ReviewDecision | dict[str, Any]) -> ReviewDecision:
    """A review decision as the graph takes it, checked: replacement files of a local caller must be images PIL
    opens within the pixel limit, and are sent as their bytes (the graph reads no path); RunError naming the bad
    path or upload otherwise."""
    try:
        answer = ReviewDecision.model_validate(decision)
    except ValidationError as error:
        raise RunError(f"invalid review decision: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if answer.images:
        answer = answer.model_copy(
            update={
                "images": [],
                "uploads": [*answer.uploads, *map(_upload, answer.images)],
                "caption": answer.caption or ", ".join(Path(image).stem for image in answer.images),
            }
        )
    try:
        review_uploads(answer)
    except ValueError as error:
        raise RunError(f"invalid review decision: {error}") from None
    return answer


def _upload(image: str) -> str:
    """The base64 bytes of a local reference image, once it is known to be one (read only then: a path can name
    anything, a device or a huge file)."""
    path = Path(image)
    try:
        if not path.is_file():
            raise ValueError(f"{image} is {'not a file' if path.exists() else 'missing'}: replace with image files")
        check_image(path, image)
    except ValueError as error:
        raise RunError(f"review: {error}") from None
    return base64.b64encode(path.read_bytes()).decode("ascii")


def run(
    message: str,
    settings: Settings,
    out: Path = Path("runs"),
    thread: str | None = None,
    backends: Backends | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    reviewer: Reviewer | None = None,
    from_turn: int | None = None,
) -> RunResult:
    """Run to the end and return the result. With `settings.review`, `reviewer` answers each pause."""
    events = stream(message, settings, out, thread, backends, from_turn)
    return drive(events, settings, backends, on_event, reviewer)


def drive(
    events: Iterator[RunEvent],
    settings: Settings,
    backends: Backends | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    reviewer: Reviewer | None = None,
) -> RunResult:
    """The one loop every front end runs a stream with (run, the CLI, the assistant): hand each event to
    `on_event`, answer each review pause with `reviewer` and resume the run, and return the result."""
    while True:
        for event in events:
            if on_event:
                on_event(event)
            if isinstance(event, Finished):
                return event.result
            if isinstance(event, ReviewRequested):
                if reviewer is None:
                    raise RunError("the run paused for review but no reviewer was given: pass reviewer=, or stream()")
                decision = reviewer(ReviewRequest.model_validate(event.request))
                events = resume(event.run_dir, decision, settings, backends=backends)
                break
        else:
            raise RunError("the run ended without a result")


def thread_settings(thread: str | None, settings: Settings) -> Settings:
    """The settings a message to `thread` runs with: the thread's recorded recipe (profile, policy, collection, ...)
    over `settings` when the thread exists (a thread always draws as it started), else `settings`."""
    if thread is None or not re.fullmatch(THREAD_PATTERN, thread):
        return settings
    with open_checkpointer(settings) as saver:
        values = _thread_values(saver, thread)
    if not values:
        return settings
    return settings.with_recipe(runfolder.read_recipe(_recorded_folder(thread, values)))


def thread_state(thread: str, settings: Settings) -> RunState | None:
    """A thread's state as its last checkpoint holds it, a run in progress included (a reader never waits for the
    writer); None for an unknown thread. For a page that shows each round as it comes."""
    with open_checkpointer(settings) as saver:
        values = _thread_values(saver, thread)
    if not values or values.get("status") == "unreadable":
        return None
    return (AgentState if settings.policy == "agent" else RunState).model_validate(values)


def history(thread: str, settings: Settings) -> list[Turn]:
    with open_checkpointer(settings) as saver:
        values = _thread_values(saver, thread)
    if not values:
        raise RunError(f"no thread {thread!r} in {settings.data_dir}")
    return [Turn.model_validate(t) for t in values.get("turns", [])]


def delete_thread(thread: str, settings: Settings, remove_folder: bool = False) -> Path | None:
    """Remove a thread's checkpoints and, with `remove_folder`, its run folder; return the folder removed, if any.

    Only a run folder is removed: the directory the checkpoint recorded (never a link), named after the thread and
    holding settings.json. Anything else is refused before the checkpoints go, so nothing is half deleted."""
    with open_checkpointer(settings) as saver, thread_lock(settings, thread):
        try:
            found = saver.get_tuple({"configurable": {"thread_id": thread}})
        except Exception:  # noqa: BLE001 - a checkpoint this version cannot read is deleted all the same
            exists, recorded = True, None
        else:
            exists = found is not None
            recorded = found.checkpoint["channel_values"].get("run_dir") if found else None
        if not exists:
            raise RunError(f"no thread {thread!r} in {settings.data_dir}: `imagerag history NAME` shows a thread")
        folder = _removable_folder(thread, Path(recorded)) if remove_folder and recorded else None
        saver.delete_thread(thread)
    if folder is not None:
        try:
            shutil.rmtree(folder)
        except OSError as error:
            raise RunError(
                f"thread {thread!r} is deleted but its folder {folder} could not be removed ({error}): remove it by hand"
            ) from None
    return folder


def _removable_folder(thread: str, folder: Path) -> Path | None:
    """`folder` if it is thread's run folder, None if it is gone already; RunError for anything else."""
    if not os.path.lexists(folder):
        return None
    settings_file = RunFolder(folder).settings
    if (
        folder.is_symlink()
        or not folder.is_dir()
        # A thread's folder is named by its id (hashed when the id is not a plain name: graphs.context.run_dir_of).
        or folder.name not in (thread, content_id(thread.encode()))
        or settings_file.is_symlink()
        or not settings_file.is_file()
    ):
        raise RunError(
            f"refusing to remove {folder}: it is not the run folder of thread {thread!r} (a folder of that name with "
            f"{RunFolder.SETTINGS}); nothing was deleted: delete the thread without its folder"
        )
    return folder


def _recorded_folder(thread: str, values: dict[str, Any]) -> Path:
    """The run folder a thread's checkpoint recorded, when it is still a run folder."""
    recorded = values.get("run_dir")
    if not recorded or not RunFolder(Path(recorded)).settings.is_file():
        raise RunError(
            f"thread {thread!r} has lost its run folder ({recorded or 'none recorded'}): delete the thread with "
            f"`imagerag thread delete {thread}` and start it again"
        )
    return Path(recorded)


def _input(message: str, settings: Settings, from_turn: int | None = None) -> dict[str, Any]:
    try:
        return RunInput(
            message=message, seed=settings.seed, budget=settings.budget, review=settings.review, from_turn=from_turn
        ).model_dump()
    except ValidationError as error:
        raise RunError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None


def _thread_values(saver: BaseCheckpointSaver, thread: str) -> dict[str, Any] | None:
    values: dict[str, Any] | None
    try:
        found = saver.get_tuple({"configurable": {"thread_id": thread}})
    except Exception:  # noqa: BLE001 - a checkpoint holding types this version does not know; answered below
        values = {"status": "unreadable"}
    else:
        values = dict(found.checkpoint["channel_values"]) if found else None
    if values is not None and "message" not in values:
        raise RunError(
            f"thread {thread!r} was written by an earlier version of imagerag-agent (before 0.2), whose checkpoints "
            "this version cannot continue: its run folder stays readable; start a new thread"
        )
    return values


def _compile(
    saver: BaseCheckpointSaver, settings: Settings, run_dir: Path
) -> tuple[CompiledStateGraph[Any, RunContext, RunInput, RunOutput], RunnableConfig]:
    graph = build_graph(settings.policy).compile(checkpointer=saver)
    return graph, {"configurable": {"thread_id": run_dir.name}, "recursion_limit": 10 * settings.budget.max_rounds + 50}


def _drive(
    saver: BaseCheckpointSaver,
    settings: Settings,
    backends: Backends,
    run_dir: Path,
    graph_input: Any,
    stop: threading.Event | None = None,
) -> Generator[RunEvent, None, RunEvent]:
    """Stream the graph, translate its chunks to events, and write run.json and report.html at the end; return the
    last event (Finished, or ReviewRequested) for the caller to yield once it has let go of the thread."""
    graph, config = _compile(saver, settings, run_dir)
    context = settings.context().model_copy(
        update={"runs_dir": run_dir.parent, "backends_id": register_backends(backends)}
    )
    started, error = time.time(), None
    announced: set[tuple[str, int, int]] = set()
    stopping = stop is not None and stop.is_set() and any(t.interrupts for t in graph.get_state(config).tasks)
    try:
        parts = cast(
            Generator[Any, None, None],
            graph.stream(
                graph_input, config, context=context, stream_mode=["tasks", "updates", "custom"], version="v2"
            ),
        )
        planned = False
        try:
            for part in () if stopping else parts:
                if part["type"] == "tasks" and "input" in part["data"]:
                    # A stop is taken where the next node would start: the last one's checkpoint is written by
                    # then, and this turn's plan has run.
                    if planned and stop is not None and stop.is_set():
                        stopping = True
                        break
                    yield NodeStarted(node=part["data"]["name"])
                elif part["type"] == "custom":
                    yield from _custom_events(part["data"])
                elif part["type"] == "updates":
                    yield from _update_events(part["data"], settings.budget, announced)
                    planned = True
        finally:
            parts.close()
    except Exception as exc:  # noqa: BLE001 - any failure ends the run cleanly; the checkpoint keeps its work
        error = _full_disk(run_dir, exc) if disk_full(exc) else f"{exc.__class__.__name__}: {exc}"
    if stopping and error is None:
        _end_stopped(graph, config, settings)
    snapshot = graph.get_state(config)
    state = (AgentState if settings.policy == "agent" else RunState).model_validate(snapshot.values)
    pending = [i.value for task in snapshot.tasks for i in task.interrupts]
    # Failed and paused are written to run.json only: the checkpoint stays at the last good node, so
    # `resume` re-runs the failed node or answers the pending review.
    if error:
        state = state.model_copy(update={"status": "failed", "stop_reason": "failed", "error": error})
    elif pending:
        state = state.model_copy(update={"status": "paused", "stop_reason": "review"})
    result = RunResult.of(state, run_dir, settings.policy, settings.profile, time.time() - started)
    try:
        runfolder.write_outputs(result)
    except OSError as exc:
        if not disk_full(exc):
            raise
        raise RunError(_full_disk(run_dir, exc)) from None
    return (
        ReviewRequested(run_dir=str(run_dir), request=pending[0]) if pending and not error else Finished(result=result)
    )


def _end_stopped(graph: CompiledStateGraph[Any, Any, Any, Any], config: RunnableConfig, settings: Settings) -> None:
    """End a run a person stopped as the graph's own finish would, under STOPPED_BY_PERSON: the turn is recorded
    with the best image so far, and the thread takes its next message as after any finished turn."""
    snapshot = graph.get_state(config)
    if not snapshot.next:  # it ended on its own meanwhile
        return
    state = (AgentState if settings.policy == "agent" else RunState).model_validate(snapshot.values)
    ended = finish(state)
    status, reason = "budget_exhausted", STOPPED_BY_PERSON
    turns = [turn.model_copy(update={"status": status, "stop_reason": reason}) for turn in ended["turns"]]
    steps = [
        step.model_copy(update={"summary": f"{reason}; {step.summary.partition('; ')[2]}"}) for step in ended["steps"]
    ]
    graph.update_state(
        config, ended | {"status": status, "stop_reason": reason, "turns": turns, "steps": steps}, as_node="finish"
    )


def _full_disk(run_dir: Path, error: BaseException) -> str:
    return (
        f"the disk holding {run_dir} is full ({str(error)[:200]}): every image and step finished so far is kept in the "
        f"run folder and its checkpoint; free space on that disk, then `imagerag resume {run_dir}` goes on from there"
    )


def prepare(settings: Settings, on_progress: Callable[[str, int, int | None], None] | None = None) -> Backends:
    """The backends a run of `settings` uses, loaded once per process. A local profile (mini, tiny) builds its
    reference collection on first use, reporting (stage, done, total); a Hub profile fails fast, with the fix,
    when its weights cannot be had, and warns that a CPU takes minutes per image."""
    from imagerag.tools.backends.diffusion import pick_device
    from imagerag.tools.backends.hub import require_weights
    from imagerag.tools.backends.loading import load_backends, open_store

    profile = settings.resolved_profile()
    data_folder(settings)  # models are built and collections kept there: a path that cannot be one fails first
    if profile.local:
        open_store(settings, on_progress)
    else:
        require_weights(profile)
        if pick_device(settings.device) == "cpu":
            log.warning(
                "no GPU found: each image of the %s profile will take minutes on the CPU (try --profile mini for "
                "the offline demo, or set IMAGERAG_DEVICE)",
                profile.name,
            )
    return load_backends(settings)


def _custom_events(data: dict[str, Any]) -> Iterator[RunEvent]:
    """Events that the tools sent through LangGraph's stream writer (tools.toolkit)."""
    if data.get("event") == "diffusion_step":
        yield DiffusionStep(step=data["step"], total=data["total"])
    elif data.get("event") == "retrieved":
        yield RetrievalHits(captions=data.get("captions") or [data.get("caption", "")], hits=data["hits"])


def _update_events(updates: dict[str, Any], budget: Budget, announced: set[tuple[str, int, int]]) -> Iterator[RunEvent]:
    """A node finished: its steps, the verdicts on images judged for the first time, the budget left."""
    for node, update in updates.items():
        if node == "__interrupt__" or not isinstance(update, dict):
            continue
        yield NodeFinished(node=node, steps=update.get("steps", []))
        for candidate in update.get("candidates", []):
            if candidate.edit is not None and (candidate.image_id, candidate.turn, -1) not in announced:
                announced.add((candidate.image_id, candidate.turn, -1))
                yield Edited(image_id=candidate.image_id, edit=candidate.edit)
            key = (candidate.image_id, candidate.turn, len(candidate.verdicts))
            if candidate.judged and key not in announced:
                announced.add(key)
                yield Verdicts(image_id=candidate.image_id, verdicts=candidate.verdicts)
        if "usage" in update:
            used = update["usage"]
            yield BudgetLeft(
                rounds=budget.max_rounds - used.rounds,
                generations=budget.max_generations - used.generations,
                seconds=None if budget.max_seconds is None else budget.max_seconds - used.seconds,
                tokens=None if budget.max_tokens is None else budget.max_tokens - used.llm_tokens,
            )
