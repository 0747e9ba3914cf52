"""Conversations of the miniature world: a first prompt, then instructions that change the scene, each turn with the
object list the conversation asks for after it.

A conversation has one instruction kind (the mix of a split is fixed: as many conversations per kind):

    recolour       "make the ring red"                      one object's colour
    resize         "make the ring small"                    one object's size
    move_cell      "move the ring to the bottom left"       one object to a free cell
    move_relative  "move the ring to the left of the star"  one object beside another (judged on columns and rows)
    add_common     "add a small green triangle in the top right"
    add_rare       "add a large red heart at the bottom"    a shape the generator cannot draw from text
    remove         "remove the ring"
    replace        "replace the ring with a large yellow heart"   same cell, the new shape, colour and size
    compound       "make the ring red and remove the star"  two or three of the above in one message
    undo           a change, then "undo the last change"    back to the scene before the change

Every object of the first prompt is named with its shape, colour, size and cell (the grammar's phrases), shapes are
distinct within a split's conversation (an instruction names its object by shape: "the ring"), every scene a
conversation asks for is in the evaluation half of the scene space (never in the retrieval corpus nor in training),
and at most MAX_OBJECTS objects are ever asked for. So: add conversations hold 1 to 3 instructions, remove ones 1
or 2 (the first prompt names at most 3 objects and one stays), undo ones 1 or 2 (change, undo) pairs, the others 1
to 4.

The identity set (prompts/conversations-identity.jsonl, dev only, IDENTITY_SET's count per kind) tests what the
splits never do:

    same_shape     "a red square on the left and a blue square on the right", then "make the square on the left
                   green", "remove the blue square": one of two objects of one shape, named by colour or place
    pronoun        "add a large red heart at the top", then "make it small", "move it to the bottom left"

`judge_turn` reads a turn's target against the objects the oracle read in an image (matched one to one, the cell
first, so two squares are each read as themselves); `split_conversations` draws a split (deterministic) and
`write_conversation_splits` writes prompts/conversations-{dev,test}.jsonl; `write_identity_set` writes the identity
set. A file of one's own (`imagerag eval conversations --file`) holds Conversation objects, one a line.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, Field, model_validator

from imagerag.evals.miniworld.grammar import Detected, Group, prompt_text, sample_layout
from imagerag.tools.miniworld.world import (
    CELL_PHRASES,
    CELLS,
    COLOUR_NAMES,
    COMMON_SHAPES,
    MAX_OBJECTS,
    PLURALS,
    RARE_SHAPES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZE_NAMES,
    ObjectSpec,
    Relation,
    Scene,
    holds,
)

InstructionKind = Literal[
    "recolour",
    "resize",
    "move_cell",
    "move_relative",
    "add_common",
    "add_rare",
    "remove",
    "replace",
    "compound",
    "undo",
]
INSTRUCTION_KINDS: tuple[InstructionKind, ...] = get_args(InstructionKind)
# The identity set's kinds (dev only): two objects of one shape told apart by colour or place, and "it".
IdentityKind = Literal["same_shape", "pronoun"]
IDENTITY_KINDS: tuple[IdentityKind, ...] = get_args(IdentityKind)
ConversationKind = Literal[InstructionKind, IdentityKind]
CONVERSATION_KINDS: tuple[ConversationKind, ...] = INSTRUCTION_KINDS + IDENTITY_KINDS
TurnKind = Literal["first", ConversationKind]
Operation = Literal["create", "recolour", "resize", "move_cell", "move_relative", "add", "remove", "replace", "undo"]
CONVERSATION_PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# Conversations per instruction kind and the seed each split is drawn with, fixed before any result was seen.
CONVERSATION_SPLITS: dict[str, tuple[int, int]] = {"dev": (4, 3_001), "test": (8, 4_001)}
IDENTITY_SET: tuple[int, int] = (6, 5_001)  # the same for the identity set (dev only: nothing is sealed there)
MAX_FIRST_OBJECTS = 3  # a first prompt names 1 to 3 objects (4 to 12 concepts)


class RelativePlace(BaseModel):
    """Where an object was moved relative to another: judged on grid columns and rows, not on one cell."""

    relation: Relation
    anchor: str = Field(description="Id of the other object (which has a cell of its own).")


class TargetObject(BaseModel):
    """One object the conversation asks for after a turn."""

    id: str = Field(description="Stable within the conversation: 'o1', 'o2', ...")
    shape: str
    colour: str
    size: str
    cell: str = Field(description="The cell asked for; with `relation`, one cell where the relation holds.")
    relation: RelativePlace | None = Field(default=None, description="When set, the place judged instead of the cell.")

    @model_validator(mode="after")
    def _known(self) -> TargetObject:
        ObjectSpec(self.shape, self.colour, self.size, self.cell)  # raises on an unknown value
        return self

    @property
    def group(self) -> Group:
        return Group(shape=self.shape, colour=self.colour, size=self.size, cell=None if self.relation else self.cell)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.shape, self.colour, self.size, self.cell


class Change(BaseModel):
    """What one clause of an instruction does to the object list."""

    op: Operation
    object: str | None = Field(default=None, description="Id of the object changed, added or removed.")
    value: str | None = Field(default=None, description="The new colour, size, cell, relation or shape.")


class ConversationTurn(BaseModel):
    index: int = Field(ge=1)
    kind: TurnKind
    message: str = Field(description="What the user sends on the thread.")
    restated: str = Field(description="The whole request after this turn, written out in full.")
    changes: list[Change]
    target: list[TargetObject] = Field(min_length=1, max_length=MAX_OBJECTS)

    @model_validator(mode="after")
    def _consistent(self) -> ConversationTurn:
        ids = {o.id: o for o in self.target}
        if len(ids) != len(self.target):
            raise ValueError("target objects need distinct ids")
        if len({o.cell for o in self.target}) != len(self.target):
            raise ValueError("two target objects share a cell")
        for o in self.target:
            if o.relation is not None:
                anchor = ids.get(o.relation.anchor)
                if anchor is None or anchor.relation is not None or anchor.id == o.id:
                    raise ValueError(f"{o.id}: a relation needs another object of the target that has a cell")
                if not holds(o.relation.relation, o.cell, anchor.cell):
                    raise ValueError(f"{o.id}: its cell does not stand {o.relation.relation} its anchor")
        return self

    @property
    def scene(self) -> Scene:
        return Scene(tuple(ObjectSpec(*o.key) for o in self.target))


class Conversation(BaseModel):
    """One scripted conversation: the JSONL schema of `imagerag eval conversations`' splits."""

    id: str
    kind: ConversationKind
    turns: list[ConversationTurn] = Field(min_length=2)

    @model_validator(mode="after")
    def _ordered(self) -> Conversation:
        if [t.index for t in self.turns] != list(range(1, len(self.turns) + 1)) or self.turns[0].kind != "first":
            raise ValueError("turns are numbered from 1 and the first is the first prompt")
        return self

    @property
    def instructions(self) -> list[ConversationTurn]:
        return self.turns[1:]


# ----------------------------------------------------------------------------- text


def _article(words: str) -> str:
    return f"{'an' if words.startswith(('a', 'e', 'i', 'o', 'u', 'hour')) else 'a'} {words}"


def restate(target: Sequence[TargetObject], rng: random.Random) -> str:
    """The whole request for `target` in the grammar's words, every object in full. An object placed beside another is
    restated at the cell the conversation drew for it (one where the relation holds), next to the other: the grammar
    never relates an object to one that has a cell, and the generator drew such sentences ('a small blue ring to the
    left of a large red star in the top right') with one of the two objects missing in all 8 dev conversations that
    tried them. (The shuffle draws from `rng` as the relation wording did, which keeps the splits as they were.)"""
    groups = {o.id: Group(shape=o.shape, colour=o.colour, size=o.size, cell=o.cell) for o in target}
    anchors = {o.relation.anchor for o in target if o.relation}
    units = [[o.id, o.relation.anchor] for o in target if o.relation]
    if not units:
        return prompt_text(list(groups.values()), [], rng)
    units += [[o.id] for o in target if not o.relation and o.id not in anchors]
    rng.shuffle(units)
    return _join([groups[i].phrase() for unit in units for i in unit])


def _join(clauses: Sequence[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _cell_words(cell: str) -> str:
    return "the centre" if cell == "centre" else f"the {cell}"


# ----------------------------------------------------------------------------- instructions


Naming = Literal["shape", "identity", "pronoun"]


@dataclass
class Draft:
    """A conversation while it is drawn: the current target, shapes ever used, the next object id; how instructions
    name their object, and (when set) the only objects they may change."""

    target: list[TargetObject]
    used: set[str]
    next_id: int
    naming: Naming = "shape"
    only: set[str] | None = None

    def new_id(self) -> str:
        self.next_id += 1
        return f"o{self.next_id}"

    def name(self, obj: TargetObject, rng: random.Random) -> str:
        """'the ring'; with identity naming, an object whose shape another shares by its colour when that tells them
        apart ('the blue square') or by its place ('the square on the left'); with pronoun naming, 'it'."""
        if self.naming == "pronoun":
            return "it"
        twins = [o for o in self.target if o.shape == obj.shape and o.id != obj.id]
        if self.naming == "shape" or not twins:
            return f"the {obj.shape}"
        names = [f"the {obj.shape} {CELL_PHRASES[obj.cell]}"]
        if all(o.colour != obj.colour for o in twins):
            names.append(f"the {obj.colour} {obj.shape}")
        return rng.choice(names)


Clause = tuple[str, list[TargetObject], Change]  # the words, the target after it, the typed change
Maker = Callable[[Draft, random.Random, set[str]], Clause | None]  # `busy`: ids and cells this message touched


def _free_cells(target: Sequence[TargetObject], busy: set[str]) -> list[str]:
    taken = {o.cell for o in target} | busy
    return [c for c in CELLS if c not in taken]


def _pick(
    draft: Draft, rng: random.Random, busy: set[str], ok: Callable[[TargetObject], bool] = lambda o: True
) -> TargetObject | None:
    """An object this message has not touched yet and that may take the change."""
    choices = [o for o in draft.target if o.id not in busy and (draft.only is None or o.id in draft.only) and ok(o)]
    return rng.choice(choices) if choices else None


def _replaced(target: Sequence[TargetObject], new: TargetObject) -> list[TargetObject]:
    return [new if o.id == new.id else o for o in target]


def _is_anchor(draft: Draft, obj: TargetObject) -> bool:
    return any(o.relation and o.relation.anchor == obj.id for o in draft.target)


def recolour(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    if (obj := _pick(draft, rng, busy)) is None:
        return None
    colour = rng.choice([c for c in COLOUR_NAMES if c != obj.colour])
    words = rng.choice(["make {r} {c}", "turn {r} {c}", "colour {r} {c}"]).format(r=draft.name(obj, rng), c=colour)
    new = obj.model_copy(update={"colour": colour})
    return words, _replaced(draft.target, new), Change(op="recolour", object=obj.id, value=colour)


def resize(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    if (obj := _pick(draft, rng, busy)) is None:
        return None
    size = next(z for z in SIZE_NAMES if z != obj.size)
    comparative = "bigger" if size == "large" else "smaller"
    words = rng.choice(["make {r} {z}", "make {r} {c}"]).format(r=draft.name(obj, rng), z=size, c=comparative)
    new = obj.model_copy(update={"size": size})
    return words, _replaced(draft.target, new), Change(op="resize", object=obj.id, value=size)


def move_cell(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    obj = _pick(draft, rng, busy, lambda o: not _is_anchor(draft, o))
    cells = _free_cells(draft.target, busy)
    if obj is None or not cells:
        return None
    cell = rng.choice(cells)
    busy.add(cell)
    words = rng.choice(["move {r} to {w}", "put {r} {p}"]).format(
        r=draft.name(obj, rng), w=_cell_words(cell), p=CELL_PHRASES[cell]
    )
    new = obj.model_copy(update={"cell": cell, "relation": None})
    return words, _replaced(draft.target, new), Change(op="move_cell", object=obj.id, value=cell)


def move_relative(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    """An object that anchors nothing, beside one that has a cell of its own and anchors nothing yet, in a relation
    that does not hold now, to a free cell where it does."""
    options = []
    for obj in draft.target:
        if obj.id in busy or _is_anchor(draft, obj):
            continue
        for anchor in draft.target:
            if anchor.id == obj.id or anchor.relation or anchor.id in busy or _is_anchor(draft, anchor):
                continue
            for relation in RELATIONS:
                if holds(relation, obj.cell, anchor.cell):
                    continue
                cells = [c for c in _free_cells(draft.target, busy) if holds(relation, c, anchor.cell)]
                if cells:
                    options.append((obj, anchor, relation, cells))
    if not options:
        return None
    obj, anchor, relation, cells = rng.choice(options)
    cell = rng.choice(cells)
    busy |= {cell, anchor.id}
    verb = rng.choice(["move", "put"])
    words = f"{verb} the {obj.shape} {RELATION_PHRASES[relation]} the {anchor.shape}"
    new = obj.model_copy(update={"cell": cell, "relation": RelativePlace(relation=relation, anchor=anchor.id)})
    return words, _replaced(draft.target, new), Change(op="move_relative", object=obj.id, value=relation)


def _add(shapes: Sequence[str]) -> Maker:
    def add(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
        free_shapes = [s for s in shapes if s not in draft.used]
        cells = _free_cells(draft.target, busy)
        if len(draft.target) >= MAX_OBJECTS or not free_shapes or not cells:
            return None
        cell = rng.choice(cells)
        busy.add(cell)
        new = TargetObject(
            id=draft.new_id(),
            shape=rng.choice(free_shapes),
            colour=rng.choice(COLOUR_NAMES),
            size=rng.choice(SIZE_NAMES),
            cell=cell,
        )
        draft.used.add(new.shape)
        words = rng.choice(["add {p}", "also add {p}"]).format(p=new.group.phrase())
        return words, [*draft.target, new], Change(op="add", object=new.id, value=new.shape)

    return add


add_common = _add(COMMON_SHAPES)
add_rare = _add(RARE_SHAPES)


def remove(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    if len(draft.target) <= 1 or (obj := _pick(draft, rng, busy, lambda o: not _is_anchor(draft, o))) is None:
        return None
    if len([o for o in draft.target if o.id not in busy]) <= 1:
        return None  # keep one object that this message leaves alone
    words = rng.choice(["remove {r}", "delete {r}", "take out {r}"]).format(r=draft.name(obj, rng))
    return words, [o for o in draft.target if o.id != obj.id], Change(op="remove", object=obj.id)


def replace(draft: Draft, rng: random.Random, busy: set[str]) -> Clause | None:
    obj = _pick(draft, rng, busy, lambda o: not _is_anchor(draft, o) and o.relation is None)
    free_shapes = [s for s in SHAPES if s not in draft.used]
    if obj is None or not free_shapes:
        return None
    new = TargetObject(
        id=draft.new_id(),
        shape=rng.choice(free_shapes),
        colour=rng.choice(COLOUR_NAMES),
        size=rng.choice(SIZE_NAMES),
        cell=obj.cell,
    )
    draft.used.add(new.shape)
    busy.add(new.id)
    words = f"replace the {obj.shape} with {_article(f'{new.size} {new.colour} {new.shape}')}"
    target = [new if o.id == obj.id else o for o in draft.target]
    return words, target, Change(op="replace", object=obj.id, value=f"{new.id}:{new.shape}")


MAKERS: dict[str, Maker] = {
    "recolour": recolour,
    "resize": resize,
    "move_cell": move_cell,
    "move_relative": move_relative,
    "add_common": add_common,
    "add_rare": add_rare,
    "remove": remove,
    "replace": replace,
}
COMPOUND_PARTS = ("recolour", "resize", "move_cell", "add_common", "remove", "replace")  # no relation in a compound
UNDONE_PARTS = ("recolour", "resize", "move_cell", "add_common", "add_rare", "remove", "replace")
UNDO_WORDS = ("undo the last change", "undo that", "undo")


def _message(draft: Draft, rng: random.Random, kind: InstructionKind) -> tuple[str, list[Change]]:
    """One instruction of `kind` applied to `draft` (for undo: the change that the next turn undoes); raises
    LookupError when the draft cannot take it (the caller then drops the draft)."""
    if kind == "compound":
        parts = rng.sample(COMPOUND_PARTS, rng.choice((2, 3)))
    elif kind == "undo":
        parts = [rng.choice(UNDONE_PARTS)]
    else:
        parts = [kind]
    busy: set[str] = set()
    clauses, changes = [], []
    for part in parts:
        made = MAKERS[part](draft, rng, busy)
        if made is None:
            raise LookupError(part)
        words, draft.target, change = made
        busy.add(change.object or "")
        clauses.append(words)
        changes.append(change)
    return _join(clauses), changes


def instruction_count(kind: InstructionKind, rng: random.Random) -> tuple[int, int]:
    """(instructions, objects of the first prompt), feasible for the kind (see the module's docstring)."""
    if kind in ("add_common", "add_rare"):
        n = rng.randint(1, 3)
        return n, rng.randint(1, MAX_OBJECTS - n)
    if kind == "remove":
        n = rng.randint(1, 2)
        return n, rng.randint(n + 1, MAX_FIRST_OBJECTS)
    if kind == "undo":
        return 2 * rng.randint(1, 2), rng.randint(1, MAX_FIRST_OBJECTS)
    if kind in ("move_relative", "compound"):
        return rng.randint(1, 4), rng.randint(2, MAX_FIRST_OBJECTS)
    return rng.randint(1, 4), rng.randint(1, MAX_FIRST_OBJECTS)


def sample_conversation(rng: random.Random, kind: InstructionKind, cid: str = "", tries: int = 50) -> Conversation:
    """A conversation of `kind` whose every target scene lies in the evaluation half."""
    while True:
        n, first_objects = instruction_count(kind, rng)
        rare = kind != "add_rare" and rng.random() < 0.3
        layout = sample_layout(rng, first_objects, rare, p_count=0.0)
        if layout.scene.half != "eval":
            continue
        target = [
            TargetObject(id=f"o{i + 1}", shape=o.shape, colour=o.colour, size=o.size, cell=o.cell)
            for i, o in enumerate(layout.objects)
        ]
        draft = Draft(target=target, used={o.shape for o in target}, next_id=len(target))
        first = prompt_text([o.group for o in target], [], rng)
        turns = [
            ConversationTurn(
                index=1,
                kind="first",
                message=first,
                restated=first,
                changes=[Change(op="create", object=o.id, value=o.shape) for o in target],
                target=target,
            )
        ]
        history: list[list[TargetObject]] = [target]
        for i in range(n):
            if kind == "undo" and i % 2 == 1:
                previous = history[-2]
                words = rng.choice(UNDO_WORDS)
                turns.append(_turn(len(turns) + 1, kind, words, previous, [Change(op="undo")], rng))
                history.append(previous)
                draft.target = list(previous)
                continue
            made = _draw_instruction(draft, rng, kind, tries)
            if made is None:
                break
            words, new_target, changes = made
            # In an undo conversation, the change before each undo counts as its own kind.
            turn_kind: TurnKind = _kind_of(changes[0]) if kind == "undo" else kind
            turns.append(_turn(len(turns) + 1, turn_kind, words, new_target, changes, rng))
            history.append(new_target)
            draft.target = list(new_target)
        else:
            return Conversation(id=cid, kind=kind, turns=turns)


def _kind_of(change: Change) -> InstructionKind:
    if change.op == "add":
        return "add_rare" if (change.value or "") in RARE_SHAPES else "add_common"
    return change.op  # type: ignore[return-value]


def _draw_instruction(
    draft: Draft, rng: random.Random, kind: InstructionKind, tries: int
) -> tuple[str, list[TargetObject], list[Change]] | None:
    for _ in range(tries):
        trial = dataclasses.replace(draft, target=list(draft.target), used=set(draft.used))
        try:
            words, changes = _message(trial, rng, kind)
        except LookupError:
            continue
        if Scene(tuple(ObjectSpec(*o.key) for o in trial.target)).half == "eval":
            draft.used, draft.next_id = trial.used, trial.next_id
            return words, trial.target, changes
    return None


def _turn(
    index: int,
    kind: TurnKind,
    message: str,
    target: list[TargetObject],
    changes: list[Change],
    rng: random.Random,
) -> ConversationTurn:
    return ConversationTurn(
        index=index, kind=kind, message=message, restated=restate(target, rng), changes=changes, target=target
    )


# ----------------------------------------------------------------------------- the identity set

SAME_SHAPE_PARTS: tuple[InstructionKind, ...] = ("recolour", "resize", "move_cell", "remove")
PRONOUN_SETUPS: tuple[InstructionKind, ...] = ("recolour", "resize", "move_cell", "add_common", "add_rare")
PRONOUN_PARTS: tuple[InstructionKind, ...] = ("recolour", "resize", "move_cell")


def _same_shape_first(rng: random.Random) -> list[TargetObject]:
    """Two objects of one common shape, their colours different two times in three (else only their places tell them
    apart), half the time beside one object of another shape."""
    shape = rng.choice(COMMON_SHAPES)
    colours = rng.sample(COLOUR_NAMES, 2) if rng.random() < 2 / 3 else [rng.choice(COLOUR_NAMES)] * 2
    kinds = [(shape, colour) for colour in colours]
    if rng.random() < 0.5:
        kinds.append((rng.choice([s for s in COMMON_SHAPES if s != shape]), rng.choice(COLOUR_NAMES)))
    cells = rng.sample(CELLS, len(kinds))
    return [
        TargetObject(id=f"o{i + 1}", shape=s, colour=c, size=rng.choice(SIZE_NAMES), cell=cell)
        for i, ((s, c), cell) in enumerate(zip(kinds, cells, strict=True))
    ]


def _draw_one_of(
    draft: Draft, rng: random.Random, parts: Sequence[InstructionKind], tries: int
) -> tuple[str, list[TargetObject], list[Change]] | None:
    for _ in range(tries):
        if made := _draw_instruction(draft, rng, rng.choice(parts), 1):
            return made
    return None


def sample_identity_conversation(
    rng: random.Random, kind: IdentityKind, cid: str = "", last: InstructionKind | None = None, tries: int = 50
) -> Conversation:
    """same_shape: two objects of one shape, then 1 to 3 instructions (recolour, resize, move; remove only last, and
    `last` when given) on one of them, named by colour or place. pronoun: a change of one object or an add, then 1 or 2 changes of 'it'
    (recolour, resize, move). Every scene asked for in the evaluation half."""
    while True:
        if kind == "same_shape":
            target = _same_shape_first(rng)
            n = rng.randint(1, 3)
        else:
            layout = sample_layout(rng, rng.randint(1, MAX_FIRST_OBJECTS), rng.random() < 0.3, p_count=0.0)
            target = [
                TargetObject(id=f"o{i + 1}", shape=o.shape, colour=o.colour, size=o.size, cell=o.cell)
                for i, o in enumerate(layout.objects)
            ]
            n = rng.randint(2, 3)
        if Scene(tuple(ObjectSpec(*o.key) for o in target)).half != "eval":
            continue
        draft = Draft(target=target, used={o.shape for o in target}, next_id=len(target))
        first = prompt_text([o.group for o in target], [], rng)
        changes = [Change(op="create", object=o.id, value=o.shape) for o in target]
        turns = [ConversationTurn(index=1, kind="first", message=first, restated=first, changes=changes, target=target)]
        spoken = ""
        for i in range(n):
            if kind == "same_shape":
                shapes = [o.shape for o in draft.target]
                draft.naming, draft.only = "identity", {o.id for o in draft.target if shapes.count(o.shape) > 1}
                parts = SAME_SHAPE_PARTS[:-1] if i < n - 1 else (last,) if last else SAME_SHAPE_PARTS
            elif i == 0:
                parts = PRONOUN_SETUPS
            else:  # 'it': the object the previous message changed or added
                draft.naming, draft.only, parts = "pronoun", {spoken}, PRONOUN_PARTS
            made = _draw_one_of(draft, rng, parts, tries)
            if made is None:
                break
            words, new_target, (change,) = made
            spoken = change.object or ""
            turn_kind: TurnKind = _kind_of(change) if kind == "pronoun" and i == 0 else kind
            turns.append(_turn(len(turns) + 1, turn_kind, words, new_target, [change], rng))
            draft.target = list(new_target)
        else:
            return Conversation(id=cid, kind=kind, turns=turns)


def identity_conversations() -> list[Conversation]:
    """The identity set, deterministic: IDENTITY_SET's number of conversations per kind, first scenes distinct; the
    same_shape conversations end on each of SAME_SHAPE_PARTS in turn (so a remove of one of two is always there)."""
    per_kind, seed = IDENTITY_SET
    rng = random.Random(seed)
    taken: set[tuple] = set()
    out: list[Conversation] = []
    for kind in IDENTITY_KINDS:
        made = 0
        while made < per_kind:
            last = SAME_SHAPE_PARTS[made % len(SAME_SHAPE_PARTS)] if kind == "same_shape" else None
            conversation = sample_identity_conversation(rng, kind, f"identity-{kind}-{made}", last)
            if (key := conversation.turns[0].scene.key) not in taken:
                taken.add(key)
                out.append(conversation)
                made += 1
    return out


def write_identity_set(folder: Path = CONVERSATION_PROMPTS_DIR) -> None:
    text = "".join(c.model_dump_json(exclude_defaults=False) + "\n" for c in identity_conversations())
    split_path("identity", folder).write_text(text)


# ----------------------------------------------------------------------------- splits


def split_conversations(name: str) -> list[Conversation]:
    """A split, deterministic: per instruction kind the same number of conversations, first scenes distinct within
    the split and (for test) from every dev conversation's."""
    per_kind, seed = CONVERSATION_SPLITS[name]
    taken = {c.turns[0].scene.key for c in split_conversations("dev")} if name == "test" else set()
    rng = random.Random(seed)
    out: list[Conversation] = []
    for kind in INSTRUCTION_KINDS:
        made = 0
        while made < per_kind:
            conversation = sample_conversation(rng, kind, f"{name}-{kind}-{made}")
            if (key := conversation.turns[0].scene.key) in taken:
                continue
            taken.add(key)
            out.append(conversation)
            made += 1
    return out


def split_path(name: str, folder: Path = CONVERSATION_PROMPTS_DIR) -> Path:
    return folder / f"conversations-{name}.jsonl"


def write_conversation_splits(folder: Path = CONVERSATION_PROMPTS_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in CONVERSATION_SPLITS:
        text = "".join(c.model_dump_json(exclude_defaults=False) + "\n" for c in split_conversations(name))
        split_path(name, folder).write_text(text)


def load_conversations(path: Path) -> list[Conversation]:
    """A JSONL file of Conversation objects; errors name the line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(Conversation.model_validate_json(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a conversation of the miniature world: {e}") from e
    if not out:
        raise ValueError(f"{path}: no conversations")
    if len({c.id for c in out}) != len(out):
        raise ValueError(f"{path}: conversation ids must be unique")
    return out


# ----------------------------------------------------------------------------- judging


class TurnJudgement(BaseModel):
    """A turn's target on one image's reading."""

    concepts: list[tuple[str, bool]] = Field(description="(kind, right) per concept of the target's objects.")
    absent: list[tuple[str, bool]] = Field(description="(shape, not drawn) per object taken away, in `gone`'s order.")

    @property
    def all_right(self) -> bool:
        return all(ok for _, ok in self.concepts) and all(ok for _, ok in self.absent)


def _agreement(obj: TargetObject, read: Detected) -> int:
    """How well a read object of obj's shape stands for it: the cell first (one object a cell, so two objects of one
    shape are told apart by where they are), then colour and size; 1 for being matched at all."""
    return 1 + 3 * (read.cell == obj.cell) + (read.colour == obj.colour) + (read.size == obj.size)


def match(objects: Sequence[TargetObject], reading: Sequence[Detected]) -> dict[str, Detected | None]:
    """Object id -> the read object that stands for it, one to one: per shape, the assignment of read objects to the
    objects of that shape (or to none) that agrees most in all. Two objects of one shape never share a read object."""
    out: dict[str, Detected | None] = {}
    for shape in dict.fromkeys(o.shape for o in objects):
        mine = [o for o in objects if o.shape == shape]
        read: list[Detected | None] = [d for d in reading if d.shape == shape]
        best = max(
            itertools.permutations(read + [None] * len(mine), len(mine)),
            key=lambda picks: sum(_agreement(o, d) for o, d in zip(mine, picks, strict=True) if d is not None),
        )
        out |= {o.id: d for o, d in zip(mine, best, strict=True)}
    return out


def judge_turn(
    target: Sequence[TargetObject], gone: Sequence[TargetObject], reading: Sequence[Detected]
) -> TurnJudgement:
    """Each target object's shape, colour, size and place (its cell, or its relation to its anchor's read place) on
    the read objects, and each object in `gone` (objects the conversation removed or replaced) not drawn: no read
    object of its shape left to stand for it once the target's objects took theirs (matched together, so a square
    removed beside a square kept is judged by which square is drawn where)."""
    everything = match([*target, *gone], reading)
    matched = {o.id: everything[o.id] for o in target}
    concepts: list[tuple[str, bool]] = []
    for o in target:
        d = matched[o.id]
        concepts += [("shape", d is not None), ("colour", d is not None and d.colour == o.colour)]
        concepts.append(("size", d is not None and d.size == o.size))
        if o.relation is None:
            concepts.append(("position", d is not None and d.cell == o.cell))
        else:
            anchor = matched[o.relation.anchor]
            ok = d is not None and anchor is not None and holds(o.relation.relation, d.cell, anchor.cell)
            concepts.append(("relation", ok))
    absent = [(o.shape, everything[o.id] is None) for o in gone]
    return TurnJudgement(concepts=concepts, absent=absent)


def gone_objects(conversation: Conversation, index: int) -> list[TargetObject]:
    """Objects asked for before turn `index` (1-based) that its target no longer holds (by id), each as last asked."""
    now = {o.id for o in conversation.turns[index - 1].target}
    last = {o.id: o for t in conversation.turns[: index - 1] for o in t.target}
    return [o for i, o in last.items() if i not in now]


def untouched(previous: Sequence[TargetObject], current: Sequence[TargetObject]) -> list[TargetObject]:
    """Objects that a turn asks to stay as they were: in both targets, equal in every field."""
    before = {o.id: o for o in previous}
    return [o for o in current if before.get(o.id) == o]


def names_a_world_object(text: str) -> bool:
    """Whether a concept's text names a shape of the world ('a red ring', 'two stars'); 'a bottom' does not."""
    words = {w.strip(".,;:!?'\"()") for w in text.lower().split()}
    return bool(words & (set(SHAPES) | set(PLURALS.values())))
