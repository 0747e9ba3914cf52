"""Critics: judge each concept on one image. The VLM judge when an LLM is configured, else the CLIP judge."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from PIL import Image
from pydantic import BaseModel

from imagerag.prompts import render
from imagerag.tools.backends.clip import ClipEmbedder
from imagerag.tools.backends.layout import CELL_BOXES, background_colour
from imagerag.tools.backends.llm import image_data_url, structured_call
from imagerag.tools.types import Box, Concept, ConceptVerdict, Critique


class Critic(Protocol):
    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str) -> Critique: ...


class ClipJudge:
    """Cosine similarity of each concept's text with the image against a calibrated threshold. Works offline.

    The score is a logistic of the margin over the threshold (0.5 at the threshold), so candidates can be
    ranked by how clearly they pass, not only by how many concepts pass.
    """

    SHARPNESS = 0.02  # similarity margin that moves the score from 0.5 to 0.73

    def __init__(self, embedder: ClipEmbedder, threshold: float):
        self.embedder, self.threshold = embedder, threshold

    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str = "") -> Critique:
        image_embedding = self.embedder.embed_images([image])[0]
        similarities = self.embedder.embed_texts([c.text for c in concepts]) @ image_embedding
        objects = [
            c
            for c, s in zip(concepts, similarities.tolist(), strict=True)
            if c.kind == "object" and s >= self.threshold
        ]
        places = dict(zip((c.id for c in objects), self.locate(image, [c.text for c in objects]), strict=True))
        verdicts = []
        for concept, similarity in zip(concepts, similarities.tolist(), strict=True):
            satisfied = similarity >= self.threshold
            verdicts.append(
                ConceptVerdict(
                    concept_id=concept.id,
                    satisfied=satisfied,
                    score=1.0 / (1.0 + math.exp(-(similarity - self.threshold) / self.SHARPNESS)),
                    evidence=f"CLIP similarity {similarity:.3f} (threshold {self.threshold:.3f})",
                    caption=None if satisfied else concept.text,
                    box=places.get(concept.id),
                )
            )
        return Critique(verdicts=verdicts)

    def locate(self, image: Image.Image, texts: list[str], boxes: Sequence[Box] | None = None) -> list[Box | None]:
        """Where each text's object is: the box (default: the 3x3 grid's cells) whose content alone, on the image's
        background, CLIP matches best with the text; None when no box reaches the judge's threshold."""
        if not texts:
            return []
        boxes = list(boxes or CELL_BOXES.values())
        background = background_colour(image)
        crops = []
        for box in boxes:
            alone = Image.new("RGB", image.size, background)
            region = box.pixels(*image.size)
            alone.paste(image.crop(region), region[:2])
            crops.append(alone)
        sims = self.embedder.embed_texts(texts) @ self.embedder.embed_images(crops).T
        best = sims.argmax(axis=1).tolist()
        return [boxes[j] if float(sims[i, j]) >= self.threshold else None for i, j in enumerate(best)]


class VLMJudgement(BaseModel):
    """What the VLM returns: one verdict per concept id."""

    verdicts: list[ConceptVerdict]


class VLMJudge:
    """A vision-language model reads the image (as a data URL) and answers per concept, structured."""

    def __init__(self, llm: BaseChatModel, retries: int = 3):
        self.llm, self.retries = llm, retries

    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str) -> Critique:
        message = HumanMessage(
            content=[
                {"type": "text", "text": render("critique", prompt=prompt, concepts=concepts)},
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            ]
        )
        wanted = {c.id for c in concepts}

        def covers_every_concept(answer: VLMJudgement) -> str | None:
            got = {v.concept_id for v in answer.verdicts}
            return None if got == wanted else f"verdicts for {sorted(got)}, expected {sorted(wanted)}"

        answer, tokens = structured_call(self.llm, VLMJudgement, [message], self.retries, check=covers_every_concept)
        by_id = {v.concept_id: v for v in answer.verdicts}
        text = {c.id: c.text for c in concepts}
        verdicts = [
            # A missing concept always gets a retrieval caption: the concept itself when the VLM gave none.
            by_id[c.id]
            if by_id[c.id].satisfied or by_id[c.id].caption
            else by_id[c.id].model_copy(update={"caption": text[c.id]})
            for c in concepts
        ]
        return Critique(verdicts=verdicts, tokens=tokens)
