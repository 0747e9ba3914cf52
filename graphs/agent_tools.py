"""The five tools as an LLM sees them: LangChain tools with typed arguments, which read the run (budget, concepts,
references retrieved so far) from the ToolNode's runtime and call the plain Toolkit. Each ToolMessage artifact is
a ToolOutcome for the graph's `observe` node to record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolRuntime
from pydantic import BaseModel, Field

from imagerag.graphs.context import RunContext, toolkit
from imagerag.graphs.rules import kept_boxes, kept_verdicts
from imagerag.graphs.state import AgentState
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.grid import cell_of
from imagerag.tools.toolkit import Toolkit
from imagerag.tools.types import Box, Candidate, Concept, ConceptVerdict, Critique, EditRegion, RetrievalHit

Runtime = ToolRuntime[RunContext, AgentState]


class ToolOutcome(BaseModel):
    """What a tool call produced, carried as the ToolMessage artifact for the graph to record."""

    candidates: list[Candidate] = Field(default_factory=list)
    judged_image: str | None = None
    critique: Critique | None = None
    hits: list[RetrievalHit] = Field(default_factory=list)


class ToolInputError(ImageRAGError):
    """A tool call the run cannot honour; the message goes back to the LLM."""


def _run(runtime: Runtime) -> AgentState:
    return AgentState.model_validate(runtime.state)


def _tools(runtime: Runtime) -> Toolkit:
    return toolkit(_run(runtime), runtime)


def describe_verdicts(
    image_id: str, verdicts: list[ConceptVerdict], concepts: list[Concept], strays: Sequence[Box] = ()
) -> str:
    text = {c.id: c.text for c in concepts}
    lines = [
        f"- {v.concept_id} {text.get(v.concept_id, '?')!r}: {'satisfied' if v.satisfied else 'MISSING'} (score {v.score:.2f})"
        + (f"; retrieve with {v.caption!r}" if v.caption and not v.satisfied else "")
        + (f"; seen at {v.box.model_dump()}" if v.box else "")
        for v in verdicts
    ]
    if strays:
        cells = ", ".join(cell_of(box) for box in strays)
        lines.append(f"- also drawn, and asked for by no concept, in: {cells} (the run does not end on this image)")
    return f"critique of image {image_id}:\n" + "\n".join(lines)


@tool(response_format="content_and_artifact")
def generate(
    prompt: Annotated[str, Field(description="The full text prompt to draw.")],
    runtime: Runtime,
    seed: Annotated[int, Field(ge=0, description="Random seed; change it for a different sample.")] = 0,
    n: Annotated[int, Field(ge=1, le=4, description="How many images.")] = 1,
) -> tuple[str, ToolOutcome]:
    """Generate image(s) from the text prompt alone. Returns image ids; each image is judged automatically."""
    run = _run(runtime)
    n = min(n, run.budget.max_generations - run.usage.generations)
    if n < 1:
        raise ToolInputError("the generation budget is spent: no image can be generated")
    candidates = _tools(runtime).generate(prompt, seed, n, round=run.usage.rounds, turn=run.turn)
    return f"generated image(s) {', '.join(c.image_id for c in candidates)}", ToolOutcome(candidates=candidates)


@tool(response_format="content_and_artifact")
def critique(
    image_id: Annotated[str, Field(description="Id of an image returned by generate or regenerate.")], runtime: Runtime
) -> tuple[str, ToolOutcome]:
    """Judge one generated image against every concept of the prompt."""
    run = _run(runtime)
    if image_id not in {c.image_id for c in run.candidates}:
        raise ToolInputError(
            f"unknown image id {image_id!r}: pass an id returned by generate or regenerate in this run"
        )
    verdicts = _tools(runtime).critique(image_id, run.concepts, run.prompt)
    return describe_verdicts(image_id, verdicts.verdicts, run.concepts), ToolOutcome(
        judged_image=image_id, critique=verdicts
    )


@tool(response_format="content_and_artifact")
def retrieve(
    caption: Annotated[
        str, Field(description="Stand-alone caption of the concept, e.g. 'a photo of a boston bull dog'.")
    ],
    runtime: Runtime,
    k: Annotated[int, Field(ge=1, le=5, description="How many references.")] = 1,
    min_similarity: Annotated[float | None, Field(description="Relevance threshold; default: the profile's.")] = None,
) -> tuple[str, ToolOutcome]:
    """Find reference images in the database for one missing concept."""
    hits = _tools(runtime).retrieve(caption, k, min_similarity)
    if not hits:
        return (
            f"no reference image is similar enough to {caption!r}; try another caption or regenerate without one",
            ToolOutcome(),
        )
    listed = "; ".join(f"{h.id}: {h.caption!r} (similarity {h.similarity:.2f})" for h in hits)
    return f"references for {caption!r}: {listed}", ToolOutcome(hits=hits)


@tool(response_format="content_and_artifact")
def regenerate(
    prompt: Annotated[str, Field(description="The full text prompt to draw.")],
    reference_ids: Annotated[list[str], Field(description="Ids of references returned by retrieve.")],
    runtime: Runtime,
    seed: Annotated[int, Field(ge=0, description="Random seed.")] = 0,
) -> tuple[str, ToolOutcome]:
    """Generate again from the prompt, conditioned on retrieved reference images."""
    run = _run(runtime)
    if run.usage.generations >= run.budget.max_generations:
        raise ToolInputError("the generation budget is spent: no image can be generated")
    known = {h.id: h for h in run.hits}
    unknown = [i for i in reference_ids if i not in known]
    if unknown:
        raise ToolInputError(f"unknown reference ids {unknown}: pass ids returned by retrieve in this run")
    [candidate] = _tools(runtime).regenerate(
        prompt, [known[i] for i in reference_ids], seed, round=run.usage.rounds, turn=run.turn
    )
    return f"regenerated image {candidate.image_id} with {len(candidate.references)} reference(s)", ToolOutcome(
        candidates=[candidate]
    )


@tool(response_format="content_and_artifact")
def edit(
    image_id: Annotated[str, Field(description="Id of the image to edit: one returned by a tool in this run.")],
    regions: Annotated[
        list[EditRegion],
        Field(min_length=1, description="Regions to redraw, each with what to draw there ('' clears it)."),
    ],
    runtime: Runtime,
    reference_ids: Annotated[
        list[str], Field(description="Ids of references returned by retrieve, for what the regions draw.")
    ] = [],  # noqa: B006 - a tool's JSON schema default, never mutated
    seed: Annotated[int, Field(ge=0, description="Random seed.")] = 0,
) -> tuple[str, ToolOutcome]:
    """Redraw only some regions of an image and keep the rest: use it when an image holds some objects right and
    misses or gets wrong others. Boxes are fractions of the image (x0, y0 top left; x1, y1 bottom right); critiques
    say where objects were seen. To move an object, clear its old region and draw it in the new one. To fix several
    objects at once, give each region the reference for its own object (reference_ids on the region)."""
    run = _run(runtime)
    if run.usage.generations >= run.budget.max_generations:
        raise ToolInputError("the generation budget is spent: no image can be edited")
    source = next((c for c in run.candidates if c.image_id == image_id), None)
    if source is None:
        raise ToolInputError(f"unknown image id {image_id!r}: pass an id returned by a tool in this run")
    known = {h.id: h for h in run.hits}
    named = [*reference_ids, *(i for r in regions for i in r.reference_ids if i not in reference_ids)]
    if unknown := [i for i in named if i not in known]:
        raise ToolInputError(f"unknown reference ids {unknown}: pass ids returned by retrieve in this run")
    keep = kept_boxes(source, regions, run.concepts)
    candidate = _tools(runtime).edit(
        image_id, regions, [known[i] for i in named], seed, round=run.usage.rounds, turn=run.turn, keep=keep
    )
    made = candidate.edit
    assert made is not None
    candidate = candidate.model_copy(update={"verdicts": kept_verdicts(source, made, run.concepts)})
    kept = "every pixel outside the regions kept" if made.exact_outside else "the whole image redrawn"
    return f"edited image {candidate.image_id} from {image_id} ({kept})", ToolOutcome(candidates=[candidate])


TOOLS: list[BaseTool] = [generate, critique, retrieve, regenerate, edit]
# The calls a person reviews (with review on) before they run: those that draw with retrieved references.
DRAWS_WITH_REFERENCES = ("regenerate", "edit")
