"""Critics: judge each concept on one image. The VLM judge when an LLM is configured, else the CLIP judge."""

from __future__ import annotations

import functools
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from PIL import Image
from pydantic import BaseModel

from imagerag.prompts import render
from imagerag.tools.backends.clip import ClipEmbedder
from imagerag.tools.backends.layout import isolate, occupied_cells
from imagerag.tools.backends.llm import image_data_url, structured_call
from imagerag.tools.files import content_id
from imagerag.tools.grid import (
    CELL_BOXES,
    CELL_NAMES,
    NUMBERS,
    article,
    cell_of,
    named_cell,
    relation_object,
    relation_sign,
    singular,
)
from imagerag.tools.types import REFERENCE_ID, Box, Concept, ConceptVerdict, Critique


class Critic(Protocol):
    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str) -> Critique: ...


class Locator(Protocol):
    def locate(self, image: Image.Image, texts: list[str]) -> list[Box | None]:
        """Where each text's object is in the image; None where it is not found."""
        ...


@runtime_checkable
class Verifier(Protocol):
    """A critic that can check its own 'everything is there' before a run stops on it (the checked stop)."""

    def verify(
        self, image: Image.Image, concepts: list[Concept], verdicts: list[ConceptVerdict]
    ) -> list[ConceptVerdict]:
        """The verdicts, with those a second, stricter look does not confirm turned to missing (evidence says why)."""
        ...


@runtime_checkable
class StrayFinder(Protocol):
    """A critic of a closed world (it knows every noun, and the background is blank), which can tell where an image
    holds an object that no concept asks for."""

    def strays(self, image: Image.Image, concepts: list[Concept], verdicts: list[ConceptVerdict]) -> list[Box]:
        """The cells holding an object that no concept accounts for, given the image's verdicts."""
        ...


class CellCache:
    """What the CLIP judge computes once per image: the embeddings of its grid cells, each alone on the image's
    background. The last `size` images are kept in memory, by their pixels; a collection's images (which
    ReferenceStore.load_image marks with their id) are also kept in `folder`, so a reference is embedded once, not
    once for every query or process that finds it."""

    def __init__(self, folder: Path | None = None, size: int = 1024):
        self.folder, self.size = folder, size
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, image: Image.Image, compute: Callable[[], np.ndarray]) -> np.ndarray:
        key = content_id(f"{image.size}".encode() + image.tobytes())
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        image_id = image.info.get(REFERENCE_ID)
        path = self.folder / f"{image_id}.npy" if self.folder is not None and image_id else None
        if path is not None and path.exists():
            cells = np.load(path)
        else:
            cells = compute()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                part = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # whole or absent: readers never see half
                np.save(part, cells)
                part.replace(path)
        self._memory[key] = cells
        if len(self._memory) > self.size:
            self._memory.popitem(last=False)
        return cells


class ClipJudge:
    """Cosine similarity of each concept's text with the image against a calibrated threshold. Works offline.

    A whole-image cosine cannot say where things are, so concepts of place are judged from where CLIP finds their
    objects, cell by cell of a 3x3 grid (each cell alone on the image's background): "a star in the top left" holds
    when the star's best cell is the top left, "a star to the left of a ring" when the star's cell is left of the
    ring's, "two stars" when exactly two cells show a star. Objects get the box where they were found. An absent
    object (one a message removed: "no red square") holds when no drawn cell shows it: anywhere when no other object
    of its noun is asked for, else in the cell where it was. Two objects of one noun, each with a cell of its own ("a
    red square on the left and a blue square on the right"), are each judged in their own cell: the object, its place
    and its attributes there, not in whichever cell shows a square best (one of the two).

    The score is a logistic of the margin over the threshold (0.5 at the threshold), so candidates can be
    ranked by how clearly they pass, not only by how many concepts pass.
    """

    SHARPNESS = 0.02  # similarity margin that moves the score from 0.5 to 0.73

    def __init__(
        self,
        embedder: ClipEmbedder,
        threshold: float,
        rivals: Mapping[str, Sequence[str]] | None = None,
        cache: CellCache | None = None,
        stop_margin: float = 0.0,
    ):
        self.embedder, self.threshold, self.stop_margin = embedder, threshold, stop_margin
        self.cache = cache or CellCache()
        # The same few concept texts are judged on every image (re-ranking judges 20 hits a query): embed each once.
        self.text = functools.lru_cache(maxsize=4096)(lambda text: embedder.embed_texts([text])[0])
        # What an object and an attribute are checked against in the object's own cell, in a closed world: its
        # nouns ("object") and the values of each attribute kind ("colour": red, green, ...).
        self.rivals = {kind: tuple(values) for kind, values in (rivals or {}).items()}

    def verify(
        self, image: Image.Image, concepts: list[Concept], verdicts: list[ConceptVerdict]
    ) -> list[ConceptVerdict]:
        """The checked stop: each object looked at again in its own cell, where it must read more as its noun than
        as any rival noun, by `stop_margin` (a badly drawn star passes "a star" on its own, yet reads nearly as much as
        a semicircle); each attribute judged in its object's cell, not in whichever cell shows it best (a red square
        must not make the star red), and there more as its value than as any other value of its kind (an orange star
        is no red one)."""
        cells = _CellScores(self, image)
        by_id = {c.id: c for c in concepts}
        own = _own_cells(concepts)

        def missing(v: ConceptVerdict, why: str) -> ConceptVerdict:
            return v.model_copy(update={"satisfied": False, "score": min(v.score, 0.49), "evidence": why})

        out = []
        for v in verdicts:
            concept = by_id.get(v.concept_id)
            if concept is None or not v.satisfied:
                out.append(v)
                continue
            words = concept.text.split()
            noun = singular(words[-1].lower())
            if concept.kind == "object" and noun in self.rivals.get("object", ()):
                cell = own.get(concept.object_id or "") or cells.best(concept.text)[0]
                seen = cells.all(concept.text)[cell]
                rival, best = _rival(cells, cell, self._rival_nouns(noun), "{}")
                if best + self.stop_margin >= seen:
                    v = missing(v, f"in its cell ({cell}) it reads too much as {rival} ({best:.3f} vs {seen:.3f})")
            elif concept.kind == "attribute" and concept.depends_on and concept.depends_on[0] in by_id:
                cell = own.get(concept.object_id or "") or cells.best(by_id[concept.depends_on[0]].text)[0]
                here = cells.all(concept.text)[cell]
                value = " ".join(words[1:-1]).lower()
                kind = next((vs for k, vs in self.rivals.items() if k != "object" and value in vs), ())
                rival, best = _rival(cells, cell, [o for o in kind if o != value], f"{{}} {words[-1]}")
                if here < self.threshold:
                    why = f"not in its object's cell ({cell}): CLIP similarity {here:.3f} (threshold {self.threshold:.3f})"
                    v = missing(v, why)
                elif best >= here:
                    v = missing(v, f"its object's cell ({cell}) reads more as {rival} ({best:.3f} >= {here:.3f})")
            out.append(v)
        return out

    def strays(self, image: Image.Image, concepts: list[Concept], verdicts: list[ConceptVerdict]) -> list[Box]:
        """In a closed world (the critic knows the world's nouns), the drawn cells that read as one of its objects and
        that no concept accounts for: not the cell of an object found (its verdict's box), nor one a count found its
        noun in. [] in an open world, and when an object passed without a box (then where it is is not known)."""
        nouns = self.rivals.get("object")
        if not nouns:
            return []
        cells = _CellScores(self, image)
        passed = {v.concept_id: v for v in verdicts if v.satisfied}
        explained: set[str] = set()
        for concept in concepts:
            verdict = passed.get(concept.id)
            if verdict is None:
                continue
            if concept.kind == "object":
                if verdict.box is None:
                    return []
                explained.add(cell_of(verdict.box))
            elif concept.kind == "count" and (counted := self._counted(concept, cells)) is not None:
                explained.update(counted[2])
        return [
            CELL_BOXES[cell]
            for cell in CELL_NAMES
            if cell in cells.occupied
            and cell not in explained
            and _rival(cells, cell, nouns, "{}")[1] >= self.threshold
        ]

    def _counted(self, concept: Concept, cells: _CellScores) -> tuple[int, str, list[str]] | None:
        """Of a count ('two red stars'): how many it wants, the thing counted ('a red star') and the drawn cells
        that show it; None when the concept is no count of this form."""
        words = concept.text.split()
        if len(words) < 2 or words[0].lower() not in NUMBERS:
            return None
        thing = " ".join([article(" ".join(words[1:])), *words[1:-1], singular(words[-1])])
        # Only cells with something drawn count: a blank cell can still score above the threshold.
        found = [cell for cell, sim in cells.all(thing).items() if sim >= self.threshold and cell in cells.occupied]
        return NUMBERS[words[0].lower()], thing, found

    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str = "") -> Critique:
        whole = np.stack([self.text(c.text) for c in concepts]) @ self.embedder.embed_images([image])[0]
        cells = _CellScores(self, image)
        nouns = [singular(c.text.split()[-1].lower()) for c in concepts if c.kind in ("object", "count")]
        own = _own_cells(concepts, prompt)
        verdicts = []
        for concept, similarity in zip(concepts, whole.tolist(), strict=True):
            spatial: tuple[bool, float, str] | None
            if concept.kind == "absent":
                spatial = self._absent(concept, cells, nouns.count(singular(concept.text.split()[-1].lower())))
            elif (cell := own.get(concept.object_id or "")) is not None:
                spatial = self._in_own_cell(concept, cells, cell)
            else:
                spatial = self._spatial(concept, cells)
            satisfied, similarity, evidence = spatial or (
                similarity >= self.threshold,
                similarity,
                f"CLIP similarity {similarity:.3f} (threshold {self.threshold:.3f})",
            )
            box = None
            if concept.kind == "object" and satisfied:
                mine = own.get(concept.object_id or "")  # a twin's box is its own cell
                cell, best = (mine, similarity) if mine is not None else cells.best(concept.text)
                box = CELL_BOXES[cell] if best >= self.threshold else None
            score = 1.0 / (1.0 + math.exp(-(similarity - self.threshold) / self.SHARPNESS))
            verdicts.append(
                ConceptVerdict(
                    concept_id=concept.id,
                    satisfied=satisfied,
                    score=score if satisfied else min(score, 0.49),
                    evidence=evidence,
                    caption=None if satisfied or concept.kind == "absent" else concept.text,
                    box=box,
                )
            )
        return Critique(verdicts=verdicts)

    def _spatial(self, concept: Concept, cells: _CellScores) -> tuple[bool, float, str] | None:
        """(satisfied, similarity, evidence) of a concept of place, relation or count; None for any other."""
        words = concept.text.split()
        if concept.kind == "attribute":  # bound to one object: the cell that shows it best, alone
            cell, best = cells.best(concept.text)
            return (
                best >= self.threshold,
                best,
                f"best in the {cell}: CLIP similarity {best:.3f} (threshold {self.threshold:.3f})",
            )
        if concept.kind == "count" and (counted := self._counted(concept, cells)) is not None:
            wanted, thing, found = counted
            best = max(cells.all(thing).values())
            return len(found) == wanted, best, f"{thing!r} found in {len(found)} cell(s): {', '.join(found) or 'none'}"
        if concept.kind != "relation" or len(words) < 3:
            return None
        subject = " ".join(words[:2])
        if place := named_cell(concept.text):
            at, best = cells.best(subject)
            there = cells.all(subject)[place]
            ok = at == place and best >= self.threshold
            return (
                ok,
                there if ok else min(there, self.threshold - 0.001),
                f"{subject!r} found best in the {at} ({best:.3f})",
            )
        sign, other = relation_sign(concept.text), relation_object(concept.text)
        if sign is None or other is None:
            return None
        # A relation is about places: the other object's own attributes ("a small blue ring") are concepts of their
        # own. Its phrase picks its cell (of two rings, the blue one), its noun alone must be seen there: a ring
        # drawn cyan still stands where the relation asks. Each end must read more as its noun than as any rival
        # noun in its cell (a rare shape scores near the threshold in cells that hold something else).
        noun = singular(other.split()[-1].lower())
        (a, sa), (b, _) = cells.best(subject), cells.best(other)
        sb = cells.all(f"{article(noun)} {noun}")[b]
        (ar, ac), (br, bc) = divmod(CELL_NAMES.index(a), 3), divmod(CELL_NAMES.index(b), 3)
        placed = (sign[0] == 0 or (ac - bc) * sign[0] > 0) and (sign[1] == 0 or (ar - br) * sign[1] > 0)
        beaten = []
        for cell, end, seen in ((a, singular(words[1].lower()), sa), (b, noun, sb)):
            rival, best = _rival(cells, cell, self._rival_nouns(end), "{}")
            if best >= seen:
                beaten.append(f"the {cell} reads more as {rival} ({best:.3f})")
        ok = placed and min(sa, sb) >= self.threshold and a != b and not beaten
        similarity = min(sa, sb) if ok else min(sa, sb, self.threshold - 0.001)
        where = f"{subject!r} found in the {a} ({sa:.3f}), {other!r} in the {b} ({noun}: {sb:.3f})"
        return ok, similarity, "; ".join([where, *beaten])

    def _in_own_cell(self, concept: Concept, cells: _CellScores, cell: str) -> tuple[bool, float, str] | None:
        """(satisfied, similarity, evidence) of an object of a shared noun, its place ('a square on the left') or an
        attribute ('a small square'), judged in the object's own cell: seen there above the threshold, and there
        more as its noun than as any rival noun (an attribute: more as its value than as any other of its kind)."""
        words = concept.text.split()
        if concept.kind not in ("object", "relation", "attribute") or len(words) < 2:
            return None
        if concept.kind == "attribute":
            text, value = concept.text, " ".join(words[1:-1]).lower()
            kind = next((vs for k, vs in self.rivals.items() if k != "object" and value in vs), ())
            rival, best = _rival(cells, cell, [o for o in kind if o != value], f"{{}} {words[-1]}")
        else:  # the object, or its place: the object's noun in that cell
            text = " ".join(words[:2])
            rival, best = _rival(cells, cell, self._rival_nouns(singular(words[1].lower())), "{}")
        seen = cells.all(text)[cell]
        ok = seen >= self.threshold and cell in cells.occupied and best < seen
        why = f"{text!r} in its own cell ({cell}): {seen:.3f} (threshold {self.threshold:.3f})"
        if best >= seen:
            why += f"; it reads more as {rival} ({best:.3f})"
        return ok, seen if ok else min(seen, self.threshold - 0.001), why

    def _rival_nouns(self, noun: str) -> list[str]:
        return [n for n in self.rivals.get("object", ()) if n != noun]

    def _absent(self, concept: Concept, cells: _CellScores, others: int) -> tuple[bool, float, str]:
        """(satisfied, similarity, evidence) of an absent object: satisfied when no drawn cell shows it, anywhere when
        `others` (objects of its noun still asked for) is 0; else where it was (its box), or, with no box, in no
        more cells than those others fill. The similarity is mirrored about the threshold, so that the further
        below it the object scores, the higher the verdict's score."""
        words = concept.text.split()
        words = words[1:] if words and words[0].lower() == "no" else words
        thing = f"{article(' '.join(words))} {' '.join(words)}"
        scores = cells.all(thing)
        seen = [cell for cell, sim in scores.items() if sim >= self.threshold and cell in cells.occupied]
        where = cell_of(concept.box) if concept.box is not None else None
        if others == 0:
            gone, checked = not seen, [c for c in CELL_NAMES if c in cells.occupied]
        elif where is not None:
            gone, checked = where not in seen, [where] if where in cells.occupied else []
        else:
            gone, checked = len(seen) <= others, [c for c in CELL_NAMES if c in cells.occupied]
        similarity = max((scores[c] for c in checked), default=self.threshold - 5 * self.SHARPNESS)
        place = f"where it was ({where})" if others and where else "anywhere"
        evidence = f"{thing!r} seen in {', '.join(seen) or 'no cell'}; it must not be seen {place}"
        return gone, 2 * self.threshold - similarity, evidence

    def locate(self, image: Image.Image, texts: list[str]) -> list[Box | None]:
        """Where each text's object is: the cell whose content alone, on the image's background, CLIP matches best
        with the text; None when no cell reaches the judge's threshold."""
        cells = _CellScores(self, image)
        out: list[Box | None] = []
        for text in texts:
            cell, best = cells.best(text)
            out.append(CELL_BOXES[cell] if best >= self.threshold else None)
        return out


def _own_cells(concepts: Sequence[Concept], prompt: str = "") -> dict[str, str]:
    """Object id -> the cell its place concept names ('a square on the left'), for each object whose noun another
    object shares: there, not in the cell that shows its noun best, is where it is judged. The other object may not
    be among `concepts` (a new image is judged only on what it has no verdict for: an edit keeps the verdicts of
    what it did not redraw), so a noun the prompt names twice ('a red square ... and a blue square ...') counts too."""
    nouns = {c.object_id: singular(c.text.split()[-1].lower()) for c in concepts if c.kind == "object" and c.object_id}
    words = re.findall(r"[a-z]+", prompt.lower())
    shared = {o for o, noun in nouns.items() if list(nouns.values()).count(noun) > 1 or words.count(noun) > 1}
    return {
        c.object_id: cell
        for c in concepts
        if c.object_id in shared and c.kind == "relation" and (cell := named_cell(c.text)) is not None
    }


class _CellScores:
    """CLIP similarity of texts with each grid cell of one image shown alone on its background (embedded once)."""

    def __init__(self, judge: ClipJudge, image: Image.Image):
        self.judge, self.image = judge, image
        self._cells: np.ndarray | None = None
        self._texts: dict[str, dict[str, float]] = {}

    @functools.cached_property
    def occupied(self) -> set[str]:
        return occupied_cells(self.image)

    def all(self, text: str) -> dict[str, float]:
        if text not in self._texts:
            if self._cells is None:
                self._cells = self.judge.cache.get(self.image, self._embed_cells)
            sims = self._cells @ self.judge.text(text)
            self._texts[text] = dict(zip(CELL_NAMES, sims.tolist(), strict=True))
        return self._texts[text]

    def _embed_cells(self) -> np.ndarray:
        return self.judge.embedder.embed_images([isolate(self.image, box) for box in CELL_BOXES.values()])

    def best(self, text: str) -> tuple[str, float]:
        scores = self.all(text)
        cell = max(scores, key=scores.__getitem__)
        return cell, scores[cell]


def _rival(cells: _CellScores, cell: str, values: Sequence[str], pattern: str) -> tuple[str, float]:
    """Of the phrases `pattern` makes of `values` ('a diamond', 'a blue star'), the one that reads best in `cell`,
    with its similarity (-inf when there are none)."""
    phrases = [f"{article(p)} {p}" for p in (pattern.format(v) for v in values)]
    return max(((p, cells.all(p)[cell]) for p in phrases), key=lambda pair: pair[1], default=("nothing", -math.inf))


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
            # An absent object is never retrieved for: its verdict has no caption.
            by_id[c.id].model_copy(update={"caption": None, "box": None})
            if c.kind == "absent"
            # A missing concept always gets a retrieval caption: the concept itself when the VLM gave none.
            else by_id[c.id]
            if by_id[c.id].satisfied or by_id[c.id].caption
            else by_id[c.id].model_copy(update={"caption": text[c.id]})
            for c in concepts
        ]
        return Critique(verdicts=verdicts, tokens=tokens)
