"""Run folders: where they go, what they record (settings.json, run.json, report.html, images/), and the rule that
nothing is overwritten: each new run gets a new folder, a thread keeps its folder and adds to it."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from imagerag.agent.config import RunRecipe, Settings
from imagerag.agent.result import RunResult
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.files import RunFolder, atomic_write


class RunError(ImageRAGError):
    """Input that cannot start or continue a run; the message names the problem and the fix."""


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(out)
    except OSError as error:
        raise RunError(
            f"cannot write runs to {out} ({error.__class__.__name__}): pass a writable folder with --out"
        ) from None


def new_run_dir(out: Path, prompt: str) -> Path:
    """A fresh, unique folder name under `out` (created once the run can start)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "run"
    return out / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{uuid.uuid4().hex[:6]}"


def create(run_dir: Path, settings: Settings) -> None:
    run_dir.mkdir(parents=True)  # exist_ok=False: never write into another run's folder
    atomic_write(RunFolder(run_dir).settings, settings.recipe().model_dump_json(indent=2))


def read_recipe(run_dir: Path) -> RunRecipe:
    path = RunFolder(run_dir).settings
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no {path.name})")
    try:
        return RunRecipe.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError):
        raise RunError(
            f"{run_dir} was written by an earlier version of imagerag-agent (before 0.2), whose runs cannot be resumed "
            "or continued: its images, run.json and report.html stay readable; start a new run or thread"
        ) from None


def write_outputs(result: RunResult) -> None:
    from imagerag.agent.report import render_report

    run_dir = Path(result.run_dir)
    atomic_write(RunFolder(run_dir).result, result.model_dump_json(indent=2))
    atomic_write(RunFolder(run_dir).report, render_report(result))
