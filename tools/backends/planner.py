"""Objects and concepts: decomposition of a prompt, and a thread's next message read as typed changes.

Structured LLM output when an LLM is configured; an offline rule-based parser otherwise. Both give each object an
identity (tools.types.SceneObject) and read a message into the changes of tools.revision, checked and applied there
the same way whichever reader read them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from imagerag.prompts import render
from imagerag.tools.backends.llm import LLMOutputError, structured_call
from imagerag.tools.grid import article
from imagerag.tools.revision import (
    OPEN_VOCABULARY,
    Applied,
    ChangeList,
    Refusal,
    Understanding,
    Vocabulary,
    adjective_groups,
    apply_changes,
    check_changes,
    describe,
    objects_of_concepts,
    seen_boxes,
    understand_by_rules,
)
from imagerag.tools.types import Box, Concept, ConceptKind, ScenePlan


class ConceptSpec(BaseModel):
    text: str = Field(description="The concept, stand-alone, in a few words.")
    kind: ConceptKind = "object"
    parent: int | None = Field(
        default=None, description="1-based index of the concept this one depends on (an attribute's object), or null."
    )
    box: Box | None = Field(
        default=None,
        description="For an object: where it goes in the image, as fractions of its size (as LMD plans a layout).",
    )
    attribute: str | None = Field(
        default=None, description="For an attribute: which kind it is ('colour', 'size', 'material', ...); else null."
    )


class ConceptList(BaseModel):
    concepts: list[ConceptSpec] = Field(min_length=1)


class Decomposer(Protocol):
    """Splits a prompt into concepts; a SceneReader also keeps objects with identity and reads a thread's messages."""

    def decompose(self, prompt: str) -> tuple[list[Concept], int]: ...


@runtime_checkable
class SceneReader(Protocol):
    """A decomposer that also keeps objects with identity and reads messages as typed changes (both built-in ones)."""

    vocabulary: Vocabulary

    def plan(self, prompt: str) -> tuple[ScenePlan, list[Concept], int]: ...

    def understand(
        self,
        message: str,
        scene: ScenePlan,
        *,
        boxes: Mapping[str, Box] | None = None,
        previous: ScenePlan | None = None,
    ) -> Understanding: ...


def number(specs: list[ConceptSpec], owners: Sequence[int] | None = None) -> list[Concept]:
    """Concepts c1, c2, ... with duplicates dropped and parent indices turned into ids. `owners`: for each spec the
    1-based position of the object it belongs to; then only concepts of one object can be duplicates, so two
    objects of one shape stay two ('a red square on the left and a blue square on the right')."""
    concepts: list[Concept] = []
    index_to_id: dict[int, str] = {}
    seen: dict[tuple[str, str, int | None], str] = {}
    for i, spec in enumerate(specs, 1):
        key = (spec.text.strip(), spec.kind, owners[i - 1] if owners else None)
        if not key[0]:
            continue
        if key in seen:
            index_to_id[i] = seen[key]
            continue
        concept_id = seen[key] = index_to_id[i] = f"c{len(concepts) + 1}"
        concepts.append(Concept(id=concept_id, text=key[0], kind=spec.kind, box=spec.box, attribute=spec.attribute))
    parents = {
        index_to_id[i]: index_to_id.get(s.parent) for i, s in enumerate(specs, 1) if i in index_to_id and s.parent
    }
    return [
        c.model_copy(update={"depends_on": [p] if (p := parents.get(c.id)) and p != c.id else []}) for c in concepts
    ]


class _ObjectPlanner(ABC):
    """What the built-in decomposers share: `decompose` is `plan` without the objects."""

    @abstractmethod
    def plan(self, prompt: str) -> tuple[ScenePlan, list[Concept], int]: ...

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        _, concepts, tokens = self.plan(prompt)
        return concepts, tokens


class LLMDecomposer(_ObjectPlanner):
    def __init__(self, llm: BaseChatModel, retries: int = 3, vocabulary: Vocabulary = OPEN_VOCABULARY):
        self.llm, self.retries, self.vocabulary = llm, retries, vocabulary

    def plan(self, prompt: str) -> tuple[ScenePlan, list[Concept], int]:
        """The prompt's objects (each with an id) and concepts (each naming its object)."""
        answer, tokens = structured_call(
            self.llm, ConceptList, [HumanMessage(render("decompose", prompt=prompt))], self.retries
        )
        scene, concepts = objects_of_concepts(number(answer.concepts), self.vocabulary)
        return scene, concepts, tokens

    def understand(
        self,
        message: str,
        scene: ScenePlan,
        *,
        boxes: Mapping[str, Box] | None = None,
        previous: ScenePlan | None = None,
    ) -> Understanding:
        """The message as typed changes through structured output, checked as the rules' are: a change naming an
        object, value or place the scene or the world does not have is refused; an answer that never parses refuses
        the whole message."""
        prompt = render(
            "revise",
            objects=[(o.id, describe(o, scene)) for o in scene.objects],
            extras=[d.text for d in scene.extras],
            focus=[i for i in scene.focus if scene.object(i)],
            vocabulary=self.vocabulary.describe(),
            closed=self.vocabulary.closed,
            can_undo=previous is not None,
            message=message,
        )
        try:
            answer, tokens = structured_call(self.llm, ChangeList, [HumanMessage(prompt)], self.retries)
        except LLMOutputError as error:
            reason = f"the language model's answer could not be read as changes ({error})"
            return Understanding(refusals=[Refusal(clause=message, reason=reason)])
        checked = check_changes(answer.changes, scene, self.vocabulary, boxes, previous)
        refusals = [*answer.refusals, *checked.refusals]
        return checked.model_copy(update={"refusals": refusals, "tokens": tokens})


class RuleDecomposer(_ObjectPlanner):
    """Offline parser, in the spirit of DSG. Splits a prompt into noun-phrase clauses (at commas, semicolons, and
    'and'/'with' before a determiner; 'black and white photo' stays whole), then each clause into its object
    ('a heart'), one attribute per adjective ('a red heart') and its relation ('a heart on the left'); attributes
    and relations depend on their object. Style phrases become style concepts. Each object gets an id: two squares
    are two objects. Messages are read by tools.revision's rules (`understand`). An LLM does all of this far
    better; this keeps the system usable offline.
    """

    def __init__(self, vocabulary: Vocabulary = OPEN_VOCABULARY):
        self.vocabulary = vocabulary

    _FRAME = re.compile(r"^(a |an )?(photo|picture|image|painting|drawing|render(ing)?) of ", re.IGNORECASE)
    _SPLIT = re.compile(
        r"\s*[,;]\s*(?:and\s+)?|\s+(?:and|with|next to|beside)\s+(?=(?:a|an|the|one|two|three|four|five|some|\d+)\b)",
        re.IGNORECASE,
    )
    _STYLE = re.compile(
        r"\b(style|watercolou?r|oil painting|sketch|pixel art|cartoon|anime|photorealistic|3d render|low poly)\b",
        re.IGNORECASE,
    )

    def clauses(self, text: str) -> list[str]:
        body = self._FRAME.sub("", text.strip().rstrip("."))
        return [c.strip() for c in self._SPLIT.split(body) if c and c.strip()]

    _DETERMINER = re.compile(r"^(a|an|the|one|two|three|four|five|six|some|\d+)\s+", re.IGNORECASE)
    _RELATION = re.compile(
        r"\s+(?=(?:on|in|at|by|near|under|over|above|below|behind|beside|inside|next|with|wearing|holding|of|to)\b)",
        re.IGNORECASE,
    )

    _RELATED = re.compile(
        r"\b(?:of|on|in|at|by|above|below|under|over|beside|behind|near)\s+((?:a|an|one)\s+.+)$", re.IGNORECASE
    )

    def specs(self, text: str, offset: int = 0) -> list[ConceptSpec]:
        """Concepts of `text`; parents are 1-based positions counted after `offset` earlier concepts."""
        specs: list[ConceptSpec] = []
        for clause in self.clauses(text):
            if self._STYLE.search(clause):
                specs.append(ConceptSpec(text=clause, kind="style"))
                continue
            specs += self._clause_specs(clause, parent=offset + len(specs) + 1)
        return specs

    def _clause_specs(self, clause: str, parent: int) -> list[ConceptSpec]:
        determiner = self._DETERMINER.match(clause)
        body = clause[determiner.end() :] if determiner else clause
        head, _, relation = (self._RELATION.split(body, maxsplit=1) + [""])[:2], None, None
        phrase, relation = head[0].split(), head[1]
        if not phrase:
            return [ConceptSpec(text=clause)]
        noun, adjectives = phrase[-1], adjective_groups(phrase[:-1])
        word = determiner.group(1).lower() if determiner else "a"
        counted = word not in ("a", "an", "the", "one", "some")
        det = word if counted else article(noun)
        obj = ConceptSpec(text=f"{det} {noun}", kind="count" if counted else "object")
        if not adjectives and not relation:
            return [obj]
        parts = [obj] + [
            ConceptSpec(
                text=f"{article(a)} {a} {noun}" if not counted else f"{det} {a} {noun}",
                kind="attribute",
                parent=parent,
            )
            for a in adjectives
        ]
        if relation:
            parts.append(ConceptSpec(text=f"{det} {noun} {relation.strip()}", kind="relation", parent=parent))
            # 'a cat to the left of a red sofa': the sofa is a concept of its own too.
            if related := self._RELATED.search(relation):
                parts += self._clause_specs(related.group(1), parent=parent + len(parts))
        return parts

    def plan(self, prompt: str) -> tuple[ScenePlan, list[Concept], int]:
        """The prompt's objects (each with an id) and concepts (each naming its object)."""
        specs = self.specs(prompt) or [ConceptSpec(text=prompt.strip())]
        owners = [s.parent or i for i, s in enumerate(specs, 1)]
        scene, concepts = objects_of_concepts(number(specs, owners), self.vocabulary)
        return scene, concepts, 0

    def understand(
        self,
        message: str,
        scene: ScenePlan,
        *,
        boxes: Mapping[str, Box] | None = None,
        previous: ScenePlan | None = None,
    ) -> Understanding:
        """The message's clauses as checked changes, or refusals quoting the clauses (tools.revision)."""
        return understand_by_rules(message, scene, self.vocabulary, boxes, previous)


class TurnRevision(BaseModel):
    """A thread's next message read and, when understood, applied. `applied` is None when any clause was refused or
    the message asks for nothing: the turn then ends with status needs_clarification and `understanding.message`,
    the thread untouched."""

    understanding: Understanding
    applied: Applied | None = None


def revise_turn(
    reader: SceneReader,
    scene: ScenePlan,
    concepts: list[Concept],
    message: str,
    *,
    seen: Mapping[str, Box] | None = None,
    previous: ScenePlan | None = None,
) -> TurnRevision:
    """What a thread's next turn starts from. `seen`: concept id -> box where the critic saw each object on the
    best image (a removed object's absent concept is judged there; 'the square on the left' is resolved there when
    the square has no cell of its own). `previous`: the previous turn's scene, for 'undo'."""
    boxes = seen_boxes(concepts, seen or {})
    understanding = reader.understand(message, scene, boxes=boxes, previous=previous)
    if not understanding.understood:
        return TurnRevision(understanding=understanding)
    applied = apply_changes(
        scene, concepts, understanding.changes, seen=seen, previous=previous, vocabulary=reader.vocabulary
    )
    return TurnRevision(understanding=understanding, applied=applied)
