"""The four tools (generate, critique, retrieve, regenerate) plus decomposition, over injected backends.

Each tool is a plain method returning typed results, and `as_langchain_tools` exposes the same methods as
LangChain tools with pydantic argument schemas for the agent policy. Run-specific context (concepts, round,
budget, earlier hits) reaches those tools through LangGraph's InjectedState, never through globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.prebuilt import InjectedState
from pydantic import BaseModel, Field

from agent.config import Profile
from agent.state import Candidate, Concept, ConceptVerdict, RetrievalHit, RunState
from prompts import render
from tools.backends.diffusion import Generator
from tools.backends.images import ImageStore
from tools.backends.judges import Critic, Critique
from tools.backends.planner import Decomposer, apply_revision
from tools.backends.store import ReferenceStore


@dataclass
class Backends:
    """Heavy objects, built once per process (tools.backends.loading) and shared by every run."""

    profile: Profile
    generator: Generator
    critic: Critic
    store: ReferenceStore
    decomposer: Decomposer
    llm: BaseChatModel | None
    min_similarity: float


def _stream_progress(event: dict) -> None:
    """Send a custom event to LangGraph's stream when running inside a graph; a no-op elsewhere."""
    try:
        from langgraph.config import get_stream_writer

        get_stream_writer()(event)
    except (RuntimeError, KeyError):
        pass


class ToolOutcome(BaseModel):
    """What a tool call produced, carried as the ToolMessage artifact for the graph to record."""

    candidates: list[Candidate] = Field(default_factory=list)
    judged_image: str | None = None
    critique: Critique | None = None
    hits: list[RetrievalHit] = Field(default_factory=list)


class Toolkit:
    def __init__(self, backends: Backends, images: ImageStore):
        self.backends, self.images = backends, images

    @property
    def max_references(self) -> int:
        return self.backends.generator.max_references

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        return self.backends.decomposer.decompose(prompt)

    def revise(self, prompt: str, concepts: list[Concept], instruction: str) -> tuple[str, list[Concept], int]:
        """Apply a thread's next message: the rewritten prompt, the concepts (kept ones keep their verdicts), tokens."""
        revision, tokens = self.backends.decomposer.revise(prompt, concepts, instruction)
        return revision.prompt, apply_revision(concepts, revision), tokens

    def generate(self, prompt: str, seed: int = 0, n: int = 1, round: int = 1, turn: int = 1) -> list[Candidate]:
        """Draw `n` images from text alone."""
        return self._draw(prompt, prompt, seed, n, [], round, turn)

    def critique(self, image_id: str, concepts: list[Concept], prompt: str) -> Critique:
        """Judge every concept on one stored image."""
        return self.backends.critic.critique(self.images.get(image_id), concepts, prompt)

    def retrieve(self, caption: str, k: int = 1, min_similarity: float | None = None, exclude: set[str] = frozenset()) -> list[RetrievalHit]:
        """Reference images for one caption, none below the relevance threshold."""
        threshold = self.backends.min_similarity if min_similarity is None else min_similarity
        hits = self.backends.store.search(caption, k, threshold, exclude)
        _stream_progress({"event": "retrieved", "caption": caption, "hits": [h.model_dump() for h in hits]})
        return hits

    def retrieve_many(self, captions: list[str], k: int = 1, exclude: set[str] = frozenset()) -> list[RetrievalHit]:
        """Hits for several captions, no image twice."""
        hits = self.backends.store.search_many(captions, k, self.backends.min_similarity, exclude)
        _stream_progress({"event": "retrieved", "captions": captions, "hits": [h.model_dump() for h in hits]})
        return hits

    def regenerate(self, prompt: str, references: list[RetrievalHit], seed: int = 0, round: int = 1, turn: int = 1) -> Candidate:
        """Draw again conditioned on reference images (at most the generator's limit)."""
        references = references[: self.max_references]
        template = self.backends.profile.generator.regenerate_template if references else "regenerate_plain"
        conditioned = render(template, prompt=prompt, references=references)
        return self._draw(prompt, conditioned, seed, 1, references, round, turn)[0]

    def _draw(self, prompt: str, conditioned: str, seed: int, n: int, references: list[RetrievalHit], round: int, turn: int) -> list[Candidate]:
        def on_step(step: int, total: int) -> None:
            _stream_progress({"event": "diffusion_step", "step": step, "total": total})

        images = self.backends.generator.generate(
            conditioned, seed, n, [ReferenceStore.load_image(h) for h in references], on_step=on_step
        )
        return [
            Candidate(image_id=self.images.put(image), round=round, turn=turn, prompt=conditioned, seed=seed + i, references=references)
            for i, image in enumerate(images)
        ]

    def as_langchain_tools(self) -> list[BaseTool]:
        """The four tools for an LLM. Their ToolMessage artifact is a ToolOutcome."""
        return [
            StructuredTool.from_function(func=fn, name=fn.__name__.removeprefix("_lc_"), description=schema.__doc__, args_schema=schema, response_format="content_and_artifact")
            for fn, schema in (
                (self._lc_generate, GenerateArgs),
                (self._lc_critique, CritiqueArgs),
                (self._lc_retrieve, RetrieveArgs),
                (self._lc_regenerate, RegenerateArgs),
            )
        ]

    # LangChain entry points: validate against the run's state, call the plain method, describe the result.

    def _lc_generate(self, prompt: str, seed: int = 0, n: int = 1, state: Any = None) -> tuple[str, ToolOutcome]:
        run = RunState.model_validate(state)
        n = min(n, run.budget.max_generations - run.usage.generations)
        if n < 1:
            raise ToolInputError("the generation budget is spent: no image can be generated")
        candidates = self.generate(prompt, seed, n, round=run.usage.rounds, turn=run.turn)
        return f"generated image(s) {', '.join(c.image_id for c in candidates)}", ToolOutcome(candidates=candidates)

    def _lc_critique(self, image_id: str, state: Any = None) -> tuple[str, ToolOutcome]:
        run = RunState.model_validate(state)
        critique = self.critique(image_id, run.concepts, run.prompt)
        return describe_verdicts(image_id, critique.verdicts, run.concepts), ToolOutcome(judged_image=image_id, critique=critique)

    def _lc_retrieve(self, caption: str, k: int = 1, min_similarity: float | None = None, state: Any = None) -> tuple[str, ToolOutcome]:
        hits = self.retrieve(caption, k, min_similarity)
        if not hits:
            return f"no reference image is similar enough to {caption!r}; try another caption or regenerate without one", ToolOutcome()
        listed = "; ".join(f"{h.id}: {h.caption!r} (similarity {h.similarity:.2f})" for h in hits)
        return f"references for {caption!r}: {listed}", ToolOutcome(hits=hits)

    def _lc_regenerate(self, prompt: str, reference_ids: list[str], seed: int = 0, state: Any = None) -> tuple[str, ToolOutcome]:
        run = RunState.model_validate(state)
        if run.usage.generations >= run.budget.max_generations:
            raise ToolInputError("the generation budget is spent: no image can be generated")
        known = {h.id: h for h in run.hits}
        unknown = [i for i in reference_ids if i not in known]
        if unknown:
            raise ToolInputError(f"unknown reference ids {unknown}: pass ids returned by retrieve in this run")
        candidate = self.regenerate(prompt, [known[i] for i in reference_ids], seed, round=run.usage.rounds, turn=run.turn)
        return f"regenerated image {candidate.image_id} with {len(candidate.references)} reference(s)", ToolOutcome(candidates=[candidate])


class ToolInputError(ValueError):
    """A tool call the run cannot honour; the message goes back to the LLM."""


def describe_verdicts(image_id: str, verdicts: list[ConceptVerdict], concepts: list[Concept]) -> str:
    text = {c.id: c.text for c in concepts}
    lines = [
        f"- {v.concept_id} {text.get(v.concept_id, '?')!r}: {'satisfied' if v.satisfied else 'MISSING'} (score {v.score:.2f})"
        + (f"; retrieve with {v.caption!r}" if v.caption and not v.satisfied else "")
        for v in verdicts
    ]
    return f"critique of image {image_id}:\n" + "\n".join(lines)


# Argument schemas the LLM sees; `state` is injected by LangGraph's ToolNode and hidden from the model.


class GenerateArgs(BaseModel):
    """Generate image(s) from the text prompt alone. Returns image ids; each image is judged automatically."""

    prompt: str = Field(description="The full text prompt to draw.")
    seed: int = Field(default=0, description="Random seed; change it for a different sample.")
    n: int = Field(default=1, ge=1, le=4, description="How many images.")
    state: Annotated[Any, InjectedState] = None


class CritiqueArgs(BaseModel):
    """Judge one generated image against every concept of the prompt."""

    image_id: str = Field(description="Id of an image returned by generate or regenerate.")
    state: Annotated[Any, InjectedState] = None


class RetrieveArgs(BaseModel):
    """Find reference images in the database for one missing concept."""

    caption: str = Field(description="Stand-alone caption of the concept, e.g. 'a photo of a boston bull dog'.")
    k: int = Field(default=1, ge=1, le=5, description="How many references.")
    min_similarity: float | None = Field(default=None, description="Relevance threshold; default: the profile's.")
    state: Annotated[Any, InjectedState] = None


class RegenerateArgs(BaseModel):
    """Generate again from the prompt, conditioned on retrieved reference images."""

    prompt: str = Field(description="The full text prompt to draw.")
    reference_ids: list[str] = Field(description="Ids of references returned by retrieve.")
    seed: int = Field(default=0, description="Random seed.")
    state: Annotated[Any, InjectedState] = None
