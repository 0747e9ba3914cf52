"""A thread's next message as typed changes of its objects, understood or refused, and one function that applies them.

A message is split into clauses ("make the heart red and move the ring to the bottom left" is two), each clause is
read as a typed change of the scene's objects (SetAttribute, Move, Add, Remove, Replace, Undo) or refused with the
reason, quoting the clause. Offline, rules read the clauses (RuleDecomposer.understand); with an LLM, the model
returns the same changes through structured output (LLMDecomposer.understand). Either way every change is checked
against the scene and the profile's vocabulary by `check_changes`, and applied by `apply_changes`, which rewrites the
object list, the prompt the generator draws from and the concept list (a concept whose object did not change keeps
its id and verdict; a removed object becomes an absent-object concept the critic judges).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from imagerag.tools.errors import ImageRAGError
from imagerag.tools.grid import (
    CELL_BOXES,
    CELL_NAMES,
    CELL_PHRASES,
    NUMBERS,
    article,
    cell_of,
    shifted,
    singular,
)
from imagerag.tools.types import Box, Concept, ConceptKind, Detail, SceneObject, ScenePlan

# ----------------------------------------------------------------------------- vocabulary

# English puts size before colour before material ('a large red wooden box'); kinds it does not know come last,
# next to the noun ('a brown boston bull').
ATTRIBUTE_ORDER: tuple[str, ...] = ("size", "age", "shape", "colour", "pattern", "material")

_OPEN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": (
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "pink",
        "black",
        "white",
        "grey",
        "gray",
        "brown",
        "gold",
        "golden",
        "silver",
        "cyan",
        "magenta",
        "black and white",
    ),
    "size": ("small", "large", "big", "tiny", "huge", "tall", "short", "little", "giant"),
    "age": ("old", "young", "new", "ancient"),
    "material": ("wooden", "metal", "glass", "plastic", "stone", "paper", "golden"),
    "pattern": ("striped", "dotted", "spotted", "checked", "plain"),
}
_COMPARATIVES = {"bigger": "large", "larger": "large", "smaller": "small", "taller": "tall", "shorter": "short"}
_OPEN_RELATIONS: tuple[str, ...] = (
    "to the left of",
    "to the right of",
    "left of",
    "right of",
    "in front of",
    "on top of",
    "next to",
    "above",
    "below",
    "under",
    "underneath",
    "beneath",
    "over",
    "behind",
    "beside",
    "near",
    "inside",
    "onto",
    "on",
    "in",
    "at",
    "by",
    "with",
    "wearing",
    "holding",
)


@dataclass(frozen=True)
class Vocabulary:
    """What a profile's generator can draw, for reading instructions.

    Closed (the miniature world): an object, colour, size, place or relation it does not know is refused. Open (real
    profiles): any noun and any adjective (an adjective of no known kind is a kind of its own); only clauses that do
    not parse are refused."""

    name: str
    attributes: Mapping[str, tuple[str, ...]]
    synonyms: Mapping[str, str] = field(default_factory=dict)
    nouns: frozenset[str] | None = None  # None: any noun
    relations: Mapping[str, str] = field(default_factory=lambda: {r: r for r in _OPEN_RELATIONS})
    one_per_cell: bool = False  # a grid world draws one object per cell: a move or add into a taken cell is refused

    @property
    def closed(self) -> bool:
        return self.nouns is not None

    def normalise(self, value: str) -> str:
        value = " ".join(value.lower().split())
        return self.synonyms.get(value, value)

    def kind_of(self, value: str) -> str | None:
        """The attribute kind of a value ('red' -> 'colour'), None when the vocabulary has none."""
        value = self.normalise(value)
        return next((kind for kind, values in self.attributes.items() if value in values), None)

    def knows_noun(self, noun: str) -> bool:
        return self.nouns is None or noun.lower() in self.nouns or singular(noun.lower()) in self.nouns

    def describe(self) -> str:
        """What it knows, for a refusal or an LLM's prompt."""
        if not self.closed:
            return "any object"
        kinds = "; ".join(f"{kind}: {', '.join(values)}" for kind, values in self.attributes.items())
        return (
            f"objects: {', '.join(sorted(self.nouns or ()))}; {kinds}; places: {', '.join(CELL_NAMES)}; "
            f"relations: {', '.join(sorted(set(self.relations.values())))}"
        )


OPEN_VOCABULARY = Vocabulary(name="open", attributes=_OPEN_ATTRIBUTES, synonyms=_COMPARATIVES)


def miniworld_vocabulary() -> Vocabulary:
    """The miniature world's shapes, colours, sizes, cells and relations (tools.miniworld.world)."""
    from imagerag.tools.miniworld.world import COLOUR_NAMES, PLURALS, RELATION_PHRASES, SHAPES, SIZE_NAMES

    relations = {phrase: phrase for phrase in RELATION_PHRASES.values()}
    relations |= {"left of": "to the left of", "right of": "to the right of"}
    relations |= {w: "above" for w in ("over", "on top of")} | {w: "below" for w in ("under", "underneath", "beneath")}
    size = {"big", "bigger", "larger", "huge", "giant"}
    return Vocabulary(
        name="mini",
        attributes={"colour": COLOUR_NAMES, "size": SIZE_NAMES},
        synonyms={w: "large" for w in size} | {w: "small" for w in ("smaller", "tiny", "little")},
        nouns=frozenset(SHAPES) | frozenset(PLURALS.values()),
        relations=relations,
        one_per_cell=True,
    )


def vocabulary_for(name: str) -> Vocabulary:
    """A profile's vocabulary by name (Profile.vocabulary): the miniature world's, or open."""
    return miniworld_vocabulary() if name == "miniworld" else OPEN_VOCABULARY


# ----------------------------------------------------------------------------- typed changes


class ObjectRef(BaseModel):
    """How a message names an object of the scene: by id, or by its noun, attribute words and cell."""

    id: str | None = Field(default=None, description="The object's id ('o2'), when known.")
    noun: str | None = Field(default=None, description="Its noun ('square'); 'shape', 'object' or null: any.")
    attributes: list[str] = Field(default_factory=list, description="Attribute words that pick it: ['red'].")
    cell: str | None = Field(default=None, description="The grid cell it is in, when the message says ('left').")
    pronoun: bool = Field(default=False, description="'it': the object the message spoke of last.")
    every: bool = Field(default=False, description="'the squares', 'both squares': every object that matches.")
    words: str = Field(default="", description="The words of the message that name it: 'the red square'.")


class NewObject(BaseModel):
    """An object a message adds (or puts in another's place)."""

    noun: str
    count: int = Field(default=1, ge=1)
    attributes: list[str] = Field(
        default_factory=list, description="Attribute values ('large', 'green'); each one's kind is read from it."
    )
    cell: str | None = Field(default=None, description="A grid cell: " + ", ".join(CELL_NAMES) + ".")
    relation: str | None = Field(default=None, description="Relation words to another object: 'to the left of'.")
    relative_to: ObjectRef | None = None
    place: str | None = Field(default=None, description="Place words no cell or relation says ('on the beach').")


class SetAttribute(BaseModel):
    """Give an object an attribute, replacing only its attribute of the same kind ('make the circle red')."""

    op: Literal["set_attribute"] = "set_attribute"
    clause: str = Field(default="", description="The words of the message this change carries out.")
    target: ObjectRef
    kind: str | None = Field(default=None, description="'colour', 'size', ...; null: read from the value.")
    value: str


class Move(BaseModel):
    """Put an object in a grid cell, or in a relation to another object ('move the ring to the bottom left')."""

    op: Literal["move"] = "move"
    clause: str = ""
    target: ObjectRef
    cell: str | None = None
    relation: str | None = None
    relative_to: ObjectRef | None = None
    place: str | None = None
    direction: Literal["up", "down", "left", "right"] | None = Field(
        default=None, description="One cell from where the object is now ('move the ring down'); checked into a cell."
    )


class Add(BaseModel):
    """Add one or more objects ('add a red circle and a blue square' is one Add of two)."""

    op: Literal["add"] = "add"
    clause: str = ""
    objects: list[NewObject] = Field(min_length=1)


class Remove(BaseModel):
    """Take an object out: the image must no longer show it."""

    op: Literal["remove"] = "remove"
    clause: str = ""
    target: ObjectRef


class Replace(BaseModel):
    """Put a new object in an object's place ('replace the square with a circle'): the new one takes the old one's
    place unless it names its own; the old one's attributes are not carried over."""

    op: Literal["replace"] = "replace"
    clause: str = ""
    target: ObjectRef
    by: NewObject


class Undo(BaseModel):
    """Go back to the previous turn's objects (and, in the graph, its image)."""

    op: Literal["undo"] = "undo"
    clause: str = ""


Change = Annotated[SetAttribute | Move | Add | Remove | Replace | Undo, Field(discriminator="op")]


class Refusal(BaseModel):
    """A clause not understood, and why; with candidates, a clarification: the clause could mean several objects."""

    clause: str = Field(description="The words of the message that were not understood, as written.")
    reason: str = Field(description="Why, in a sentence the user can act on.")
    candidates: list[str] = Field(default_factory=list, description="Ids of the objects a reference could mean.")

    @property
    def message(self) -> str:
        return f'"{self.clause}": {self.reason}'


class ChangeList(BaseModel):
    """What an LLM returns for a message: the changes it carries out, and the clauses it cannot map."""

    changes: list[Change] = Field(default_factory=list)
    refusals: list[Refusal] = Field(default_factory=list)


class Understanding(BaseModel):
    """A message read against a scene: checked changes (object references resolved to ids), or refusals."""

    changes: list[Change] = Field(default_factory=list)
    refusals: list[Refusal] = Field(default_factory=list)
    tokens: int = 0

    @property
    def understood(self) -> bool:
        return not self.refusals and bool(self.changes)

    @property
    def message(self) -> str:
        """What to tell the user when the turn cannot go on."""
        if not self.refusals:
            return "" if self.changes else "The message asks for no change."
        return "I did not understand " + "; ".join(r.message for r in self.refusals)


class Applied(BaseModel):
    """A scene after changes: its objects, the prompt the generator draws from, and the concepts to judge."""

    scene: ScenePlan
    prompt: str
    concepts: list[Concept]


class InstructionRefused(ImageRAGError):
    """A message the reviser could not map to changes; the refusals quote each clause and say why."""

    def __init__(self, refusals: Sequence[Refusal]):
        self.refusals = list(refusals)
        super().__init__("I did not understand " + "; ".join(r.message for r in self.refusals))


# ----------------------------------------------------------------------------- reading words

_DETERMINERS = {"a", "an", "the", "one", "some", "another", "this", "that"}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_PLACE_PREFIX = re.compile(r"^(?:(?:over\s+)?(?:to|into|in|at|on|onto|towards?)\s+)?(?:the\s+)?")
_CELL_SYNONYMS = {
    "upper": "top",
    "lower": "bottom",
    "center": "centre",
    "middle": "centre",
    "top centre": "top",
    "bottom centre": "bottom",
    "centre left": "left",
    "centre right": "right",
    "left top": "top left",
    "right top": "top right",
    "left bottom": "bottom left",
    "right bottom": "bottom right",
}
_CELL_WORDS = {"top", "bottom", "left", "right", "centre", "center", "middle", "upper", "lower"}
# Where a noun phrase's place begins ('a heart | on the left'); as the rule decomposer splits a clause.
_PLACE_START = re.compile(
    r"\s+(?=(?:on|in|at|by|near|under|over|above|below|behind|beside|inside|next|with|wearing|holding|of|to)\b)",
    re.IGNORECASE,
)


def cell_from_words(text: str) -> str | None:
    """The grid cell that place words name, the whole of them: 'to the bottom left', 'in the upper-right corner',
    'centre' -> a cell; 'to the left of the ring' or 'on the beach' -> None."""
    words = _PLACE_PREFIX.sub("", " ".join(text.lower().replace("-", " ").split()))
    words = re.sub(r"\s+(?:corner|side|edge|part)$", "", words)
    words = re.sub(r"\s+of the (?:image|picture|canvas|frame|scene)$", "", words)
    words = " ".join(_CELL_SYNONYMS.get(w, w) for w in words.split())
    words = _CELL_SYNONYMS.get(words, words)
    return words if words in CELL_NAMES else None


@dataclass
class Phrase:
    """A noun phrase read by rules: 'two large red stars in the top left'."""

    noun: str
    count: int = 1
    counted: bool = False  # written with a number
    definite: bool = False  # 'the', 'this', 'that'
    adjectives: list[str] = field(default_factory=list)
    place: str = ""


def adjective_groups(words: Sequence[str]) -> list[str]:
    """['large', 'red'] -> two adjectives; ['black', 'and', 'white'] -> one."""
    groups: list[list[str]] = []
    for i, word in enumerate(words):
        if groups and (word == "and" or (i > 0 and words[i - 1] == "and")):
            groups[-1].append(word)
        else:
            groups.append([word])
    return [" ".join(g) for g in groups]


def read_phrase(text: str) -> Phrase | None:
    """A noun phrase: determiner or number, adjectives, noun, then place words ('on the left', 'to the left of a
    ring', 'behind it'). None for an empty phrase."""
    words = text.strip().strip(",.").split()
    if not words:
        return None
    first = words[0].lower()
    count, counted, definite = 1, False, first in ("the", "this", "that")
    if first in NUMBERS:
        count, counted, words = NUMBERS[first], True, words[1:]
    elif first in _DETERMINERS:
        words = words[1:]
    head, _, place = (_PLACE_START.split(" ".join(words), maxsplit=1) + [""])[:2], None, None
    phrase, place = head[0].split(), head[1]
    if not phrase:
        return None
    return Phrase(
        noun=phrase[-1],
        count=count,
        counted=counted,
        definite=definite,
        adjectives=adjective_groups(phrase[:-1]),
        place=place.strip(),
    )


def same_noun(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b or singular(a) == singular(b) or a.split()[-1:] == [b] or b.split()[-1:] == [a]


# ----------------------------------------------------------------------------- rendering a scene


def _ordered(attributes: Mapping[str, str]) -> list[str]:
    known = [k for k in ATTRIBUTE_ORDER if k in attributes]
    return [attributes[k] for k in known] + [v for k, v in attributes.items() if k not in known]


def head_text(obj: SceneObject, values: Iterable[str] = ()) -> str:
    """'a square', 'a red square' (with values), 'two stars', 'two red stars'."""
    words = " ".join([*values, obj.noun])
    det = _COUNT_WORDS.get(obj.count, str(obj.count)) if obj.count > 1 else article(words)
    return f"{det} {words}"


def place_phrase(obj: SceneObject, scene: ScenePlan, inline: int = 0) -> str:
    """'in the top left', 'to the left of a blue ring', or the free place words; '' when it has no place. `inline`:
    how many levels of the other object's own place to say with it ('to the left of a blue ring at the top')."""
    other = scene.object(obj.relative_to) if obj.relative_to else None
    if other is not None and obj.relation:
        return f"{obj.relation} {describe(other, scene, place=inline > 0, inline=inline - 1)}"
    if obj.cell:
        return CELL_PHRASES[obj.cell]
    return obj.place or ""


def describe(obj: SceneObject, scene: ScenePlan, place: bool = True, inline: int = 0) -> str:
    """The object in words: 'a large red heart in the top left'."""
    text = head_text(obj, _ordered(obj.attributes))
    where = place_phrase(obj, scene, inline) if place else ""
    return f"{text} {where}" if where else text


def render_prompt(scene: ScenePlan) -> str:
    """The prompt the generator draws from: every object with its attributes and place, then its other concepts
    and styles. An object another one stands in relation to is said in that clause, with its own place, and not
    again: 'a small blue ring to the left of a large red star in the top right', as the world's prompts put it."""
    depth = len(scene.objects)  # a chain of relations is said whole; a cycle stops there
    mentioned: set[str] = set()
    parts = []

    def chain(obj: SceneObject) -> None:
        for _ in range(depth + 1):
            if obj.id in mentioned:
                return
            mentioned.add(obj.id)
            other = scene.object(obj.relative_to) if obj.relative_to and obj.relation else None
            if other is None:
                return
            obj = other

    anchors = {o.relative_to for o in scene.objects if o.relative_to and o.relation and scene.object(o.relative_to)}
    for obj in [o for o in scene.objects if o.id not in anchors] + list(scene.objects):
        if obj.id not in mentioned:
            parts.append(describe(obj, scene, inline=depth))
            chain(obj)
    parts += [d.text for o in scene.objects for d in o.details] + [d.text for d in scene.extras]
    if len(parts) < 2:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------- concepts of a scene


@dataclass(frozen=True)
class _Facet:
    """One checkable part of an object: its presence, one attribute, its place, a detail; or an absence."""

    object_id: str | None
    kind: ConceptKind
    attribute: str | None
    text: str
    detail: bool = False
    box: Box | None = None

    @property
    def key(self) -> tuple[str | None, str, str | None]:
        return self.object_id, self.kind, self.text if self.detail else self.attribute


def _facets(scene: ScenePlan) -> list[_Facet]:
    out: list[_Facet] = []
    for obj in scene.objects:
        counted = obj.count > 1
        out.append(_Facet(obj.id, "count" if counted else "object", None, head_text(obj), box=obj.box))
        for kind, value in obj.attributes.items():
            out.append(_Facet(obj.id, "attribute", kind, head_text(obj, [value])))
        if where := place_phrase(obj, scene):
            out.append(_Facet(obj.id, "relation", None, f"{head_text(obj)} {where}"))
        out += [_Facet(obj.id, d.kind, None, d.text, detail=True) for d in obj.details]
    for gone in scene.removed:
        out.append(
            _Facet(gone.id, "absent", None, "no " + " ".join([*_ordered(gone.attributes), gone.noun]), box=gone.box)
        )
    out += [_Facet(None, d.kind, None, d.text, detail=True) for d in scene.extras]
    return out


def scene_concepts(
    scene: ScenePlan, old_scene: ScenePlan | None = None, old_concepts: Sequence[Concept] = ()
) -> list[Concept]:
    """The concepts of a scene. A part of an object that reads the same in `old_scene` keeps its old concept: id,
    text as first written, verdict, attempts. Every other one is new (fresh id, pending). Attributes and places
    depend on their object; an absent object depends on nothing."""
    old_text = {f.key: f.text for f in _facets(old_scene)} if old_scene is not None else {}
    old_details = {f.key for f in _facets(old_scene) if f.detail} if old_scene is not None else set()
    old_by_key: dict[tuple, Concept] = {}
    for c in old_concepts:
        if (c.object_id, c.kind, c.text) in old_details:
            old_by_key.setdefault((c.object_id, c.kind, c.text), c)
        else:
            old_by_key.setdefault((c.object_id, c.kind, c.attribute), c)
    next_id = 1 + max((int(c.id[1:]) for c in old_concepts if c.id[1:].isdigit()), default=0)
    concepts: list[Concept] = []
    owner: dict[str, str] = {}
    for facet in _facets(scene):
        kept = old_by_key.get(facet.key) if old_text.get(facet.key) == facet.text else None
        if kept is not None and kept.id not in {c.id for c in concepts}:
            concept = kept.model_copy(update={"box": facet.box if facet.kind != "absent" else kept.box})
        else:
            concept = Concept(
                id=f"c{next_id}",
                text=facet.text,
                kind=facet.kind,
                box=facet.box,
                object_id=facet.object_id,
                attribute=facet.attribute,
            )
            next_id += 1
        if facet.kind in ("object", "count") and facet.object_id:
            owner[facet.object_id] = concept.id
            concept.depends_on = []
        else:
            parent = owner.get(facet.object_id or "") if facet.kind != "absent" else None
            concept.depends_on = [parent] if parent else []
        concepts.append(concept)
    return concepts


def objects_of_concepts(
    concepts: Sequence[Concept], vocabulary: Vocabulary = OPEN_VOCABULARY
) -> tuple[ScenePlan, list[Concept]]:
    """The scene a concept list describes, and the concepts tagged with their objects (ids, texts and verdicts
    kept): objects are the concepts of kind object or count that depend on nothing; an attribute or place that reads
    as one of its object's ('a red square', 'a square on the left') becomes its attribute or place; anything else
    (an LLM's 'the dog wears a green scarf') a detail kept as written. For an LLM's decomposition, and for threads
    whose concepts predate object ids (those keep any object ids they already have)."""
    by_id = {c.id: c for c in concepts}

    def root(c: Concept) -> Concept | None:
        seen = set()
        while c.depends_on and c.id not in seen:
            seen.add(c.id)
            parent = by_id.get(c.depends_on[0])
            if parent is None:
                return None
            c = parent
        return c if c.kind in ("object", "count") else None

    scene = ScenePlan()
    object_of: dict[str, SceneObject] = {}
    pending_places: list[tuple[SceneObject, str]] = []
    for c in concepts:
        if c.kind in ("object", "count") and not c.depends_on:
            phrase = read_phrase(c.text)
            obj = SceneObject(
                id=c.object_id or scene.next_object_id(), noun=phrase.noun if phrase else c.text, box=c.box
            )
            if phrase:
                # Words of no known kind in an object's own name are part of it ('a boston bull'); known ones
                # ('a large dog') are its attributes.
                named = [a for a in phrase.adjectives if vocabulary.kind_of(a) is None]
                obj.noun = " ".join([*named, phrase.noun])
                obj.count = phrase.count
                obj.attributes = _kinds([a for a in phrase.adjectives if a not in named], vocabulary)
                if phrase.place:
                    pending_places.append((obj, phrase.place))
            object_of[c.id] = obj
            scene.objects.append(obj)
    tagged: list[Concept] = []
    for c in concepts:
        top = root(c)
        owner = object_of.get(top.id) if top is not None else None
        attribute = c.attribute
        if owner is None or top is None:
            if c.kind == "absent":
                tagged.append(c)
            else:
                scene.extras.append(Detail(text=c.text, kind=c.kind))
                tagged.append(c.model_copy(update={"object_id": None}))
            continue
        obj = owner
        if c.id != top.id:
            phrase = read_phrase(c.text)
            mine = phrase is not None and same_noun(phrase.noun, obj.noun)
            if c.kind == "attribute" and mine and phrase and len(phrase.adjectives) == 1 and not phrase.place:
                value = vocabulary.normalise(phrase.adjectives[0])
                attribute = c.attribute or vocabulary.kind_of(value) or value
                obj.attributes[attribute] = value
            elif c.kind == "relation" and mine and phrase and phrase.place and not phrase.adjectives:
                pending_places.append((obj, phrase.place))
                attribute = None
            else:
                obj.details.append(Detail(text=c.text, kind=c.kind))
                attribute = None
        tagged.append(c.model_copy(update={"object_id": obj.id, "attribute": attribute}))
    for obj, words in pending_places:
        _set_place(obj, words, scene, vocabulary)
    return scene, tagged


def _kinds(adjectives: Iterable[str], vocabulary: Vocabulary) -> dict[str, str]:
    out: dict[str, str] = {}
    for adjective in adjectives:
        value = vocabulary.normalise(adjective)
        out[vocabulary.kind_of(value) or value] = value
    return out


def _set_place(obj: SceneObject, words: str, scene: ScenePlan, vocabulary: Vocabulary) -> None:
    """Place words of a decomposed concept: a relation to an object of the scene, a cell, or free words."""
    place = read_place(words, vocabulary)
    if place is not None and place.relation and place.other:
        other = read_phrase(place.other)
        matches = [o for o in scene.objects if o.id != obj.id and other and same_noun(o.noun, other.noun)]
        if other and len(matches) > 1:
            matches = [o for o in matches if set(other.adjectives) <= set(o.attributes.values())] or matches
        if matches:
            obj.relation, obj.relative_to = place.relation, matches[0].id
            return
    if place is not None and place.cell:
        obj.cell = place.cell
        return
    obj.place = words


# ----------------------------------------------------------------------------- places


@dataclass
class Place:
    """Place words read: a cell, a relation to another object (its words), or free words."""

    cell: str | None = None
    relation: str | None = None
    other: str | None = None
    free: str | None = None


def read_place(text: str, vocabulary: Vocabulary) -> Place | None:
    """'to the bottom left' -> a cell; 'to the left of the ring' -> a relation to 'the ring'; 'on the beach' -> free
    words (open vocabularies only); None when the words name no place the vocabulary knows."""
    words = " ".join(text.lower().strip().strip(",.").split())
    if cell := cell_from_words(words):
        return Place(cell=cell)
    relations = sorted({**{r: r for r in _OPEN_RELATIONS}, **dict(vocabulary.relations)}, key=len, reverse=True)
    for relation in relations:
        if words.startswith(relation + " "):
            rest = words[len(relation) + 1 :]
            if rest.split()[0] in _DETERMINERS | {"it", "them"} | set(NUMBERS):
                if relation in vocabulary.relations:
                    return Place(relation=vocabulary.relations[relation], other=rest)
                break
    if not vocabulary.closed and words and words.split()[0] in {r.split()[0] for r in _OPEN_RELATIONS} | {"to"}:
        # 'move the dog to the beach': where it ends up is 'at the beach'
        return Place(free=re.sub(r"^into ", "in ", re.sub(r"^to ", "at ", words)))
    return None


# ----------------------------------------------------------------------------- resolving and checking


def _cell_of_object(obj: SceneObject, boxes: Mapping[str, Box]) -> str | None:
    if obj.cell:
        return obj.cell
    box = boxes.get(obj.id) or obj.box
    return cell_of(box) if box is not None else None


def resolve(
    ref: ObjectRef, scene: ScenePlan, vocabulary: Vocabulary, boxes: Mapping[str, Box], last: Sequence[str]
) -> tuple[list[str], str | None]:
    """(object ids, None), or ([], why not) when the reference names no object or could mean several (then the
    candidates' ids come back with the reason)."""
    if ref.id:
        return ([ref.id], None) if scene.object(ref.id) else ([], f"there is no object {ref.id}")
    if ref.pronoun:
        ids = [i for i in last if scene.object(i)]
        if not ids and len(scene.objects) == 1:
            ids = [scene.objects[0].id]
        return (ids, None) if ids else ([], "it is not clear which object 'it' is")
    matches = list(scene.objects)
    if ref.noun and ref.noun.lower() not in ("shape", "shapes", "object", "objects", "thing", "things", "one"):
        matches = [o for o in matches if same_noun(o.noun, ref.noun)]
    values = [vocabulary.normalise(a) for a in ref.attributes]
    matches = [o for o in matches if all(v in o.attributes.values() for v in values)]
    if ref.cell:
        matches = [o for o in matches if _cell_of_object(o, boxes) == ref.cell]
    words = ref.words or " ".join(["the", *ref.attributes, ref.noun or "object"])
    if not matches:
        there = ", ".join(describe(o, scene) for o in scene.objects) or "nothing"
        return [], f"the picture has no {words.removeprefix('the ')} (it has {there})"
    if len(matches) > 1 and not ref.every:
        options = " or ".join(f"the {describe(o, scene).split(' ', 1)[1]} ({o.id})" for o in matches)
        return [o.id for o in matches], f"which {singular(ref.noun or 'object')} do you mean: {options}?"
    return [o.id for o in matches], None


class _Checker:
    """Checks changes one by one against a scene that each accepted change updates, so that a later clause sees the
    objects an earlier one added, moved or recoloured ('add a star, then make it red')."""

    def __init__(
        self,
        scene: ScenePlan,
        vocabulary: Vocabulary,
        boxes: Mapping[str, Box] | None = None,
        previous: ScenePlan | None = None,
    ):
        self.scene, self.vocabulary, self.previous = scene, vocabulary, previous
        self.boxes = dict(boxes or {})
        self.last: list[str] = [i for i in scene.focus if scene.object(i)]  # 'it': what the last message spoke of
        self.changes: list[Change] = []
        self.refusals: list[Refusal] = []

    def refuse(self, clause: str, reason: str, candidates: Sequence[str] = ()) -> None:
        self.refusals.append(Refusal(clause=clause, reason=reason, candidates=list(candidates)))

    def _one(self, ref: ObjectRef, clause: str) -> str | None:
        ids, why = resolve(ref, self.scene, self.vocabulary, self.boxes, self.last)
        if why or len(ids) != 1:
            self.refuse(clause, why or f"'{ref.words}' means {len(ids)} objects here; name one", ids)
            return None
        return ids[0]

    def _value(self, kind: str | None, value: str, clause: str) -> tuple[str, str] | None:
        value = self.vocabulary.normalise(value)
        known = self.vocabulary.kind_of(value)
        kind = {"color": "colour"}.get(kind or "", kind) or None
        if kind and kind not in self.vocabulary.attributes and self.vocabulary.closed:
            self.refuse(clause, f"no attribute '{kind}' here ({self.vocabulary.describe()})")
            return None
        kind = kind or known
        if self.vocabulary.closed and (kind is None or value not in self.vocabulary.attributes.get(kind, ())):
            self.refuse(clause, f"'{value}' is not something this world can draw ({self.vocabulary.describe()})")
            return None
        if not value.replace(" ", "").replace("-", "").isalpha():
            self.refuse(clause, f"'{value}' is not an attribute")
            return None
        return kind or value, value

    def _new_object(self, new: NewObject, clause: str) -> NewObject | None:
        if not new.noun.strip() or not self.vocabulary.knows_noun(new.noun):
            self.refuse(clause, f"this world cannot draw '{new.noun}' ({self.vocabulary.describe()})")
            return None
        attributes: dict[str, str] = {}
        for value in new.attributes:
            checked = self._value(None, value, clause)
            if checked is None:
                return None
            attributes[checked[0]] = checked[1]
        place = self._place(new.cell, new.relation, new.relative_to, new.place, clause, None)
        if place is None:
            return None
        # Values of one kind: the last one stands ('a red blue star' is a blue star), in the order of the kinds.
        return new.model_copy(update={"attributes": [attributes[k] for k in attributes], **place})

    def _place(
        self,
        cell: str | None,
        relation: str | None,
        relative_to: ObjectRef | None,
        place: str | None,
        clause: str,
        mover: str | None,
    ) -> dict | None:
        """The checked place fields, {} for none, None when refused."""
        if cell is not None:
            named = cell_from_words(cell)
            if named is None:
                self.refuse(clause, f"'{cell}' is not a place in the picture ({', '.join(CELL_NAMES)})")
                return None
            taken = {_cell_of_object(o, self.boxes): o for o in self.scene.objects if o.id != mover}
            if self.vocabulary.one_per_cell and named in taken:
                free = ", ".join(c for c in CELL_NAMES if c not in taken)
                self.refuse(
                    clause,
                    f"the {named} already holds {describe(taken[named], self.scene, place=False)}; choose a "
                    f"free place ({free}), or move or remove that first",
                )
                return None
            return {"cell": named, "relation": None, "relative_to": None, "place": None}
        if relation is not None or relative_to is not None:
            words = " ".join((relation or "").lower().split())
            canonical = self.vocabulary.relations.get(words)
            if canonical is None or relative_to is None:
                known = ", ".join(sorted(set(self.vocabulary.relations.values())))
                self.refuse(clause, f"'{relation}' is not a relation this world knows ({known})")
                return None
            other = self._one(relative_to, clause)
            if other is None:
                return None
            if other == mover:
                self.refuse(clause, "an object cannot be placed relative to itself")
                return None
            return {"cell": None, "relation": canonical, "relative_to": ObjectRef(id=other), "place": None}
        if place is not None:
            if self.vocabulary.closed:
                self.refuse(clause, f"'{place}' is not a place in the picture ({', '.join(CELL_NAMES)})")
                return None
            return {"cell": None, "relation": None, "relative_to": None, "place": place}
        return {}

    def check(self, change: Change) -> None:
        """Accept the change (references resolved to ids, values checked) and apply it to the running scene, or
        record why not."""
        clause = change.clause
        checked: Change | None = None
        if isinstance(change, Undo):
            if self.previous is None:
                self.refuse(clause or "undo", "there is no earlier turn to go back to")
                return
            checked = change
        elif isinstance(change, Add):
            objects = [self._new_object(o, clause) for o in change.objects]
            if any(o is None for o in objects):
                return
            checked = change.model_copy(update={"objects": objects})
        elif isinstance(change, Replace):
            replaced, by = self._one(change.target, clause), self._new_object(change.by, clause)
            if replaced is None or by is None:
                return
            checked = change.model_copy(update={"target": ObjectRef(id=replaced, words=change.target.words), "by": by})
        else:
            ids, why = resolve(change.target, self.scene, self.vocabulary, self.boxes, self.last)
            if why:
                self.refuse(clause, why, ids)
                return
            if isinstance(change, SetAttribute) and change.target.every and len(ids) > 1:
                for object_id in ids:  # 'make them all red'
                    self.check(change.model_copy(update={"target": ObjectRef(id=object_id, words=change.target.words)}))
                self.last = ids
                return
            if not isinstance(change, Remove) and len(ids) != 1:
                self.refuse(clause, f"'{change.target.words}' means {len(ids)} objects here; name one", ids)
                return
            if isinstance(change, Remove):
                if len(ids) >= len(self.scene.objects):
                    self.refuse(clause, "that would leave nothing to draw; replace the object, or start a new thread")
                    return
                for object_id in ids:
                    self._accept(
                        change.model_copy(update={"target": ObjectRef(id=object_id, words=change.target.words)})
                    )
                self.last = ids
                return
            target = ObjectRef(id=ids[0], words=change.target.words)
            if isinstance(change, Move) and change.direction:
                stepped = self._step(change, ids[0])
                if stepped is None:
                    return
                change = stepped
            if isinstance(change, SetAttribute):
                value = self._value(change.kind, change.value, clause)
                if value is None:
                    return
                checked = change.model_copy(update={"target": target, "kind": value[0], "value": value[1]})
            else:
                place = self._place(change.cell, change.relation, change.relative_to, change.place, clause, ids[0])
                if not place:
                    if place == {}:
                        self.refuse(clause, "it does not say where to move it")
                    return
                checked = change.model_copy(update={"target": target, **place})
        self._accept(checked)

    def _step(self, move: Move, object_id: str) -> Move | None:
        """'move the ring down' as a move to the next cell that way from where the ring is (drawn, else planned)."""
        obj = self.scene.object(object_id)
        here = _cell_of_object(obj, self.boxes) if obj is not None else None
        if here is None:
            self.refuse(
                move.clause,
                f"I do not know where {move.target.words} is now; name the place ('move the ring to the bottom left')",
            )
            return None
        there = shifted(here, move.direction or "")
        if there is None:
            edge = {"up": "top", "down": "bottom"}.get(move.direction or "", move.direction)
            self.refuse(move.clause, f"{move.target.words} is already at the {edge} edge ({here}); name another place")
            return None
        return move.model_copy(update={"cell": there, "direction": None})

    def _accept(self, change: Change) -> None:
        before = {o.id for o in self.scene.objects}
        self.scene = apply_change(self.scene, change, self.boxes, self.previous, self.vocabulary)
        self.changes.append(change)
        added = [o.id for o in self.scene.objects if o.id not in before]
        target = getattr(change, "target", None)
        self.last = added or ([target.id] if target is not None and target.id else self.last)


def check_changes(
    changes: Sequence[Change],
    scene: ScenePlan,
    vocabulary: Vocabulary = OPEN_VOCABULARY,
    boxes: Mapping[str, Box] | None = None,
    previous: ScenePlan | None = None,
) -> Understanding:
    """Changes checked against the scene, in order, each seeing the scene the earlier ones made: references
    resolved to object ids (or a clarification when one could mean several), values and nouns checked against the
    vocabulary. Both readers (rules, LLM) end here."""
    checker = _Checker(scene, vocabulary, boxes, previous)
    for change in changes:
        checker.check(change)
    return Understanding(changes=checker.changes, refusals=checker.refusals)


# ----------------------------------------------------------------------------- applying


def _object_from(new: NewObject, object_id: str, vocabulary: Vocabulary, box: Box | None = None) -> SceneObject:
    return SceneObject(
        id=object_id,
        noun=new.noun,
        count=new.count,
        attributes=_kinds(new.attributes, vocabulary),
        cell=new.cell,
        relation=new.relation if new.relative_to else None,
        relative_to=new.relative_to.id if new.relative_to else None,
        place=new.place,
        box=CELL_BOXES[new.cell] if new.cell else box,
    )


def _keep_absences(scene: ScenePlan, placed: SceneObject) -> ScenePlan:
    """A removed object stays absent until an object is put where it was or the same object is added back."""
    kept = [
        r
        for r in scene.removed
        if not (placed.cell and r.box is not None and cell_of(r.box) == placed.cell)
        and not (same_noun(r.noun, placed.noun) and r.attributes == placed.attributes)
    ]
    return scene.model_copy(update={"removed": kept})


def apply_change(
    scene: ScenePlan,
    change: Change,
    boxes: Mapping[str, Box] | None = None,
    previous: ScenePlan | None = None,
    vocabulary: Vocabulary = OPEN_VOCABULARY,
) -> ScenePlan:
    """One checked change applied to the objects (a new scene; `scene` is left as it was). `boxes`: where each
    object was last seen (object id -> box), remembered by a removed object so the critic can check that place."""
    boxes = boxes or {}
    scene = scene.model_copy(deep=True)
    if isinstance(change, Undo):
        if previous is None:
            raise InstructionRefused([Refusal(clause=change.clause or "undo", reason="there is no earlier turn")])
        return previous.model_copy(deep=True)
    if isinstance(change, Add):
        for wanted in change.objects:
            added = _object_from(wanted, scene.next_object_id(), vocabulary)
            scene.objects.append(added)
            scene = _keep_absences(scene, added)
        return scene
    target_id = change.target.id
    obj = scene.object(target_id or "")
    if obj is None:
        raise ValueError(f"apply_change needs a checked change: no object {target_id!r} in the scene")
    if isinstance(change, SetAttribute):
        obj.attributes[change.kind or change.value] = change.value
    elif isinstance(change, Move):
        obj.cell, obj.place = change.cell, change.place
        obj.relation = change.relation if change.relative_to else None
        obj.relative_to = change.relative_to.id if change.relative_to else None
        obj.box = CELL_BOXES[change.cell] if change.cell else None
        scene = _keep_absences(scene, obj)
    elif isinstance(change, Remove | Replace):
        index, fresh = scene.objects.index(obj), scene.next_object_id()
        gone = obj.model_copy(
            update={"box": boxes.get(obj.id) or obj.box or (CELL_BOXES[obj.cell] if obj.cell else None)}
        )
        scene.objects.remove(obj)
        if isinstance(change, Replace):
            by = change.by
            if not (by.cell or by.relative_to or by.place):  # the new object takes the old one's place
                mine = ObjectRef(id=obj.relative_to) if obj.relative_to else None
                by = by.model_copy(
                    update={"cell": obj.cell, "relation": obj.relation, "relative_to": mine, "place": obj.place}
                )
            new = _object_from(by, fresh, vocabulary, box=gone.box)
            scene.objects.insert(index, new)  # same position: the prompt keeps its order
            if not same_noun(by.noun, obj.noun):  # the old object must be gone from its place
                scene.removed.append(gone)
        else:
            scene.removed.append(gone)
        for other in scene.objects:  # what stood in relation to it: to its replacement, or where it was seen
            if other.relative_to == obj.id and isinstance(change, Replace):
                other.relative_to = new.id
            elif other.relative_to == obj.id:
                seen = boxes.get(other.id) or other.box
                other.relation, other.relative_to = None, None
                other.cell = cell_of(seen) if seen is not None else None
    return scene


def seen_boxes(concepts: Sequence[Concept], seen: Mapping[str, Box]) -> dict[str, Box]:
    """Object id -> where the critic last saw it, from concept id -> box (a candidate's verdict boxes)."""
    return {c.object_id: seen[c.id] for c in concepts if c.object_id and c.kind in ("object", "count") and c.id in seen}


def apply_changes(
    scene: ScenePlan,
    concepts: Sequence[Concept],
    changes: Sequence[Change],
    *,
    seen: Mapping[str, Box] | None = None,
    previous: ScenePlan | None = None,
    vocabulary: Vocabulary = OPEN_VOCABULARY,
) -> Applied:
    """The one function both readers' changes go through: the new objects, the prompt rewritten from them, and the
    concept list (a concept whose object part is unchanged keeps its id and verdict). `seen`: concept id -> box where
    the critic saw each object on the best image (a removed object's absent concept is judged there). `previous`:
    the previous turn's scene, for Undo."""
    boxes = seen_boxes(concepts, seen or {})
    new = before = scene
    for change in changes:
        before, new = new, apply_change(new, change, boxes, previous, vocabulary)
    if changes and not isinstance(changes[-1], Undo):  # an undo brings back the earlier turn's focus with its scene
        new = new.model_copy(update={"focus": _spoken_of(before, new, changes[-1])})
    return Applied(scene=new, prompt=render_prompt(new), concepts=scene_concepts(new, scene, concepts))


def _spoken_of(before: ScenePlan, after: ScenePlan, change: Change) -> list[str]:
    """The objects a change spoke of that are still there (what it added or put in place, else its target): what
    'it' means in the next message."""
    if isinstance(change, Add | Replace):
        old = {o.id for o in before.objects}
        return [o.id for o in after.objects if o.id not in old]
    target = getattr(change, "target", None)
    return [target.id] if target is not None and target.id and after.object(target.id) else []


# ----------------------------------------------------------------------------- reading a message by rules

_LEAD = re.compile(
    r"^(?:(?:now|please|also|and|then|next|finally|ok|okay|so|actually|hmm|oh|well|great|nice|good|thanks|"
    r"(?:can|could|would|will) you(?: please)?|i(?:'d| would)? (?:want|like) you to|let's|lets)(?:,|\s+|$)\s*|"
    r"no,\s*)+",
    re.IGNORECASE,
)
# Politeness and emphasis after the clause: 'make it red please', 'add a star too'.
_TAIL = re.compile(r"(?:[,\s]+(?:please|for me|too|as well|instead|now|thanks|thank you))+$", re.IGNORECASE)
_VERBS = {
    "add",
    "include",
    "insert",
    "draw",
    "put",
    "place",
    "create",
    "remove",
    "delete",
    "erase",
    "drop",
    "take",
    "get",
    "make",
    "turn",
    "paint",
    "colour",
    "color",
    "recolour",
    "recolor",
    "change",
    "set",
    "move",
    "shift",
    "drag",
    "bring",
    "slide",
    "push",
    "replace",
    "swap",
    "substitute",
    "exchange",
    "undo",
    "revert",
    "go",
    "enlarge",
    "shrink",
    "grow",
}
_SEPARATOR = re.compile(r"(\s*[,;]\s*|\s*\.\s+|\s+then\s+|\s+and\s+)", re.IGNORECASE)


def _strip_lead(text: str) -> str:
    return _TAIL.sub("", _LEAD.sub("", text.strip()).strip()).strip()


def _starts_with_verb(text: str) -> bool:
    words = _strip_lead(text).lower().split()
    return bool(words) and words[0] in _VERBS


def _segments(message: str) -> list[list[tuple[str, str]]]:
    """Clauses as lists of (separator before, words): a piece that starts with no verb continues the clause
    before it ('add a red circle | and a blue square', 'make the cat black | and white')."""
    parts = _SEPARATOR.split(message.strip().rstrip(".!"))
    pieces = [(parts[i - 1] if i else "", parts[i]) for i in range(0, len(parts), 2)]
    clauses: list[list[tuple[str, str]]] = []
    for sep, words in pieces:
        if not words.strip() or not _strip_lead(words):
            continue
        if clauses and not _starts_with_verb(words):
            clauses[-1].append((sep, words.strip()))
        else:
            clauses.append([("", words.strip())])
    return clauses


def _join(pieces: Sequence[tuple[str, str]]) -> str:
    out = ""
    for sep, words in pieces:
        if out:
            sep = sep.strip()
            out += (", " if sep in (",", ";", ".") else f" {sep} ") + words
        else:
            out = words
    return out


def split_clauses(message: str) -> list[str]:
    """A message's clauses: split at 'and', commas and 'then', never inside a phrase ('black and white', 'add a red
    circle and a blue square' stay whole)."""
    return [_join(c) for c in _segments(message)]


_UNDO = re.compile(
    r"^(?:undo|revert|go back|take (?:that|it) back)(?:\s+(?:that|it|this|(?:the|my) (?:last|previous) "
    r"(?:change|step|one|edit|message|instruction)))?"
    r"(?:\s+(?:please|again))?$"
)
_REMOVE = re.compile(r"^(?:remove|delete|erase|drop|take out|take away|get rid of|lose|no more|no|without)\s+(.+)$")
_TAKE_OUT = re.compile(r"^take\s+(.+?)\s+(?:out|away)$")
# 'i want a green star', 'there should be a ring at the top': an add; 'i want the heart red': a set.
_WANT = re.compile(
    r"^(?:i (?:also )?(?:want|need)|i'd (?:also )?like|i would (?:also )?like|give me|there should (?:also )?be)\s+(.+)$"
)
_TOO = re.compile(
    r"^(.+?)\s+(?:is|looks|seems)\s+(?:a (?:little |bit )?|much |way )?too\s+(small|big|large|tiny|huge)$"
)
_DIRECTION = re.compile(
    r"^(.+?)\s+(?:one (?:cell|step|place)\s+|a (?:little |bit )?|slightly |further |more )?(up|down|left|right|"
    r"higher|lower)(?:\s+(?:a (?:little|bit)|one (?:cell|step|place)|slightly))?$"
)
_WAYS: dict[str, Literal["up", "down", "left", "right"]] = {
    "up": "up",
    "higher": "up",
    "down": "down",
    "lower": "down",
    "left": "left",
    "right": "right",
}
# A bare direction follows its object directly: 'move the diamond in the bottom left' names a cell, not a step.
_PLACE_WORDS = {"to", "into", "towards", "in", "at", "on", "onto", "of"}
_SIDE_WORDS = re.compile(r"\b(?:next to|beside|near|by|close to|around)\b")
_REPLACE = re.compile(r"^(?:replace|swap|exchange)\s+(.+?)\s+(?:with|by|for)\s+(.+)$")
_SUBSTITUTE = re.compile(r"^substitute\s+(.+?)\s+for\s+(.+)$")
_INTO = re.compile(r"^(?:turn|change|make)\s+(.+?)\s+(?:into|to)\s+((?:a|an|one)\s+.+)$")
_MAKE_A = re.compile(r"^make\s+(.+?)\s+((?:a|an)\s+.+)$")
_ADD = re.compile(r"^(?:add|include|insert|draw|create|put|place)\s+(.+)$")
_MOVE = re.compile(r"^(?:move|shift|drag|bring|slide|push|put|place)\s+(.+)$")
_ATTRIBUTE_OF = re.compile(r"^(?:change|set|make)\s+the\s+(colou?r|size)\s+of\s+(.+?)\s+(?:to|into)\s+(.+)$")
_SET = re.compile(r"^(?:make|turn|paint|colou?r|recolou?r|change|dye|set)\s+(.+)$")
_SIZE_OF = re.compile(r"^(increase|decrease|reduce|raise|lower)\s+the\s+size\s+of\s+(.+)$")
# 'can the ring be red', 'could the ring be at the bottom'
_CAN_BE = re.compile(r"^(?:can|could)\s+(.+?)\s+be\s+(.+)$")
_GROW = re.compile(r"^(enlarge|grow|shrink)\s+(.+)$")
_SHOULD = re.compile(r"^(.+?)\s+(?:should be|must be|needs to be|has to be|is|are)\s+(.+)$")
_DEGREE = re.compile(r"\b(?:a little|a little bit|a bit|slightly|much|even|very|a lot)\s+")
_LIST = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+(?=(?:a|an|one|two|three|four|five|six|another|\d+)\b)")
_REF_LIST = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+(?=(?:the|it|this|that|both|all)\b)")
_NOT_ADJECTIVES = {"the", "a", "an", "to", "into", "in", "of", "on", "and", "it", "with", "by", "at", "as", "so"}


_PRONOUNS = ("it", "this", "that", "this one", "that one")
_EVERY = ("them", "they", "all", "everything", "all of them", "all objects", "all shapes")


class ClauseNotUnderstood(ValueError):
    """A clause the rules cannot read; its message says why."""


def read_ref(text: str, vocabulary: Vocabulary) -> ObjectRef | None:
    """'the red square', 'the square on the left', 'the left square', 'it', 'both squares'; None for anything else
    (an indefinite 'a square' names no object of the scene)."""
    words = " ".join(text.lower().strip().strip(",.").split())
    if words in _PRONOUNS:
        return ObjectRef(pronoun=True, words=words)
    if words in _EVERY:
        return ObjectRef(every=True, words=words)
    every = False
    for lead in ("both ", "all the ", "all ", "every "):
        if words.startswith(lead):
            every, words = True, "the " + words[len(lead) :]
    if not words.startswith(("the ", "this ", "that ")):
        first = words.split()[0] if words else ""
        if not first or first in _DETERMINERS | set(NUMBERS) or first in _NOT_ADJECTIVES:
            return None
        words = "the " + words  # 'make heart red': a bare noun names the object as 'the heart' does
        bare = read_phrase(words)
        if bare is None or (vocabulary.closed and not vocabulary.knows_noun(bare.noun)):
            return None
    phrase = read_phrase(words)
    if phrase is None:
        return None
    cell_words = [a for a in phrase.adjectives if all(w in _CELL_WORDS for w in a.split())]
    adjectives = [a for a in phrase.adjectives if a not in cell_words]
    cell = cell_from_words(" ".join(cell_words)) if cell_words else None
    if cell_words and cell is None:
        return None
    if phrase.place:
        place = read_place(phrase.place, vocabulary)
        if place is None or place.cell is None or cell is not None:
            return None
        cell = place.cell
    if not all(_is_adjective(a, vocabulary) for a in adjectives) or not _is_noun(phrase.noun, vocabulary):
        return None
    return ObjectRef(
        noun=phrase.noun,
        attributes=adjectives,
        cell=cell,
        every=every or singular(phrase.noun) != phrase.noun,  # 'the squares': every square
        words=text.strip(),
    )


def _is_noun(word: str, vocabulary: Vocabulary) -> bool:
    return word.isalpha() and word not in _NOT_ADJECTIVES and vocabulary.kind_of(word) is None


def _is_adjective(words: str, vocabulary: Vocabulary) -> bool:
    """Whether words can stand before a noun as one attribute: a value the vocabulary knows ('black and white'),
    or, in an open vocabulary, one word that is no article or preposition ('boston')."""
    if vocabulary.kind_of(words) is not None:
        return True
    return not vocabulary.closed and words.isalpha() and words not in _NOT_ADJECTIVES


def read_values(words: Sequence[str], vocabulary: Vocabulary) -> list[str] | None:
    """Attribute values: 'red' -> ['red']; 'black and white' -> one value when the vocabulary knows it whole;
    'large and red' -> two. None when the words are no adjectives."""
    text = " ".join(words).lower()
    if not text or text.split()[0] in _NOT_ADJECTIVES or text.split()[-1] in _NOT_ADJECTIVES:
        return None
    if vocabulary.kind_of(text):
        return [vocabulary.normalise(text)]
    values = [v for v in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", text) if v]
    for value in values:
        known = vocabulary.kind_of(value)
        if known is None and (len(value.split()) > 1 or not value.isalpha() or value in _NOT_ADJECTIVES):
            return None
    return [vocabulary.normalise(v) for v in values]


def read_new_object(text: str, vocabulary: Vocabulary) -> NewObject | None:
    """'a large green star in the top right', 'two cyan rings', 'a star to the left of the heart'."""
    phrase = read_phrase(text)
    if phrase is None or phrase.definite or not text.strip().lower().split()[0] in _DETERMINERS | set(NUMBERS):
        return None
    if not all(_is_adjective(a, vocabulary) for a in phrase.adjectives) or not _is_noun(phrase.noun, vocabulary):
        return None
    new = NewObject(
        noun=phrase.noun, count=phrase.count, attributes=[vocabulary.normalise(a) for a in phrase.adjectives]
    )
    if phrase.place:
        place = read_place(phrase.place, vocabulary)
        if place is None:
            new.place = phrase.place  # refused by the check in a closed world, drawn as written in an open one
        elif place.other:
            new.relation, new.relative_to = place.relation, read_ref(place.other, vocabulary)
            if new.relative_to is None:
                other = read_phrase(place.other)
                if other is None:
                    return None
                new.relative_to = ObjectRef(noun=other.noun, attributes=other.adjectives, words=place.other)
        else:
            new.cell, new.place = place.cell, place.free
    return new


def _read_move(rest: str, clause: str, vocabulary: Vocabulary) -> Move | None:
    words = rest.split()
    for i in range(1, len(words)):
        ref, place = read_ref(" ".join(words[:i]), vocabulary), read_place(" ".join(words[i:]), vocabulary)
        if ref is None or place is None:
            continue
        if place.other is not None:
            other = read_ref(place.other, vocabulary)
            if other is None:
                continue
            return Move(clause=clause, target=ref, relation=place.relation, relative_to=other)
        return Move(clause=clause, target=ref, cell=place.cell, place=place.free)
    return None


def _read_set(rest: str, clause: str, vocabulary: Vocabulary) -> list[Change] | None:
    """'the heart red', 'the heart to be red', 'the heart and the ring red' (each of them)."""
    words = rest.split()
    for n in range(1, min(len(words), 6)):
        target_words, value_words = words[:-n], words[-n:]
        while target_words and target_words[-1] in ("to", "into", "in", "be"):
            target_words = target_words[:-1]
        refs = [read_ref(r, vocabulary) for r in _REF_LIST.split(" ".join(target_words))]
        values = read_values(value_words, vocabulary) if refs and all(refs) else None
        if values:
            return [SetAttribute(clause=clause, target=r, value=v) for r in refs if r is not None for v in values]
    return None


def _normalise_clause(clause: str) -> str:
    """Lower case, lead and tail words off, and a few ways of saying the same thing made one: 'the ring's colour' ->
    'the colour of the ring', 'a second square' -> 'another square', 'both the x and the y' -> 'the x and the y'."""
    text = " ".join(_strip_lead(clause.lower().rstrip(".!?")).split())
    text = re.sub(r"\b(the(?: \w+)*? \w+)'s (colou?r|size)\b", r"the \2 of \1", text)
    text = re.sub(r"\ba (?:second|third|fourth|new) ", "another ", text)
    return re.sub(r"\bboth (?=the |this |that )", "", text)


def read_clause(clause: str, vocabulary: Vocabulary = OPEN_VOCABULARY) -> list[Change]:
    """One clause as typed changes (object references still unresolved); ClauseNotUnderstood when it reads as none.
    Place words never become objects: 'move the ring to the bottom left' is a Move."""
    text = _normalise_clause(clause)
    if _UNDO.match(text):
        return [Undo(clause=clause)]
    if match := _REMOVE.match(text) or _TAKE_OUT.match(text):
        named = match.group(1)
        if (
            named not in _PRONOUNS  # 'remove it': the object the last message spoke of, no noun to put 'the' before
            and not named.startswith(("the ", "this ", "that ", "both ", "all ", "every "))
            and read_phrase(named)
        ):
            named = "the " + named  # 'no more ring', 'without stars'
        refs = [read_ref(r, vocabulary) for r in _REF_LIST.split(named)]
        if refs and all(refs):
            return [Remove(clause=clause, target=r) for r in refs if r is not None]
        raise ClauseNotUnderstood("it does not name objects of the picture to remove ('remove the red square')")
    for pattern, reverse in ((_REPLACE, False), (_SUBSTITUTE, True), (_INTO, False), (_MAKE_A, False)):
        if match := pattern.match(text):
            old, new = (match.group(2), match.group(1)) if reverse else (match.group(1), match.group(2))
            ref, by = read_ref(old, vocabulary), read_new_object(new, vocabulary)
            if ref is not None and by is not None:
                return [Replace(clause=clause, target=ref, by=by)]
    if match := _ATTRIBUTE_OF.match(text):
        kind = "colour" if match.group(1).startswith("col") else "size"
        ref = read_ref(match.group(2), vocabulary)
        if ref is not None:
            return [SetAttribute(clause=clause, target=ref, kind=kind, value=match.group(3))]
    if match := _SIZE_OF.match(text):
        ref = read_ref(match.group(2), vocabulary)
        if ref is not None:
            value = "large" if match.group(1) in ("increase", "raise") else "small"
            return [SetAttribute(clause=clause, target=ref, kind="size", value=value)]
    if match := _GROW.match(text):
        ref = read_ref(match.group(2), vocabulary)
        if ref is not None:
            value = "small" if match.group(1) == "shrink" else "large"
            return [SetAttribute(clause=clause, target=ref, kind="size", value=value)]
    if match := _MOVE.match(text):
        # A bare direction is one step ('move it right'); 'to the right' is the cell on the right.
        step = _DIRECTION.match(match.group(1))
        if step and not _PLACE_WORDS & set(step.group(1).split()) and (ref := read_ref(step.group(1), vocabulary)):
            return [Move(clause=clause, target=ref, direction=_WAYS[step.group(2)])]
        if move := _read_move(match.group(1), clause, vocabulary):
            return [move]
        # ... and after an object named by its place, once no cell reads: 'move the square on the left down'
        if step and (ref := read_ref(step.group(1), vocabulary)):
            return [Move(clause=clause, target=ref, direction=_WAYS[step.group(2)])]
    if _SIDE_WORDS.search(text) and vocabulary.closed:
        raise ClauseNotUnderstood(
            "it does not say which side: say 'to the left of', 'to the right of', 'above' or 'below' the other object"
        )
    if match := _WANT.match(text):
        objects = [read_new_object(o, vocabulary) for o in _LIST.split(match.group(1)) if o.strip()]
        if objects and all(objects):
            return [Add(clause=clause, objects=[o for o in objects if o is not None])]
        if changes := _read_set(_DEGREE.sub("", match.group(1)), clause, vocabulary):
            return changes
        if move := _read_move(match.group(1), clause, vocabulary):  # 'i want the ring at the bottom'
            return [move]
    if (match := _TOO.match(text)) and (ref := read_ref(match.group(1), vocabulary)):  # 'the ring is too small'
        bigger = match.group(2) in ("small", "tiny")
        return [SetAttribute(clause=clause, target=ref, kind="size", value="large" if bigger else "small")]
    if match := _ADD.match(text):
        objects = [read_new_object(o, vocabulary) for o in _LIST.split(match.group(1)) if o.strip()]
        if objects and all(objects):
            return [Add(clause=clause, objects=[o for o in objects if o is not None])]
    if (match := _SET.match(text)) and (changes := _read_set(_DEGREE.sub("", match.group(1)), clause, vocabulary)):
        return changes
    if (match := _SHOULD.match(text) or _CAN_BE.match(text)) and (ref := read_ref(match.group(1), vocabulary)):
        wanted = _DEGREE.sub("", match.group(2))
        if values := read_values(wanted.split(), vocabulary):
            return [SetAttribute(clause=clause, target=ref, value=v) for v in values]
        if move := _read_move(f"{match.group(1)} {wanted}", clause, vocabulary):
            return [move]
    raise ClauseNotUnderstood(
        "it reads as no change I can make: add, remove, move, make (a colour or size), replace or undo, "
        "naming objects of the picture ('make the red square blue', 'move the ring to the bottom left')"
    )


def read_message(message: str, vocabulary: Vocabulary = OPEN_VOCABULARY) -> list[Change | Refusal]:
    """Every clause of a message as changes, or a refusal quoting it. A clause joined from pieces that does not read
    whole is read piece by piece with its verb carried over ('make the heart red and the ring blue')."""
    out: list[Change | Refusal] = []
    for pieces in _segments(message):
        out += _read_pieces(pieces, vocabulary)
    return out


def _read_pieces(pieces: Sequence[tuple[str, str]], vocabulary: Vocabulary) -> list[Change | Refusal]:
    whole = _join(pieces)
    try:
        return list(read_clause(whole, vocabulary))
    except ClauseNotUnderstood as error:
        if len(pieces) == 1:
            return [Refusal(clause=whole, reason=str(error))]
        reason = str(error)
    for n in range(len(pieces) - 1, 0, -1):  # the longest head that reads, then the rest with its verb
        try:
            head = read_clause(_join(pieces[:n]), vocabulary)
        except ClauseNotUnderstood:
            continue
        verb = _strip_lead(pieces[0][1]).split()[0]
        rest: list[Change | Refusal] = []
        for _, words in pieces[n:]:
            try:
                read = read_clause(f"{verb} {_strip_lead(words)}", vocabulary)
                rest += [c.model_copy(update={"clause": words}) for c in read]  # quoted as the user wrote it
            except ClauseNotUnderstood as error:
                rest.append(Refusal(clause=words, reason=str(error)))
        return [*head, *rest]
    return [Refusal(clause=whole, reason=reason)]


def understand_by_rules(
    message: str,
    scene: ScenePlan,
    vocabulary: Vocabulary = OPEN_VOCABULARY,
    boxes: Mapping[str, Box] | None = None,
    previous: ScenePlan | None = None,
) -> Understanding:
    """The offline reader: the message's clauses as checked changes, or refusals quoting the clauses."""
    read = read_message(message, vocabulary)
    understanding = check_changes([c for c in read if not isinstance(c, Refusal)], scene, vocabulary, boxes, previous)
    refusals = [r for r in read if isinstance(r, Refusal)]
    return understanding.model_copy(update={"refusals": refusals + understanding.refusals})
