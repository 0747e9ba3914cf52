"""The types the tools exchange: concepts of a prompt, verdicts on an image, reference hits, candidates.

Images never live here: a candidate names its PNG by content hash (tools.backends.images), so graph state and
checkpoints stay small and JSON-serialisable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

ConceptKind = Literal["object", "attribute", "style", "relation", "count"]
Verdict = Literal["pending", "satisfied", "missing"]


class Box(BaseModel):
    """A rectangle of an image in fractions of its width and height: (x0, y0) is the top left corner."""

    x0: float = Field(ge=0.0, le=1.0)
    y0: float = Field(ge=0.0, le=1.0)
    x1: float = Field(ge=0.0, le=1.0)
    y1: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"a box needs x0 < x1 and y0 < y1, got ({self.x0}, {self.y0}, {self.x1}, {self.y1})")
        return self

    def pixels(self, width: int, height: int, margin: int = 0) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels, grown by `margin` pixels on every side, within the image."""
        return (
            max(0, round(self.x0 * width) - margin),
            max(0, round(self.y0 * height) - margin),
            min(width, round(self.x1 * width) + margin),
            min(height, round(self.y1 * height) + margin),
        )

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


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
    box: Box | None = Field(default=None, description="For an object: where the planner puts it, if it said.")


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
    box: Box | None = Field(default=None, description="For an object: where the critic sees it, when it can say.")


class Critique(BaseModel):
    """The critic's verdicts on one image, and the LLM tokens it spent (0 for CLIP)."""

    verdicts: list[ConceptVerdict]
    tokens: int = 0


class RetrievalHit(BaseModel):
    """A reference image found in the collection for one caption."""

    id: str = Field(description="Id of the image in the collection (a content hash).")
    caption: str = Field(description="The image's own caption in the collection.")
    similarity: float = Field(description="Cosine similarity between the query and the image.")
    source: str = Field(description="Where the image file lives.")
    query: str = Field(default="", description="The caption this hit was retrieved for.")


class EditRegion(BaseModel):
    """One region an edit redraws: what to draw there ('' for background: what was there is removed)."""

    box: Box
    text: str = Field(description="What to draw in the region, e.g. 'a large red heart in the top left'; '' clears it.")
    concept_ids: list[str] = Field(default_factory=list, description="The object concepts the region is for.")
    reference_ids: list[str] = Field(
        default_factory=list,
        description="Ids of retrieved references for this region alone: each acts only inside it (the first one is "
        "used). Empty: the edit's references, if any, act over every region.",
    )


class Edit(BaseModel):
    """How a candidate was made from another image by redrawing regions of it."""

    source: str = Field(description="Id of the edited image.")
    regions: list[EditRegion]
    exact_outside: bool = Field(description="Whether every pixel outside the regions is the source's, exactly.")


class Candidate(BaseModel):
    """One generated image and what the critic said of it."""

    image_id: str
    round: int
    turn: int = Field(default=1, description="The thread turn it belongs to (a best image is carried into the next).")
    prompt: str = Field(description="The prompt actually sent to the generator.")
    seed: int
    references: list[RetrievalHit] = Field(default_factory=list)
    verdicts: list[ConceptVerdict] = Field(default_factory=list)
    edit: Edit | None = Field(default=None, description="Set when the image is an edit of another.")

    @property
    def judged(self) -> bool:
        return bool(self.verdicts)

    @property
    def satisfied_count(self) -> int:
        return sum(v.satisfied for v in self.verdicts)

    @property
    def satisfied_ids(self) -> set[str]:
        return {v.concept_id for v in self.verdicts if v.satisfied}

    @property
    def score(self) -> float:
        """Aggregate alignment: mean per-concept score (0 when not yet judged)."""
        return sum(v.score for v in self.verdicts) / len(self.verdicts) if self.verdicts else 0.0
