"""The types the tools exchange: objects and concepts of a prompt, verdicts on an image, reference hits, candidates.

Images never live here: a candidate names its PNG by content hash (tools.backends.images), so graph state and
checkpoints stay small and JSON-serialisable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

# "absent": an object a message removed, which the image must no longer show (where it was, or anywhere).
ConceptKind = Literal["object", "attribute", "style", "relation", "count", "absent"]
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
    box: Box | None = Field(
        default=None,
        description="For an object: where the planner puts it, if it said. For an absent object: where it was last.",
    )
    object_id: str | None = Field(
        default=None, description="The scene object this concept is about (e.g. 'o1'); None for a style."
    )
    attribute: str | None = Field(
        default=None,
        description="For an attribute: which attribute of its object it states ('colour', 'size', ...), so that a "
        "change of colour replaces the colour and nothing else.",
    )


class Detail(BaseModel):
    """A concept the object model does not break down (an LLM's 'the dog wears a green scarf', a style), kept as
    written: it stays until its object is removed or replaced."""

    text: str
    kind: ConceptKind = "attribute"


class SceneObject(BaseModel):
    """One object a prompt asks for, with an identity that survives the thread's turns.

    Its place is a grid cell, a relation to another object, or free place words that no rule reads (drawn as
    written); at most one of the three is set.
    """

    id: str = Field(description="Stable id within the thread, e.g. 'o1'.")
    noun: str = Field(description="What it is: 'square', 'boston bull' minus its adjectives, 'stars' for a count.")
    count: int = Field(default=1, ge=1, description="How many ('two stars': 2).")
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Attribute kind -> value words: {'size': 'large', 'colour': 'red'}. An adjective of no known "
        "kind is a kind of its own ({'boston': 'boston'}).",
    )
    cell: str | None = Field(default=None, description="The grid cell its place words name ('top left').")
    relation: str | None = Field(default=None, description="Relation words to another object: 'to the left of'.")
    relative_to: str | None = Field(default=None, description="Id of the object the relation is to.")
    place: str | None = Field(default=None, description="Place words no rule reads: 'behind it', 'on the beach'.")
    details: list[Detail] = Field(default_factory=list, description="Concepts about it kept as written.")
    box: Box | None = Field(default=None, description="Where it goes or was last seen, when known.")


class ScenePlan(BaseModel):
    """What the image must show: objects with identity, concepts that belong to no object (a style), and the
    objects a message removed (each must stay absent)."""

    objects: list[SceneObject] = Field(default_factory=list)
    extras: list[Detail] = Field(default_factory=list, description="Concepts of no object: styles, mostly.")
    removed: list[SceneObject] = Field(
        default_factory=list, description="Objects removed by a message: the image must not show them."
    )
    focus: list[str] = Field(
        default_factory=list, description="Ids of the objects the latest message spoke of: 'it' in the next one."
    )

    def object(self, object_id: str) -> SceneObject | None:
        return next((o for o in self.objects if o.id == object_id), None)

    def next_object_id(self) -> str:
        """A fresh id: never one of an object that is or was in the scene, so a removed object's id is not reused."""
        used = [int(o.id[1:]) for o in [*self.objects, *self.removed] if o.id[1:].isdigit()]
        return f"o{max(used, default=0) + 1}"


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


# The key of PIL's Image.info under which ReferenceStore.load_image records a collection image's id.
REFERENCE_ID = "imagerag_reference_id"


class RetrievalHit(BaseModel):
    """A reference image found in the collection for one caption."""

    id: str = Field(description="Id of the image in the collection (a content hash).")
    caption: str = Field(description="The image's own caption in the collection.")
    similarity: float = Field(description="Cosine similarity between the query and the image.")
    source: str = Field(description="Where the image file lives.")
    query: str = Field(default="", description="The caption this hit was retrieved for.")
    box: Box | None = Field(
        default=None,
        description="Where the query's object is in the image (found by the critic's re-ranking or the profile's "
        "detector): the generator is handed that object, not the whole image. None: the whole image.",
    )


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
    strays: list[Box] = Field(
        default_factory=list,
        description="Where the image holds an object no concept asks for (a closed world's critic says; else empty).",
    )

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
