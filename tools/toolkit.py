"""The tools (generate, critique, retrieve, regenerate, edit) plus decomposition and layout, over injected backends.

This module is the one door from the graphs to the backends (a forbidden import contract in pyproject.toml keeps it
so): each tool is a plain method returning typed results, and the few checks a graph node makes on pixels (an
uploaded reference, the cells an image fills) are functions here. The agent policy exposes the tools to an LLM as
LangChain tools (graphs.agent_tools), where the run's state decides what a call may do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import IO, Any

from langchain_core.messages import BaseMessage
from langchain_core.tools import BaseTool
from PIL import Image

from imagerag.prompts import render
from imagerag.tools.backends.images import ImageStore
from imagerag.tools.backends.judges import StrayFinder, Verifier
from imagerag.tools.backends.layout import clear, edit_margin, object_view, occupied_cells, region_mask
from imagerag.tools.backends.llm import tokens_of
from imagerag.tools.backends.loading import Backends, load_backends
from imagerag.tools.backends.planner import SceneReader, TurnRevision, revise_turn
from imagerag.tools.backends.store import ImageTooLarge, ReferenceStore, check_pixels, reference_cache
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import atomic_write, content_id
from imagerag.tools.grid import rule_layout
from imagerag.tools.revision import objects_of_concepts
from imagerag.tools.types import (
    Box,
    Candidate,
    Concept,
    ConceptVerdict,
    Critique,
    Edit,
    EditRegion,
    RetrievalHit,
    ScenePlan,
)

# What the graphs may use: the tools, the backends they run on, and the checks on a person's uploads.
__all__ = ["Backends", "Progress", "Toolkit", "check_image", "keep_upload", "load_backends"]

Progress = Callable[[dict[str, Any]], None]  # LangGraph's stream writer, handed in by the node


def check_image(source: Path | IO[bytes], what: str) -> str:
    """The format (lower case, e.g. 'png') of an image PIL decodes within MAX_IMAGE_PIXELS (checked from its header,
    before decoding); ValueError naming `what` otherwise."""
    try:
        with Image.open(source) as image:
            check_pixels(image.size, what)
            image.load()
            return (image.format or "image").lower()
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, raised by open before ours is checked
        raise ImageTooLarge(f"{what}: {error}") from None
    except Exception as error:  # noqa: BLE001 - hostile bytes make PIL raise many kinds of error: all mean "no image"
        raise ValueError(
            f"{what} is not an image PIL can read ({error.__class__.__name__}): send a PNG, JPEG or other image"
        ) from None


def keep_upload(data_dir: Path, data: bytes, kind: str) -> tuple[str, Path]:
    """Store a person's reference image (bytes already checked by check_image) in the data folder's reference cache,
    content-addressed: one of the folders a reference may be read from. Its id and path."""
    image_id = content_id(data)
    return image_id, atomic_write(reference_cache(data_dir) / f"{image_id}.{kind}", data)


class Toolkit:
    """The tools of one run: shared backends, the run's own image folder, and where progress events go."""

    def __init__(
        self,
        backends: Backends,
        images: Path,
        progress: Progress | None = None,
        check_stop: bool = True,
        object_references: bool = True,
    ):
        self.backends, self.images = backends, ImageStore(images)
        self._progress = progress
        self.check_stop, self.object_references = check_stop, object_references

    def _report(self, event: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress(event)

    def _on_step(self, step: int, total: int) -> None:
        self._report({"event": "diffusion_step", "step": step, "total": total})

    @property
    def max_references(self) -> int:
        return self.backends.generator.max_references

    @property
    def max_region_references(self) -> int:
        return self.backends.generator.max_region_references

    def converse(self, messages: Sequence[BaseMessage], tools: Sequence[BaseTool]) -> tuple[BaseMessage, int]:
        """One reply of the agent's LLM with `tools` bound, and the tokens it cost."""
        if self.backends.llm is None:
            raise ConfigError(
                "the agent policy needs an LLM: set IMAGERAG_LLM__MODEL (and IMAGERAG_LLM__BASE_URL for vLLM or "
                "Ollama), or use --policy imagerag"
            )
        reply = self.backends.llm.bind_tools(tools).invoke(list(messages))
        return reply, tokens_of(reply)

    def occupied_cells(self, image_id: str) -> set[str]:
        """The grid cells of a stored image that hold something other than its background."""
        return occupied_cells(self.images.get(image_id))

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        return self.backends.decomposer.decompose(prompt)

    def layout(self, concepts: list[Concept]) -> dict[str, Box]:
        """A box per object concept, where it should go: the planner's box when it gave one (an LLM planner does,
        in the same structured answer as the concepts), else rules on position and relation words."""
        return {**rule_layout(concepts), **{c.id: c.box for c in concepts if c.box is not None}}

    def plan(self, prompt: str) -> tuple[ScenePlan, list[Concept], int]:
        """A new thread's objects (each with an id) and concepts (each naming its object), and the tokens spent."""
        decomposer = self.backends.decomposer
        if isinstance(decomposer, SceneReader):
            return decomposer.plan(prompt)
        concepts, tokens = decomposer.decompose(prompt)  # a decomposer that knows no objects: read them off
        scene, concepts = objects_of_concepts(concepts)
        return scene, concepts, tokens

    def revise_turn(
        self,
        scene: ScenePlan,
        concepts: list[Concept],
        message: str,
        seen: dict[str, Box],
        previous: ScenePlan | None,
    ) -> TurnRevision:
        """A thread's next message read as typed changes of its objects and, when every clause was understood,
        applied: the new objects, prompt and concepts. `seen`: where the critic saw each concept's object on the
        image the turn continues from; `previous`: the objects before that image's turn (what 'undo' returns to)."""
        decomposer = self.backends.decomposer
        if not isinstance(decomposer, SceneReader):
            raise ConfigError(
                f"the profile's decomposer ({type(decomposer).__name__}) reads no messages as changes of objects, so "
                "a thread cannot continue: name a decomposer with plan and understand (tools.backends.planner)"
            )
        return revise_turn(decomposer, scene, concepts, message, seen=seen, previous=previous)

    def generate(self, prompt: str, seed: int = 0, n: int = 1, round: int = 1, turn: int = 1) -> list[Candidate]:
        """Draw `n` images from text alone."""
        return self._draw(prompt, prompt, seed, n, [], round, turn)

    def critique(self, image_id: str, concepts: list[Concept], prompt: str) -> Critique:
        """Judge every concept on one stored image."""
        return self.backends.critic.critique(self.images.get(image_id), concepts, prompt)

    def verify(self, image_id: str, concepts: list[Concept], verdicts: list[ConceptVerdict]) -> list[ConceptVerdict]:
        """The checked stop's second look at an image the critic passed whole (unchanged when the critic has none or
        the run turned it off)."""
        critic = self.backends.critic
        if not self.check_stop or not isinstance(critic, Verifier):
            return verdicts
        return critic.verify(self.images.get(image_id), concepts, verdicts)

    def strays(self, image_id: str, concepts: list[Concept], verdicts: list[ConceptVerdict]) -> list[Box]:
        """Where a stored image holds an object no concept asks for; [] when the critic cannot tell (an open world,
        where a photograph holds much that nobody named)."""
        critic = self.backends.critic
        return critic.strays(self.images.get(image_id), concepts, verdicts) if isinstance(critic, StrayFinder) else []

    def retrieve(
        self, caption: str, k: int = 1, min_similarity: float | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> list[RetrievalHit]:
        """Reference images for one caption, none below the relevance threshold."""
        threshold = self.backends.min_similarity if min_similarity is None else min_similarity
        hits = self._located(self.backends.store.search(caption, k, threshold, exclude, **self._reranking()))
        self._report({"event": "retrieved", "caption": caption, "hits": [h.model_dump() for h in hits]})
        return hits

    def retrieve_many(
        self, captions: list[str], k: int = 1, exclude: AbstractSet[str] = frozenset()
    ) -> list[RetrievalHit]:
        """Hits for several captions, no image twice."""
        hits = self.backends.store.search_many(captions, k, self.backends.min_similarity, exclude, **self._reranking())
        hits = self._located(hits)
        self._report({"event": "retrieved", "captions": captions, "hits": [h.model_dump() for h in hits]})
        return hits

    def _located(self, hits: list[RetrievalHit]) -> list[RetrievalHit]:
        """With the profile's detector, each hit gets the box of its query's object, and within each query the hits
        where the object was found come first (the re-ranker, when the profile has one, located them already)."""
        locator = self.backends.locator
        if locator is None:
            return hits
        boxed = [h.model_copy(update={"box": locator.locate(ReferenceStore.load_image(h), [h.query])[0]}) for h in hits]
        queries = list(dict.fromkeys(h.query for h in hits))
        return sorted(boxed, key=lambda h: (queries.index(h.query), h.box is None))

    def _reranking(self) -> dict:
        reranker, n = self.backends.reranker, self.backends.profile.rerank_k
        return {"reranker": reranker, "fetch_k": n} if reranker is not None and n else {}

    def regenerate(
        self, prompt: str, references: list[RetrievalHit], seed: int = 0, round: int = 1, turn: int = 1, n: int = 1
    ) -> list[Candidate]:
        """Draw `n` images again, conditioned on reference images (at most the generator's limit)."""
        references = references[: self.max_references]
        template = self.backends.profile.generator.regenerate_template if references else "regenerate_plain"
        conditioned = render(template, prompt=prompt, references=references)
        return self._draw(prompt, conditioned, seed, n, references, round, turn)

    def edit(
        self,
        image_id: str,
        regions: list[EditRegion],
        references: list[RetrievalHit],
        seed: int = 0,
        round: int = 1,
        turn: int = 1,
        keep: Sequence[Box] = (),
    ) -> Candidate:
        """Redraw only inside `regions` of a stored image, from their texts and the references, keeping the rest.
        Regions with no text are cleared to the background (what was there is removed or moved away). A region that
        names its own references (`reference_ids`, from `references`) gets the first of them acting inside it alone;
        otherwise the references act over every redrawn region. `keep`: boxes of objects left alone, which the
        regions' margins stop at (rules.kept_boxes)."""
        source = self.images.get(image_id)
        margin = edit_margin(source.size)
        image = clear(source, [r.box for r in regions if not r.text], margin, keep)
        drawn = [r for r in regions if r.text]
        by_id = {h.id: h for h in references}
        own = [
            (r, next(by_id[i] for i in r.reference_ids if i in by_id))
            for r in drawn
            if set(r.reference_ids) & set(by_id)
        ]
        if own:
            own = own[: self.max_region_references]
            references = [h for _, h in own]
        else:
            references = references[: self.max_references]
        text = " and ".join(r.text for r in drawn)
        exact = True
        if drawn:
            spec = self.backends.profile.generator
            template = spec.edit_template or (spec.regenerate_template if references else "regenerate_plain")
            text = render(template, prompt=text, references=references)
            mask = region_mask(image.size, [r.box for r in drawn], margin, keep)
            masks = [region_mask(image.size, [r.box], margin, keep) for r, _ in own]
            image, exact = self.backends.generator.edit(
                image,
                mask,
                text,
                seed,
                [self._reference(h) for h in references],
                masks,
                on_step=self._on_step,
            )
        return Candidate(
            image_id=self.images.put(image),
            round=round,
            turn=turn,
            prompt=text,
            seed=seed,
            references=references,
            edit=Edit(source=image_id, regions=regions, exact_outside=exact),
        )

    def _reference(self, hit: RetrievalHit) -> Image.Image:
        """What the generator is handed for a hit: the object the critic located in it (seen as the profile's
        generator takes references), or the whole image when it has no box or the run asks for whole images."""
        image = ReferenceStore.load_image(hit)
        if hit.box is None or not self.object_references:
            return image
        return object_view(image, hit.box, self.backends.profile.generator.reference_view)

    def _draw(
        self, prompt: str, conditioned: str, seed: int, n: int, references: list[RetrievalHit], round: int, turn: int
    ) -> list[Candidate]:
        images = self.backends.generator.generate(
            conditioned, seed, n, [self._reference(h) for h in references], on_step=self._on_step
        )
        return [
            Candidate(
                image_id=self.images.put(image),
                round=round,
                turn=turn,
                prompt=conditioned,
                seed=seed + i,
                references=references,
            )
            for i, image in enumerate(images)
        ]
