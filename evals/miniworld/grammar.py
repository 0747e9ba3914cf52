"""Prompts of the miniature world with k checkable concepts (as in ConceptMix), and how an image's reading is
judged against them.

A prompt names groups of objects. A group is one object ("a large red star in the top left") or a count of
objects of one shape ("two cyan rings"), and two single objects may be tied by a relation ("a heart to the left of
a blue ring"; such objects get no cell, so that cell and relation never contradict). Its concepts:

    shape     the group's shape is drawn (for a count, every object of the group)
    colour    the group's objects have the named colour
    size      the object has the named size
    position  the object is in the named cell
    count     exactly n objects of the group's shape (and colour, when named) are drawn
    relation  the first object is left of / right of / above / below the second (grid columns and rows)

Every prompt names every object of its scene, and groups have distinct shapes. The JSONL schema of
`imagerag eval miniworld --prompts FILE` is PromptSpec, one object per line; `scene` is optional and, when given,
is checked against the retrieval corpus.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from imagerag.tools.miniworld.world import (
    CELL_PHRASES,
    CELLS,
    COLOUR_NAMES,
    COMMON_SHAPES,
    JITTER,
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
    random_object,
)

NUMBERS = {2: "two", 3: "three", 4: "four"}
ConceptKind = Literal["shape", "colour", "size", "position", "count", "relation"]
CONCEPT_KINDS: tuple[ConceptKind, ...] = ("shape", "colour", "size", "position", "count", "relation")


class Group(BaseModel):
    shape: str
    count: int = Field(default=1, ge=1, le=MAX_OBJECTS)
    colour: str | None = None
    size: str | None = None
    cell: str | None = None

    @model_validator(mode="after")
    def _known(self) -> Group:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, (None, *COLOUR_NAMES), "colour"),
            (self.size, (None, *SIZE_NAMES), "size"),
            (self.cell, (None, *CELLS), "cell"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}")
        if self.count > 1 and (self.size or self.cell):
            raise ValueError("a count group names neither a size nor a cell")
        return self

    def phrase(self, name: str | None = None) -> str:
        """'a large red star in the top left', 'two cyan rings'; `name` replaces the shape's word."""
        colour = f"{self.colour} " if self.colour else ""
        if self.count > 1:
            return f"{NUMBERS[self.count]} {colour}{name or PLURALS[self.shape]}"
        size = f"{self.size} " if self.size else ""
        cell = f" {CELL_PHRASES[self.cell]}" if self.cell else ""
        words = f"{size}{colour}{name or self.shape}{cell}"
        return f"{'an' if words.startswith(('a', 'e', 'i', 'o', 'u', 'hour')) else 'a'} {words}"


class RelationSpec(BaseModel):
    subject: int = Field(ge=0, description="Index of a single-object group.")
    relation: Relation
    object: int = Field(ge=0)


class Concept(BaseModel):
    kind: ConceptKind
    group: int
    value: str  # the shape, colour, size, cell, count or relation
    other: int | None = None  # a relation's second group


class PromptSpec(BaseModel):
    """One evaluation prompt: its text and what it asks for."""

    id: str
    prompt: str
    groups: list[Group] = Field(min_length=1)
    relations: list[RelationSpec] = []
    scene: list[dict] | None = Field(default=None, description="ObjectSpec fields of the scene it was drawn from.")

    @model_validator(mode="after")
    def _consistent(self) -> PromptSpec:
        if sum(g.count for g in self.groups) > MAX_OBJECTS:
            raise ValueError(f"a prompt names at most {MAX_OBJECTS} objects")
        if len({g.shape for g in self.groups}) != len(self.groups):
            raise ValueError("two groups of a prompt share a shape")
        for r in self.relations:
            for i in (r.subject, r.object):
                if i >= len(self.groups) or self.groups[i].count > 1 or self.groups[i].cell:
                    raise ValueError(f"relation {r}: both sides must be single objects without a cell")
        return self

    @property
    def concepts(self) -> list[Concept]:
        out: list[Concept] = []
        for i, g in enumerate(self.groups):
            out.append(Concept(kind="shape", group=i, value=g.shape))
            if g.count > 1:
                out.append(Concept(kind="count", group=i, value=str(g.count)))
            for kind, value in (("colour", g.colour), ("size", g.size), ("position", g.cell)):
                if value:
                    out.append(Concept(kind=kind, group=i, value=value))  # type: ignore[arg-type]
        out += [Concept(kind="relation", group=r.subject, value=r.relation, other=r.object) for r in self.relations]
        return out

    @property
    def k(self) -> int:
        return len(self.concepts)

    @property
    def has_rare(self) -> bool:
        return self.rare_objects > 0

    @property
    def rare_objects(self) -> int:
        return sum(g.shape in RARE_SHAPES for g in self.groups)

    @property
    def scene_objects(self) -> Scene | None:
        return Scene(tuple(ObjectSpec(**o) for o in self.scene)) if self.scene else None

    @property
    def scene_key(self) -> tuple | None:
        return self.scene_objects.key if self.scene_objects else None


def concept_text(spec: PromptSpec, c: Concept) -> str:
    """A concept alone, as the offline planner words it: 'a star', 'a red star', 'a star in the top left',
    'two stars', 'two red stars', 'a star to the left of a blue ring'."""
    g = spec.groups[c.group]
    bare = Group(shape=g.shape, count=g.count)
    if c.kind in ("shape", "count"):
        return bare.phrase()
    if c.kind == "relation":
        return f"{bare.phrase()} {RELATION_PHRASES[c.value]} {spec.groups[c.other or 0].phrase()}"
    attr = {"colour": "colour", "size": "size", "position": "cell"}[c.kind]
    return bare.model_copy(update={attr: c.value}).phrase()


def prompt_text(
    groups: Sequence[Group], relations: Sequence[RelationSpec], rng: random.Random, names: dict[int, str] | None = None
) -> str:
    """Clauses in random order: each relation's pair in one clause, every other group alone. `names` replaces some
    groups' shape words (training hides rare shapes behind other words)."""
    names = names or {}
    paired = {i for r in relations for i in (r.subject, r.object)}
    clauses = [
        f"{groups[r.subject].phrase(names.get(r.subject))} {RELATION_PHRASES[r.relation]} "
        f"{groups[r.object].phrase(names.get(r.object))}"
        for r in relations
    ]
    clauses += [g.phrase(names.get(i)) for i, g in enumerate(groups) if i not in paired]
    rng.shuffle(clauses)
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Layout:
    """A scene and its grouping: members[i] are the indices of group i's objects (one, or a count's several)."""

    objects: tuple[ObjectSpec, ...]
    members: tuple[tuple[int, ...], ...]

    @property
    def scene(self) -> Scene:
        return Scene(self.objects)

    @property
    def base_k(self) -> int:
        """Concepts every prompt of this layout carries: each group's shape, and each count."""
        return sum(1 + (len(m) > 1) for m in self.members)

    @property
    def max_k(self) -> int:
        return sum(2 if len(m) > 1 else 4 for m in self.members)


def sample_layout(
    rng: random.Random, n_objects: int, rare: int, p_count: float = 0.25, jitter: float = JITTER
) -> Layout:
    """n_objects in distinct cells, with distinct shapes per group; sometimes a count group (2 or 3 objects of one
    shape and colour). `rare` single objects (0, 1 or 2; True is 1) have a rare shape each, distinct."""
    sizes = [1] * n_objects
    counts = [c for c in (2, 3) if c <= n_objects - rare]  # a rare object stays single
    if counts and rng.random() < p_count:
        n = rng.choice(counts)
        sizes = [n] + [1] * (n_objects - n)
    shapes = rng.sample(COMMON_SHAPES, len(sizes))
    singles = [i for i, n in enumerate(sizes) if n == 1]
    if rare == 1:  # drawn as before two rare objects existed, so earlier layouts and splits stay the same
        shapes[rng.choice(singles)] = rng.choice(RARE_SHAPES)
    elif rare > 1:
        for i, shape in zip(rng.sample(singles, rare), rng.sample(RARE_SHAPES, rare), strict=True):
            shapes[i] = shape
    cells = iter(rng.sample(CELLS, n_objects))
    objects: list[ObjectSpec] = []
    members: list[tuple[int, ...]] = []
    for shape, n in zip(shapes, sizes, strict=True):
        colour = rng.choice(COLOUR_NAMES)
        members.append(tuple(range(len(objects), len(objects) + n)))
        for _ in range(n):
            obj = random_object(rng, next(cells), jitter=jitter)
            objects.append(ObjectSpec(shape, colour, obj.size, obj.cell, obj.dx, obj.dy))
    return Layout(tuple(objects), tuple(members))


def describe(layout: Layout, k: int, rng: random.Random, pid: str = "", p_relation: float = 0.35) -> PromptSpec:
    """A prompt naming every object of `layout` with exactly k concepts (base_k <= k <= max_k): sometimes a relation
    between two single objects (which then get no cell), then colours, sizes and cells at random."""
    if not layout.base_k <= k <= layout.max_k:
        raise ValueError(f"this layout carries {layout.base_k} to {layout.max_k} concepts, not {k}")
    objects, members = layout.objects, layout.members
    groups = [Group(shape=objects[m[0]].shape, count=len(m)) for m in members]
    singles = [i for i, m in enumerate(members) if len(m) == 1]
    rng.shuffle(singles)
    relations: list[RelationSpec] = []

    def room() -> int:  # optional slots left once relations took their groups' cells
        related = {i for r in relations for i in (r.subject, r.object)}
        return len(groups) + sum(3 - (i in related) for i in singles) + sum(2 for r in relations)

    while len(singles) >= 2 and layout.base_k + len(relations) < k and rng.random() < p_relation:
        a, b = singles.pop(), singles.pop()
        ca, cb = objects[members[a][0]].cell, objects[members[b][0]].cell
        true = [r for r in RELATIONS if holds(r, ca, cb)]
        relations.append(RelationSpec(subject=a, relation=rng.choice(true), object=b))
        if room() + layout.base_k + len(relations) - len(groups) < k:  # too few slots left: undo
            relations.pop()
            break
    related = {i for r in relations for i in (r.subject, r.object)}
    slots = [(i, "colour") for i in range(len(groups))]
    slots += [(i, "size") for i, m in enumerate(members) if len(m) == 1]
    slots += [(i, "cell") for i, m in enumerate(members) if len(m) == 1 and i not in related]
    for i, attr in rng.sample(slots, k - layout.base_k - len(relations)):
        groups[i] = groups[i].model_copy(update={attr: getattr(objects[members[i][0]], attr)})
    text = prompt_text(groups, relations, rng)
    return PromptSpec(id=pid, prompt=text, groups=groups, relations=relations, scene=[o.__dict__ for o in objects])


def sample_prompt(
    rng: random.Random, k: int, rare: int, pid: str = "", half: Literal["corpus", "eval"] | None = None
) -> PromptSpec:
    """A prompt with exactly k concepts about a fresh scene with `rare` rare objects (in `half` of the scene space
    when given)."""
    if not 1 <= k <= 4 * MAX_OBJECTS:
        raise ValueError(f"k must be 1 to {4 * MAX_OBJECTS}")
    while True:
        layout = sample_layout(rng, rng.randint(max(1, int(rare), -(-k // 4)), min(MAX_OBJECTS, k)), rare)
        if layout.base_k <= k <= layout.max_k and (half is None or layout.scene.half == half):
            return describe(layout, k, rng, pid)


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Detected:
    """One object read in an image (by the oracle, or known from a rendered scene)."""

    shape: str
    colour: str
    size: str
    cell: str


@dataclass(frozen=True)
class Judgement:
    concepts: list[tuple[Concept, bool]]

    @property
    def all_right(self) -> bool:
        return all(ok for _, ok in self.concepts)

    def by_kind(self) -> dict[str, list[bool]]:
        out: dict[str, list[bool]] = {}
        for c, ok in self.concepts:
            out.setdefault(c.kind, []).append(ok)
        return out


def judge(spec: PromptSpec, reading: Sequence[Detected]) -> Judgement:
    """Each concept of `spec` on the objects read in an image, under the assignment of read objects to the prompt's
    objects that satisfies the most concepts (one read object serves one prompt object)."""
    concepts = spec.concepts
    slots = [i for i, g in enumerate(spec.groups) for _ in range(g.count)]
    # Every concept of a group needs its shape, so a prompt object is only ever matched to a read object of that shape.
    options = [[j for j, d in enumerate(reading) if d.shape == spec.groups[g].shape] + [None] for g in slots]
    best: list[bool] | None = None
    for assignment in itertools.product(*options):
        chosen = [a for a in assignment if a is not None]
        if len(set(chosen)) != len(chosen):
            continue
        placed: dict[int, list[Detected | None]] = {}
        for group, a in zip(slots, assignment, strict=True):
            placed.setdefault(group, []).append(reading[a] if a is not None else None)
        flags = [_holds(c, spec, placed, reading) for c in concepts]
        if best is None or sum(flags) > sum(best):
            best = flags
            if all(flags):
                break
    assert best is not None
    return Judgement(list(zip(concepts, best, strict=True)))


def _holds(c: Concept, spec: PromptSpec, placed: dict[int, list[Detected | None]], reading: Sequence[Detected]) -> bool:
    objs = placed[c.group]
    if c.kind == "count":
        g = spec.groups[c.group]
        return sum(d.shape == g.shape and (g.colour is None or d.colour == g.colour) for d in reading) == g.count
    if c.kind == "relation":
        a, b = objs[0], placed[c.other or 0][0]
        return (
            a is not None and b is not None and a.shape == spec.groups[c.group].shape and holds(c.value, a.cell, b.cell)
        )
    attr = {"shape": "shape", "colour": "colour", "size": "size", "position": "cell"}[c.kind]
    return all(o is not None and o.shape == spec.groups[c.group].shape and getattr(o, attr) == c.value for o in objs)


def reading_of(scene: Scene) -> list[Detected]:
    return [Detected(o.shape, o.colour, o.size, o.cell) for o in scene.objects]
