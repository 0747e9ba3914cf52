"""What a run answers: one model, RunResult, for run.json, the report, the CLI, the MCP server and LangChain;
RunSummary, its first fields, is what an assistant's tool call returns."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from imagerag.graphs.rules import best_of_turn
from imagerag.graphs.state import Budget, RunState, RunStatus, Step, Turn, Usage
from imagerag.tools.files import RunFolder
from imagerag.tools.types import Candidate, Concept, ScenePlan


class RunSummary(BaseModel):
    """The outcome of one call of the loop: what a larger assistant needs to show it or refine it."""

    thread: str = Field(description="Refine this image later by passing this thread id.")
    status: RunStatus
    stop_reason: str
    error: str | None
    clarification: str | None = Field(
        default=None, description="With needs_clarification: the words not understood and why; the thread is as it was."
    )
    prompt: str = Field(description="The prompt the image was drawn for (a refinement rewrites it).")
    turn: int = Field(description="1 for a new thread, then one more per refinement.")
    rounds: int
    generations: int
    best_image: str | None = Field(description="Path of the best image's PNG.")
    report: str = Field(description="Path of the run's report.html.")
    concepts: list[Concept] = Field(description="Every concept of the prompt with its verdict on the best image.")
    scene: ScenePlan | None = Field(default=None, description="The objects the image must show, with their ids.")

    @property
    def satisfied(self) -> list[str]:
        return [c.text for c in self.concepts if c.verdict == "satisfied"]

    @property
    def missing(self) -> list[str]:
        return [c.text for c in self.concepts if c.verdict != "satisfied"]

    def summary(self) -> str:
        """A few lines an LLM can act on."""
        lines = [
            f"{self.status} after {self.rounds} round(s) and {self.generations} image(s) (thread {self.thread}, turn {self.turn})",
            f"prompt: {self.prompt}",
            f"satisfied: {'; '.join(self.satisfied) or 'none'}",
            f"missing: {'; '.join(self.missing) or 'none'}",
            f"best image: {self.best_image or 'none'}",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.clarification:
            lines.append(f"not done, needs clarification: {self.clarification}; send the thread a clearer instruction")
        elif self.missing and self.status != "failed":
            lines.append(f"to refine, call again with thread={self.thread!r} and an instruction")
        return "\n".join(lines)

    def brief(self) -> RunSummary:
        """Only the summary's fields (a RunResult also carries every candidate and step)."""
        return RunSummary.model_validate(self.model_dump(include=set(RunSummary.model_fields)))


class RunResult(RunSummary):
    """Everything a run recorded (run.json)."""

    run_dir: str
    policy: str
    profile: str
    best: Candidate | None
    candidates: list[Candidate]
    usage: Usage
    budget: Budget
    elapsed: float
    steps: list[Step]
    turns: list[Turn]

    @classmethod
    def of(cls, state: RunState, run_dir: Path, policy: str, profile: str, elapsed: float) -> RunResult:
        best = best_of_turn(state)
        folder = run_dir.resolve()
        return cls(
            **state.model_dump(
                include={
                    "stop_reason",
                    "error",
                    "clarification",
                    "scene",
                    "prompt",
                    "turn",
                    "concepts",
                    "candidates",
                    "usage",
                    "budget",
                    "steps",
                    "turns",
                }
            ),
            thread=run_dir.name,
            status=state.status if state.status != "running" else "failed",
            rounds=state.usage.rounds,
            generations=state.usage.generations,
            best_image=str(RunFolder(folder).image(best.image_id)) if best else None,
            report=str(RunFolder(folder).report),
            run_dir=str(folder),
            policy=policy,
            profile=profile,
            best=best,
            elapsed=elapsed,
        )
