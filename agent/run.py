"""Run a prompt through a policy, continue a thread, resume a killed or paused run; stream typed events.

A run lives in its own folder (images/, settings.json, run.json, report.html) and in the checkpointer under its
thread id (the folder's name), checkpointed after every node. So a run killed at any point resumes from its last
checkpoint without regenerating finished images, a thread's next message continues from its best image, and a
run paused for review continues with a person's decision. Nothing is overwritten: each new run gets a new folder;
a thread keeps its folder and adds to it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from langgraph.types import Command
from pydantic import BaseModel, ValidationError

from agent.config import Settings
from agent.events import BudgetLeft, DiffusionStep, Finished, NodeFinished, NodeStarted, RetrievalHits, ReviewRequested, RunEvent, Verdicts
from agent.persistence import open_checkpointer
from agent.state import THREAD_PATTERN, AgentState, Budget, Candidate, Concept, RunInput, RunState, RunStatus, Step, Turn, Usage
from graphs import build_graph
from graphs.common import ReviewDecision, ReviewRequest
from tools.backends.images import ImageStore
from tools.toolkit import Backends, Toolkit

IMAGES = "images"
SETTINGS_FILE = "settings.json"
Reviewer = Callable[[ReviewRequest], ReviewDecision]


class RunError(ValueError):
    """Input that cannot start or continue a run; the message names the problem and the fix."""


class RunResult(BaseModel):
    run_id: str
    thread: str
    run_dir: str
    status: RunStatus
    stop_reason: str
    error: str | None
    prompt: str
    policy: str
    profile: str
    turn: int
    best_image: str | None
    best: Candidate | None
    concepts: list[Concept]
    candidates: list[Candidate]
    rounds: int
    generations: int
    usage: Usage
    budget: Budget
    elapsed: float
    steps: list[Step]
    turns: list[Turn]


def stream(
    message: str,
    settings: Settings,
    out: Path = Path("runs"),
    thread: str | None = None,
    backends: Backends | None = None,
) -> Iterator[RunEvent]:
    """Start a run of `message`, or, when `thread` exists, continue it with `message` as a refinement.

    Yields typed events; the last one is Finished (with the RunResult) or ReviewRequested (paused).
    """
    try:
        RunInput(prompt=message)
    except ValidationError as error:
        raise RunError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None
    settings.resolved_profile()  # an unknown profile fails before anything else
    if thread is not None and not re.fullmatch(THREAD_PATTERN, thread):
        raise RunError(f"invalid thread name {thread!r}: use letters, digits, '.', '_' or '-' (at most 100)")
    with open_checkpointer(settings) as saver:
        existing = _thread_values(saver, thread) if thread else None
        if existing:
            state_cls = AgentState if "messages" in existing else RunState
            previous = state_cls.model_validate(existing)
            if previous.status == "running":  # crashed, failed or paused for review
                raise RunError(f"thread {thread!r} has an unfinished run: continue it with `imagerag resume {thread}` first")
            run_dir = Path(existing["run_dir"])
            settings = _load_settings(run_dir).model_copy(update={"budget": settings.budget, "review": settings.review})
        else:
            check_out_dir(Path(out))  # before loading models, which can take minutes
            run_dir = Path(out) / thread if thread else new_run_dir(Path(out), message)
            if run_dir.exists():
                raise RunError(f"{run_dir} exists and is not a thread here: choose another --thread or --out")
        backends = backends or _load_backends(settings)
        graph, config = _compile(saver, settings, backends, run_dir)
        if existing:
            update = {
                "instruction": message, "turn": previous.turn + 1, "budget": settings.budget, "review": settings.review,
                "usage": Usage(), "status": "running", "stop_reason": "", "error": None, "hits": [], "started_at": time.time(),
            }
            if settings.policy == "agent":
                update["tool_errors"] = 0
            graph_input = update
        else:
            run_dir.mkdir(parents=True)  # exist_ok=False: never write into another run's folder
            _atomic_write(run_dir / SETTINGS_FILE, settings.model_dump_json(indent=2, exclude={"llm": {"api_key"}}))
            graph_input = {
                **RunInput(prompt=message, seed=settings.seed, budget=settings.budget).model_dump(),
                "run_dir": str(run_dir), "review": settings.review,
            }
        yield from _drive(graph, config, graph_input, settings, run_dir)


def resume(
    run: str | Path,
    decision: ReviewDecision | dict | None = None,
    settings: Settings | None = None,
    backends: Backends | None = None,
) -> Iterator[RunEvent]:
    """Continue a run folder (or a thread id) from its last checkpoint: after a crash, or a review pause with
    `decision`. Finished images are not regenerated; the time budget counts only time spent running."""
    run_dir = Path(run) if Path(run).is_dir() else None
    base = settings or Settings()
    if run_dir is None:
        with open_checkpointer(base) as saver:
            values = _thread_values(saver, str(run))
        if not values:
            raise RunError(f"no run folder or thread {str(run)!r}: pass a run folder path or a --thread name")
        run_dir = Path(values["run_dir"])
    if not (run_dir / SETTINGS_FILE).exists():
        raise RunError(f"{run_dir} is not a run folder (no {SETTINGS_FILE})")
    settings = _load_settings(run_dir)
    with open_checkpointer(settings) as saver:
        backends = backends or _load_backends(settings)
        graph, config = _compile(saver, settings, backends, run_dir)
        snapshot = graph.get_state(config)
        if not snapshot.values:
            raise RunError(f"no checkpoint for {run_dir.name!r} in {settings.data_dir}: it cannot be resumed")
        if not snapshot.tasks:  # (a node that finished just before a crash has a task with its result pending)
            raise RunError(f"run {run_dir.name!r} already ended ({snapshot.values.get('status')}); send a new message to its thread instead")
        paused = any(task.interrupts for task in snapshot.tasks)
        if paused and decision is None:
            raise RunError(f"run {run_dir.name!r} waits for a review: resume it with a decision (accept, drop or replace)")
        usage = Usage.model_validate(snapshot.values.get("usage") or {})
        # The clock restarts where it stopped: downtime and a person's thinking do not spend the time budget.
        clock = {"started_at": time.time() - usage.seconds}
        if paused:
            command = Command(resume=ReviewDecision.model_validate(decision).model_dump(), update=clock)
        else:
            graph.update_state(config, clock)
            command = None
        yield from _drive(graph, config, command, settings, run_dir)


def run(
    message: str,
    settings: Settings,
    out: Path = Path("runs"),
    thread: str | None = None,
    backends: Backends | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    reviewer: Reviewer | None = None,
) -> RunResult:
    """Run to the end and return the result. With `settings.review`, `reviewer` answers each pause."""
    events = stream(message, settings, out, thread, backends)
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
                events = resume(event.run_dir, decision, backends=backends)
                break
        else:
            raise RunError("the run ended without a result")


def history(thread: str, settings: Settings) -> list[Turn]:
    with open_checkpointer(settings) as saver:
        values = _thread_values(saver, thread)
    if not values:
        raise RunError(f"no thread {thread!r} in {settings.data_dir}")
    return [Turn.model_validate(t) for t in values.get("turns", [])]


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(out)
    except OSError as error:
        raise RunError(f"cannot write runs to {out} ({error.__class__.__name__}): pass a writable folder with --out") from None


def new_run_dir(out: Path, prompt: str) -> Path:
    """A fresh, unique folder name under `out` (created once the run can start)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "run"
    return out / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{uuid.uuid4().hex[:6]}"


def _load_backends(settings: Settings) -> Backends:
    from tools.backends.loading import load_backends

    return load_backends(settings)


def _load_settings(run_dir: Path) -> Settings:
    return Settings(**json.loads((run_dir / SETTINGS_FILE).read_text()))


def _thread_values(saver, thread: str) -> dict | None:
    found = saver.get_tuple({"configurable": {"thread_id": thread}})
    return dict(found.checkpoint["channel_values"]) if found else None


def _compile(saver, settings: Settings, backends: Backends, run_dir: Path):
    toolkit = Toolkit(backends, ImageStore(run_dir / IMAGES))
    graph = build_graph(settings.policy, toolkit, settings).compile(checkpointer=saver)
    return graph, {"configurable": {"thread_id": run_dir.name}, "recursion_limit": 10 * settings.budget.max_rounds + 50}


def _drive(graph, config: dict, graph_input, settings: Settings, run_dir: Path) -> Iterator[RunEvent]:
    """Stream the graph, translate its chunks to events, and write run.json and report.html at the end."""
    started, error, announced = time.time(), None, set()
    budget = settings.budget
    try:
        for mode, chunk in graph.stream(graph_input, config, stream_mode=["tasks", "updates", "custom"]):
            if mode == "tasks" and "input" in chunk:
                yield NodeStarted(node=chunk["name"])
            elif mode == "custom" and chunk.get("event") == "diffusion_step":
                yield DiffusionStep(step=chunk["step"], total=chunk["total"])
            elif mode == "custom" and chunk.get("event") == "retrieved":
                yield RetrievalHits(captions=chunk.get("captions") or [chunk.get("caption", "")], hits=chunk["hits"])
            elif mode == "updates":
                for node, update in chunk.items():
                    if node == "__interrupt__" or not isinstance(update, dict):
                        continue
                    yield NodeFinished(node=node, steps=update.get("steps", []))
                    for candidate in update.get("candidates", []):
                        key = (candidate.image_id, candidate.turn, len(candidate.verdicts))
                        if candidate.judged and key not in announced:
                            announced.add(key)
                            yield Verdicts(image_id=candidate.image_id, verdicts=candidate.verdicts)
                    if "usage" in update:
                        u = update["usage"]
                        yield BudgetLeft(
                            rounds=budget.max_rounds - u.rounds,
                            generations=budget.max_generations - u.generations,
                            seconds=None if budget.max_seconds is None else budget.max_seconds - u.seconds,
                            tokens=None if budget.max_tokens is None else budget.max_tokens - u.llm_tokens,
                        )
    except Exception as exc:  # the run fails cleanly: what the checkpoint holds is kept
        error = f"{exc.__class__.__name__}: {exc}"
    snapshot = graph.get_state(config)
    state = (AgentState if settings.policy == "agent" else RunState).model_validate(snapshot.values)
    pending = [i.value for task in snapshot.tasks for i in task.interrupts]
    # Failed and paused are written to run.json only: the checkpoint stays at the last good node, so
    # `resume` re-runs the failed node or answers the pending review.
    if error:
        state = state.model_copy(update={"status": "failed", "stop_reason": "failed", "error": error})
    elif pending:
        state = state.model_copy(update={"status": "paused", "stop_reason": "review"})
    result = make_result(state, run_dir, settings, time.time() - started)
    write_outputs(result, run_dir)
    yield ReviewRequested(run_dir=str(run_dir), request=pending[0]) if pending and not error else Finished(result=result)


def make_result(state: RunState, run_dir: Path, settings: Settings, elapsed: float) -> RunResult:
    best = state.best()
    return RunResult(
        run_id=run_dir.name,
        thread=run_dir.name,
        run_dir=str(run_dir),
        status=state.status if state.status != "running" else "failed",
        stop_reason=state.stop_reason,
        error=state.error,
        prompt=state.prompt,
        policy=settings.policy,
        profile=settings.profile,
        turn=state.turn,
        best_image=f"{IMAGES}/{best.image_id}.png" if best else None,
        best=best,
        concepts=state.concepts,
        candidates=state.candidates,
        rounds=state.usage.rounds,
        generations=state.usage.generations,
        usage=state.usage,
        budget=state.budget,
        elapsed=elapsed,
        steps=state.steps,
        turns=state.turns,
    )


def write_outputs(result: RunResult, run_dir: Path) -> None:
    from agent.report import render_report

    _atomic_write(run_dir / "run.json", result.model_dump_json(indent=2))
    _atomic_write(run_dir / "report.html", render_report(result, run_dir))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
