"""The tools (generate, critique, retrieve, regenerate, edit) plus decomposition and layout, over injected backends.

Each tool is a plain method returning typed results. The agent policy exposes them to an LLM as LangChain tools
(graphs.agent_tools), where the run's state decides what a call may do.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from langchain_core.language_models import BaseChatModel

from imagerag.prompts import render
from imagerag.tools.backends.diffusion import Generator
from imagerag.tools.backends.images import ImageStore
from imagerag.tools.backends.judges import Critic
from imagerag.tools.backends.layout import clear, edit_margin, region_mask, rule_layout
from imagerag.tools.backends.planner import Decomposer, apply_revision
from imagerag.tools.backends.store import ReferenceStore, Reranker
from imagerag.tools.config import Profile
from imagerag.tools.types import Box, Candidate, Concept, Critique, Edit, EditRegion, RetrievalHit


def critic_reranker(critic: Critic, decomposer: Decomposer) -> Reranker:
    """Hits ordered by how many of the caption's concepts the critic sees in each image, then by its mean score,
    then by CLIP's similarity: one cosine over the whole image cannot tell where an object is or which object has a
    colour, the critic's per-concept (and, offline, per-cell) reading can."""

    def rerank(caption: str, hits: list[RetrievalHit]) -> list[RetrievalHit]:
        concepts, _ = decomposer.decompose(caption)

        def key(hit: RetrievalHit) -> tuple[int, float, float]:
            verdicts = critic.critique(ReferenceStore.load_image(hit), concepts, caption).verdicts
            return sum(v.satisfied for v in verdicts), sum(v.score for v in verdicts) / len(verdicts), hit.similarity

        return sorted(hits, key=key, reverse=True)

    return rerank


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


def _on_step(step: int, total: int) -> None:
    _stream_progress({"event": "diffusion_step", "step": step, "total": total})


class Toolkit:
    def __init__(self, backends: Backends, images: ImageStore):
        self.backends, self.images = backends, images

    @property
    def max_references(self) -> int:
        return self.backends.generator.max_references

    @property
    def max_region_references(self) -> int:
        return self.backends.generator.max_region_references

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        return self.backends.decomposer.decompose(prompt)

    def layout(self, concepts: list[Concept]) -> dict[str, Box]:
        """A box per object concept, where it should go: the planner's box when it gave one (an LLM planner does,
        in the same structured answer as the concepts), else rules on position and relation words."""
        return {**rule_layout(concepts), **{c.id: c.box for c in concepts if c.box is not None}}

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

    def retrieve(
        self, caption: str, k: int = 1, min_similarity: float | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> list[RetrievalHit]:
        """Reference images for one caption, none below the relevance threshold."""
        threshold = self.backends.min_similarity if min_similarity is None else min_similarity
        hits = self.backends.store.search(caption, k, threshold, exclude, **self._reranking())
        _stream_progress({"event": "retrieved", "caption": caption, "hits": [h.model_dump() for h in hits]})
        return hits

    def retrieve_many(
        self, captions: list[str], k: int = 1, exclude: AbstractSet[str] = frozenset()
    ) -> list[RetrievalHit]:
        """Hits for several captions, no image twice."""
        hits = self.backends.store.search_many(captions, k, self.backends.min_similarity, exclude, **self._reranking())
        _stream_progress({"event": "retrieved", "captions": captions, "hits": [h.model_dump() for h in hits]})
        return hits

    def _reranking(self) -> dict:
        n = self.backends.profile.rerank_k
        return {"reranker": critic_reranker(self.backends.critic, self.backends.decomposer), "fetch_k": n} if n else {}

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
    ) -> Candidate:
        """Redraw only inside `regions` of a stored image, from their texts and the references, keeping the rest.
        Regions with no text are cleared to the background (what was there is removed or moved away). A region that
        names its own references (`reference_ids`, from `references`) gets the first of them acting inside it alone;
        otherwise the references act over every redrawn region."""
        source = self.images.get(image_id)
        margin = edit_margin(source.size)
        image = clear(source, [r.box for r in regions if not r.text], margin)
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
            mask = region_mask(image.size, [r.box for r in drawn], margin)
            masks = [region_mask(image.size, [r.box], margin) for r, _ in own]
            image, exact = self.backends.generator.edit(
                image, mask, text, seed, [ReferenceStore.load_image(h) for h in references], masks, on_step=_on_step
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

    def _draw(
        self, prompt: str, conditioned: str, seed: int, n: int, references: list[RetrievalHit], round: int, turn: int
    ) -> list[Candidate]:
        images = self.backends.generator.generate(
            conditioned, seed, n, [ReferenceStore.load_image(h) for h in references], on_step=_on_step
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
