"""The types the tools exchange: concepts of a prompt, verdicts on an image, reference hits, candidates.

Images never live here: a candidate names its PNG by content hash (tools.backends.images), so graph state and
checkpoints stay small and JSON-serialisable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

ConceptKind = Literal["object", "attribute", "style", "relation", "count"]
Verdict = Literal["pending", "satisfied", "missing"]


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
    def satisfied_ids(self) -> set[str]:
        return {v.concept_id for v in self.verdicts if v.satisfied}

    @property
    def score(self) -> float:
        """Aggregate alignment: mean per-concept score (0 when not yet judged)."""
        return sum(v.score for v in self.verdicts) / len(self.verdicts) if self.verdicts else 0.0
