"""Run one prompt through a policy: a fresh run folder, the graph, run.json and report.html.

A run never overwrites another (each gets its own folder) and never loses work: images are written as they
are made, and if the graph fails its last checkpoint still becomes run.json with status "failed".
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from agent.config import Settings
from agent.state import AgentState, Budget, Candidate, Concept, RunInput, RunState, RunStatus, Step, Usage
from graphs import build_graph, memory_checkpointer
from tools.backends.images import ImageStore
from tools.toolkit import Backends, Toolkit

IMAGES = "images"
EventHandler = Callable[[str, dict], None]  # (kind, payload): kind is a node name, or a custom event


class RunError(ValueError):
    """Input that cannot start a run; the message names the problem and the fix."""


class RunResult(BaseModel):
    run_id: str
    run_dir: str
    status: RunStatus
    stop_reason: str
    error: str | None
    prompt: str
    policy: str
    profile: str
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


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(out)
    except OSError as error:
        raise RunError(f"cannot write runs to {out} ({error.__class__.__name__}): pass a writable folder with --out") from None


def new_run_dir(out: Path, prompt: str) -> Path:
    """A fresh, unique folder name under `out` (created by the caller once the run can start)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "run"
    return out / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{uuid.uuid4().hex[:6]}"


def run(
    prompt: str,
    settings: Settings,
    out: Path = Path("runs"),
    backends: Backends | None = None,
    on_event: EventHandler | None = None,
) -> RunResult:
    """Run `prompt` with `settings`; `backends` are loaded from the profile unless given (tests inject fakes)."""
    try:
        run_input = RunInput(prompt=prompt, seed=settings.seed, budget=settings.budget)
    except ValidationError as error:
        raise RunError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None
    settings.resolved_profile()  # fails early on an unknown profile
    check_out_dir(Path(out))  # before loading models, which can take minutes
    if backends is None:
        from tools.backends.loading import load_backends

        backends = load_backends(settings)
    run_dir = new_run_dir(Path(out), run_input.prompt)
    toolkit = Toolkit(backends, ImageStore(run_dir / IMAGES))
    graph = build_graph(settings.policy, toolkit, settings).compile(checkpointer=memory_checkpointer())
    run_dir.mkdir()  # exist_ok=False: never write into another run's folder
    config = {"configurable": {"thread_id": run_dir.name}, "recursion_limit": 8 * run_input.budget.max_rounds + 20}
    state_cls = AgentState if settings.policy == "agent" else RunState
    started = time.time()
    error = None
    try:
        for mode, chunk in graph.stream(run_input.model_dump(), config, stream_mode=["updates", "custom"]):
            if on_event is None:
                continue
            if mode == "custom":
                on_event(chunk.get("event", "custom"), chunk)
            else:
                for node, update in chunk.items():
                    on_event(node, update if isinstance(update, dict) else {})
    except Exception as exc:  # the run fails cleanly: what the checkpoint holds is kept
        error = f"{exc.__class__.__name__}: {exc}"
    state = state_cls.model_validate(graph.get_state(config).values)
    if error:
        state = state.model_copy(update={"status": "failed", "stop_reason": "failed", "error": error})
    result = make_result(state, run_dir, settings, time.time() - started)
    write_outputs(result, run_dir)
    return result


def make_result(state: RunState, run_dir: Path, settings: Settings, elapsed: float) -> RunResult:
    best = state.best()
    return RunResult(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        status=state.status if state.status != "running" else "failed",
        stop_reason=state.stop_reason,
        error=state.error,
        prompt=state.prompt,
        policy=settings.policy,
        profile=settings.profile,
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
    )


def write_outputs(result: RunResult, run_dir: Path) -> None:
    from agent.report import render_report

    _atomic_write(run_dir / "run.json", result.model_dump_json(indent=2))
    _atomic_write(run_dir / "report.html", render_report(result, run_dir))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
