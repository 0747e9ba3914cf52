"""Typed progress events of a run, built from LangGraph's stream modes (tasks, updates, custom)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from imagerag.agent.result import RunResult
from imagerag.graphs.state import Step
from imagerag.tools.types import ConceptVerdict, Edit, RetrievalHit


class NodeStarted(BaseModel):
    kind: Literal["node_started"] = "node_started"
    node: str


class NodeFinished(BaseModel):
    kind: Literal["node_finished"] = "node_finished"
    node: str
    steps: list[Step] = Field(default_factory=list)


class DiffusionStep(BaseModel):
    kind: Literal["diffusion_step"] = "diffusion_step"
    step: int
    total: int


class RetrievalHits(BaseModel):
    kind: Literal["retrieved"] = "retrieved"
    captions: list[str]
    hits: list[RetrievalHit]


class Edited(BaseModel):
    """An image made by redrawing regions of another (the regions' boxes are the edit's mask)."""

    kind: Literal["edited"] = "edited"
    image_id: str
    edit: Edit


class Verdicts(BaseModel):
    kind: Literal["verdicts"] = "verdicts"
    image_id: str
    verdicts: list[ConceptVerdict]


class BudgetLeft(BaseModel):
    kind: Literal["budget"] = "budget"
    rounds: int
    generations: int
    seconds: float | None
    tokens: int | None


class ReviewRequested(BaseModel):
    """The run paused before a regeneration; continue it with `agent.run.resume(run, decision)`."""

    kind: Literal["review"] = "review"
    run_dir: str
    request: dict[str, Any]


class Finished(BaseModel):
    kind: Literal["finished"] = "finished"
    result: RunResult


RunEvent = Annotated[
    NodeStarted
    | NodeFinished
    | DiffusionStep
    | RetrievalHits
    | Edited
    | Verdicts
    | BudgetLeft
    | ReviewRequested
    | Finished,
    Field(discriminator="kind"),
]
