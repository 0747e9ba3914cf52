"""Typed state shared by the tools, the graphs and the run record.

Images never live here: a candidate names its PNG by content hash (see tools.backends.images), so graph
state and checkpoints stay small and JSON-serialisable.
"""

from __future__ import annotations

import operator
import time
from typing import Annotated, Literal

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from pydantic import BaseModel, Field, field_validator

ConceptKind = Literal["object", "attribute", "style", "relation", "count"]
Verdict = Literal["pending", "satisfied", "missing"]
# stopped: the agent policy ended with a final answer while concepts were missing and budget was left.
# paused: waiting for a person's review of the references (resume with a decision).
RunStatus = Literal["running", "paused", "satisfied", "budget_exhausted", "stopped", "failed"]


class Concept(BaseModel):
    """One checkable part of the prompt, with its verdict on the best image so far."""

    id: str = Field(description="Stable id within the run, e.g. 'c1'.")
    text: str = Field(description="The concept in a few words, e.g. 'a red heart on the left'.")
    kind: ConceptKind = "object"
    verdict: Verdict = "pending"
    score: float | None = Field(default=None, description="Critic's alignment score in [0, 1].")
    evidence: str = Field(default="", description="Why the critic decided so.")
    attempts: int = Field(default=0, description="Rounds that retrieved references for this concept.")
    depends_on: list[str] = Field(
        default_factory=list, description="Ids of concepts this one needs (an attribute needs its object)."
    )


class ConceptVerdict(BaseModel):
    """The critic's judgement of one concept on one image."""

    concept_id: str
    satisfied: bool
    score: float = Field(ge=0.0, le=1.0)
    evidence: str = ""
    caption: str | None = Field(
        default=None,
        description="For a missing concept: a stand-alone caption that would retrieve an image of it.",
    )


class RetrievalHit(BaseModel):
    """A reference image found in the collection for one caption."""

    id: str = Field(description="Id of the image in the collection (a content hash).")
    caption: str = Field(description="The image's own caption in the collection.")
    similarity: float = Field(description="Cosine similarity between the query and the image.")
    source: str = Field(description="Where the image file lives.")
    query: str = Field(default="", description="The caption this hit was retrieved for.")


class Candidate(BaseModel):
    """One generated image and what the critic said of it."""

    image_id: str
    round: int
    turn: int = Field(default=1, description="The thread turn it belongs to (a best image is carried into the next).")
    prompt: str = Field(description="The prompt actually sent to the generator.")
    seed: int
    references: list[RetrievalHit] = Field(default_factory=list)
    verdicts: list[ConceptVerdict] = Field(default_factory=list)

    @property
    def judged(self) -> bool:
        return bool(self.verdicts)

    @property
    def satisfied_count(self) -> int:
        return sum(v.satisfied for v in self.verdicts)

    @property
    def score(self) -> float:
        """Aggregate alignment: mean per-concept score (0 when not yet judged)."""
        return sum(v.score for v in self.verdicts) / len(self.verdicts) if self.verdicts else 0.0

    def rank_key(self, roots: frozenset[str] = frozenset(), hard: frozenset[str] = frozenset()) -> tuple[int, int, int, float, int]:
        """Ordering of candidates, best last. First the satisfied `roots` (the concepts that depend on nothing:
        objects, styles), as in DSG: an image missing an object is worse than one with a wrong attribute. Then the
        satisfied `hard` roots, those no image from text alone showed: between two images with as many objects, the
        one showing what only a reference could draw is the one a fresh sample would not give back. Then
        satisfied concepts, then the mean score, then the earlier image (cheaper to reproduce)."""
        satisfied = {v.concept_id for v in self.verdicts if v.satisfied}
        return (len(satisfied & roots), len(satisfied & hard), len(satisfied), self.score, -self.round)


def drawn_from_text(candidates: list[Candidate]) -> set[str]:
    """Ids of the concepts that some image drawn without references was judged to show."""
    return {v.concept_id for c in candidates if not c.references for v in c.verdicts if v.satisfied}


def best_candidate(candidates: list[Candidate], concepts: list[Concept]) -> Candidate | None:
    """The judged candidate ranked first (see Candidate.rank_key)."""
    roots = frozenset(c.id for c in concepts if not c.depends_on)
    hard = roots - drawn_from_text(candidates)
    return max((c for c in candidates if c.judged), key=lambda c: c.rank_key(roots, hard), default=None)


class Budget(BaseModel):
    """Limits of one run. A round is one policy turn: one pass of the imagerag policy, one LLM call of the agent."""

    max_rounds: int = Field(default=4, ge=1, description="Policy turns, the initial generation included.")
    max_generations: int = Field(default=6, ge=1, description="Images generated, all rounds together.")
    max_seconds: float | None = Field(default=900.0, gt=0, description="Wall-clock seconds for the run.")
    max_tokens: int | None = Field(default=60_000, gt=0, description="LLM tokens (planner, judge, agent).")


class Usage(BaseModel):
    rounds: int = 0
    generations: int = 0
    critic_calls: int = 0
    llm_tokens: int = 0
    seconds: float = 0.0

    def add(self, **deltas: int) -> Usage:
        return self.model_copy(update={k: getattr(self, k) + v for k, v in deltas.items()})

    def spent(self, budget: Budget) -> str | None:
        """Name of the first budget this usage has reached, or None while all have room."""
        if self.rounds >= budget.max_rounds:
            return "rounds"
        if self.generations >= budget.max_generations:
            return "generations"
        if budget.max_seconds is not None and self.seconds >= budget.max_seconds:
            return "seconds"
        if budget.max_tokens is not None and self.llm_tokens >= budget.max_tokens:
            return "tokens"
        return None


class Step(BaseModel):
    """One entry of the run's step record."""

    node: str
    round: int
    summary: str
    at: float = Field(default_factory=time.time)


MAX_PROMPT_CHARS = 4000  # long, dense prompts (DPG-Bench style) fit; a pasted document does not
THREAD_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a thread names its run folder


class RunInput(BaseModel):
    """What a caller gives a run."""

    prompt: str
    seed: int = 0
    budget: Budget = Field(default_factory=Budget)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("the prompt is empty: describe the image to draw, e.g. 'a red fox in the snow'")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(value)} characters, more than {MAX_PROMPT_CHARS}: shorten it, or split it over turns of a thread")
        return value


class Turn(BaseModel):
    """One message of a thread and where it left the image."""

    index: int
    message: str
    prompt: str
    status: RunStatus
    stop_reason: str
    best_image: str | None
    satisfied: list[str] = Field(default_factory=list, description="Texts of the satisfied concepts.")
    missing: list[str] = Field(default_factory=list, description="Texts of the concepts still missing.")
    usage: Usage


class RunState(RunInput):
    """The graph state of both policies. A thread is one state that later messages continue."""

    run_dir: str = Field(default="", description="The run's folder (images, run.json, report.html).")
    instruction: str | None = Field(default=None, description="The refining message of this turn, if any.")
    turn: int = 1
    turns: Annotated[list[Turn], operator.add] = Field(default_factory=list)
    review: bool = Field(default=False, description="Pause for a person before each regeneration.")
    # Set by the first node that runs (not a default factory: a field no node writes would be "now" in every node).
    started_at: float | None = None
    concepts: list[Concept] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    hits: list[RetrievalHit] = Field(default_factory=list, description="References retrieved this round.")
    usage: Usage = Field(default_factory=Usage)
    status: RunStatus = "running"
    stop_reason: str = ""
    error: str | None = None
    steps: Annotated[list[Step], operator.add] = Field(default_factory=list)

    def current(self) -> list[Candidate]:
        """This turn's candidates (earlier turns are history)."""
        return [c for c in self.candidates if c.turn == self.turn]

    def best(self) -> Candidate | None:
        return best_candidate(self.current(), self.concepts)

    def missing(self) -> list[Concept]:
        return [c for c in self.concepts if c.verdict != "satisfied"]

    def message(self) -> str:
        return self.instruction or self.prompt

    def elapsed(self) -> float:
        return time.time() - self.started_at if self.started_at is not None else 0.0


class AgentState(RunState):
    """The LLM policy adds its conversation."""

    messages: Annotated[list[AnyMessage], add_messages] = Field(default_factory=list)
    tool_errors: int = Field(default=0, description="Consecutive tool turns in which every call failed.")
