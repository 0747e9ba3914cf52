"""The loop's rules, as pure functions of the state: which image is best, what a verdict may claim, what the next
round's references are for, and when the run stops. Both policies use them; tests/test_rules.py pins them down."""

from __future__ import annotations

from collections import Counter
from collections.abc import Set as AbstractSet

from imagerag.graphs.state import RunState, Usage
from imagerag.tools.grid import (
    CELL_BOXES,
    CELL_PHRASES,
    NUMBERS,
    article,
    cell_of,
    named_cell,
    pair_for,
    relation_sign,
    singular,
)
from imagerag.tools.revision import read_phrase
from imagerag.tools.types import Box, Candidate, Concept, ConceptVerdict, Edit, EditRegion

RankKey = tuple[int, int, int, int, float, int]


def drawn_from_text(candidates: list[Candidate], concepts: list[Concept]) -> set[str]:
    """Ids of the concepts that images drawn without references showed more often than they missed: what the
    generator draws from text (one lucky image of a rare object is not that). Of an edit, only what it redrew counts
    (the objects of its regions, with their attributes and places): what it kept came from its source, perhaps drawn
    from a reference."""
    deps = dependents(concepts)
    tally: Counter[str] = Counter()
    for c in candidates:
        if c.references:
            continue
        tried = {v.concept_id for v in c.verdicts}
        if c.edit is not None:
            redrawn = {cid for r in c.edit.regions if r.text for cid in r.concept_ids}
            tried &= redrawn | {d.id for cid in redrawn for d in deps.get(cid, [])}
        tally.update({cid: 1 if cid in c.satisfied_ids else -1 for cid in tried})
    return {cid for cid, n in tally.items() if n > 0}


def rank_key(candidate: Candidate, roots: frozenset[str], hard: frozenset[str]) -> RankKey:
    """Ordering of candidates, best last. First the satisfied `roots` (the concepts that depend on nothing: objects,
    styles), as in DSG: an image missing an object is worse than one with a wrong attribute. Then the satisfied
    `hard` roots, those no image from text alone showed: between two images with as many objects, the one showing
    what only a reference could draw is the one a fresh sample would not give back. Then satisfied concepts, then
    the fewer objects nobody asked for, then the mean score, then the earlier image (cheaper to reproduce)."""
    satisfied = candidate.satisfied_ids
    return (
        len(satisfied & roots),
        len(satisfied & hard),
        len(satisfied),
        -len(candidate.strays),
        candidate.score,
        -candidate.round,
    )


def best_candidate(candidates: list[Candidate], concepts: list[Concept]) -> Candidate | None:
    """The judged candidate ranked first (see rank_key)."""
    roots = frozenset(c.id for c in concepts if not c.depends_on)
    hard = roots - drawn_from_text(candidates, concepts)
    return max((c for c in candidates if c.judged), key=lambda c: rank_key(c, roots, hard), default=None)


def best_of_turn(state: RunState) -> Candidate | None:
    return best_candidate(state.current(), state.concepts)


def enforce_dependencies(verdicts: list[ConceptVerdict], concepts: list[Concept]) -> list[ConceptVerdict]:
    """A child concept (an attribute of an object) is never satisfied while a concept it depends on is missing,
    through any chain of dependencies and whatever order the concepts come in. Returned in the concepts' order."""
    by_id = {v.concept_id: v for v in verdicts}
    parents = {c.id: c.depends_on for c in concepts}
    changed = True
    while changed:  # each pass only turns satisfied into missing, so it ends
        changed = False
        for concept_id, verdict in by_id.items():
            missing = [p for p in parents.get(concept_id, []) if p in by_id and not by_id[p].satisfied]
            if verdict.satisfied and missing:
                evidence = f"{verdict.evidence} (needs {', '.join(missing)}, which is missing)".strip()
                by_id[concept_id] = verdict.model_copy(
                    update={"satisfied": False, "score": min(verdict.score, 0.49), "evidence": evidence}
                )
                changed = True
    order = {c.id: i for i, c in enumerate(concepts)}
    return sorted(by_id.values(), key=lambda v: order.get(v.concept_id, len(order)))


def claims_stop(verdicts: list[ConceptVerdict], concepts: list[Concept]) -> bool:
    """Whether these verdicts of one image would end the run: every concept judged, and satisfied."""
    judged = {v.concept_id: v.satisfied for v in verdicts}
    return bool(concepts) and all(judged.get(c.id, False) for c in concepts)


def concepts_from_best(concepts: list[Concept], candidates: list[Candidate]) -> list[Concept]:
    """Each concept carries its verdict on the best candidate of the latest turn: the image the run would return."""
    turn = max((c.turn for c in candidates), default=0)
    chosen = best_candidate([c for c in candidates if c.turn == turn], concepts)
    if chosen is None:
        return concepts
    best = {v.concept_id: v for v in chosen.verdicts}
    return [
        c.model_copy(
            update={"verdict": "satisfied" if v.satisfied else "missing", "score": v.score, "evidence": v.evidence}
        )
        if (v := best.get(c.id))
        else c
        for c in concepts
    ]


def targets_for_round(state: RunState, limit: int) -> list[Concept]:
    """Which concepts this round's references show, within the generator's reference limit.

    References go to what the generator cannot draw from text. A missing concept that an image drawn from text
    alone already showed needs another sample, not a reference (with one reference slot, spending it there would
    trade away the concept that did need it). When every missing concept is of that kind, the references go to the
    satisfied concepts that only reference-conditioned images showed, so the next sample keeps them. Within that:
    objects before attributes (an attribute cannot be right without its object; an attribute whose object is
    missing comes last), then the least tried, then prompt order.
    """
    from_text = drawn_from_text(state.current(), state.concepts)
    missing = [c for c in state.missing() if c.kind != "absent"]  # nothing to retrieve for what must not be there
    missing_ids = {c.id for c in missing}
    needs_reference = [c for c in missing if c.id not in from_text]
    kept_by_reference = [
        c for c in state.concepts if c.kind != "absent" and c.id not in from_text and c.verdict == "satisfied"
    ]
    targets = needs_reference or kept_by_reference or missing
    return _reference_order(targets, missing_ids)[:limit]


def targets_for_regions(state: RunState, regions: list[EditRegion], limit: int) -> list[tuple[int, Concept]]:
    """For an edit whose regions each take a reference of their own: (region index, concept) for each redrawn
    region whose object misses something no image from text showed, that concept chosen as targets_for_round
    orders them; regions whose misses text did show are redrawn from text. At most `limit`."""
    from_text = drawn_from_text(state.current(), state.concepts)
    missing = [c for c in state.missing() if c.kind != "absent"]
    missing_ids = {c.id for c in missing}
    order = _reference_order([c for c in missing if c.id not in from_text], missing_ids)
    out: list[tuple[int, Concept]] = []
    for i, region in enumerate(regions):
        owners = set(region.concept_ids)
        target = next((c for c in order if c.id in owners or owners & set(c.depends_on)), None)
        if region.text and target is not None:
            out.append((i, target))
    return out[:limit]


def _reference_order(concepts: list[Concept], missing_ids: AbstractSet[str]) -> list[Concept]:
    """Objects before attributes, an attribute whose object is missing last, then the least tried, then prompt
    order."""
    return sorted(concepts, key=lambda c: (bool(c.depends_on), any(p in missing_ids for p in c.depends_on), c.attempts))


def clock(state: RunState, usage: Usage | None = None) -> Usage:
    """`usage` (default: the state's) with seconds brought up to now."""
    return (usage or state.usage).model_copy(update={"seconds": state.elapsed()})


def stop_reason(state: RunState) -> str | None:
    """The graph's stop rule, whatever the policy wants: a failure, every concept satisfied in an image that holds
    nothing else (an object nobody asked for is not what was asked), or a budget spent."""
    if state.status == "failed":
        return "failed"
    if state.concepts and all(c.verdict == "satisfied" for c in state.concepts):
        best = best_of_turn(state)
        if best is None or not best.strays:
            return "satisfied"
    spent = clock(state).spent(state.budget)
    return f"budget_exhausted:{spent}" if spent else None


def dependents(concepts: list[Concept]) -> dict[str, list[Concept]]:
    """The concepts that depend on each concept (an object's attributes, its place, its relations)."""
    out: dict[str, list[Concept]] = {c.id: [] for c in concepts}
    for c in concepts:
        for parent in c.depends_on:
            out.setdefault(parent, []).append(c)
    return out


def edit_regions(
    state: RunState,
    occupied: AbstractSet[str],
    focus: AbstractSet[str] = frozenset(),
    compose_over: int | None = None,
) -> list[EditRegion]:
    """What an edit of the best image redraws; [] when the whole image should be drawn again instead.

    An edit pays when the best image holds at least one object with all its concepts and misses something of
    another object. Each such object is redrawn: in its place when only its look is wrong; else in the cell its
    position words or its relation to a kept object ask for, or the layout's, or a free one, with its old place
    cleared. `occupied`: grid cells where the best image has something drawn. `focus`: the concepts this round's
    references are for when one reference conditions the whole edit: only their objects are redrawn with it (the
    others wait for a later round: the loop composes the image object by object); left empty when each redrawn object
    gets a reference of its own (targets_for_regions), so that every broken object is redrawn at once. A count that
    misses something is drawn again whole, one region per thing counted, and what no asked object explains is
    cleared. A style cannot be fixed in one region, so when one is missing the whole image is drawn again. An object that
    must be absent (a message removed it) and is still seen gets its region cleared to the background, and so does
    a stray (an object nobody asked for, often the generator's try at a shape it cannot draw from text), unless a
    redrawn object takes its cell: strays are the first cells a redrawn object without a place of its own takes.
    `compose_over` (per-region references only): when no object is whole and more than this many objects need a
    reference (the most a whole image can take), the edit composes the image instead, each object in a region of
    its own with its reference; the rest of the image stays as in any edit (the things of a count that holds are not
    objects of their own here: clearing what no object takes would take them away)."""
    best = best_of_turn(state)
    if best is None:
        return []
    ok = best.satisfied_ids
    if any(c.kind == "style" and c.id not in ok for c in state.concepts):
        return []
    deps = dependents(state.concepts)
    objects = [c for c in state.concepts if c.kind == "object" and not c.depends_on]
    broken = [o for o in objects if any(c.id not in ok for c in [o, *deps[o.id]])]
    counts = [c for c in state.concepts if c.kind == "count" and any(d.id not in ok for d in [c, *deps[c.id]])]
    clears = absent_regions(state.concepts, best)
    strays = {cell_of(box) for box in best.strays} - {cell_of(r.box) for r in clears}
    if not broken and not counts:
        return [*clears, *(EditRegion(box=CELL_BOXES[c], text="", concept_ids=[]) for c in sorted(strays))]
    if len(broken) == len(objects):
        from_text = drawn_from_text(state.current(), state.concepts)
        needing = [o for o in objects if any(c.id not in ok and c.id not in from_text for c in [o, *deps[o.id]])]
        if compose_over is None or len(needing) <= compose_over:
            return []
    owners = {p for c in state.concepts if c.id in focus for p in [c.id, *c.depends_on]}
    broken = [o for o in broken if o.id in owners] or broken
    places = {v.concept_id: cell_of(v.box) for v in best.verdicts if v.box and v.concept_id in ok}
    named = {o.id: n for o in objects if (n := _named_cell(o, deps))}  # the cells position words name
    kept_cells = {places[o.id] for o in objects if o not in broken and o.id in places}
    taken = (set(occupied) - strays) | kept_cells
    moves = _relation_moves(broken, objects, deps, ok, places, taken)
    broken = [o for o in objects if (o in broken or o.id in moves) and moves.get(o.id, "") != places.get(o.id)]
    taken |= set(moves.values())
    regions: list[EditRegion] = []
    for obj in broken:
        position = [d for d in deps[obj.id] if d.kind == "relation"]
        old = places.get(obj.id)
        if obj.id in moves:
            cell = moves[obj.id]
            if old is not None:
                regions.append(EditRegion(box=CELL_BOXES[old], text="", concept_ids=[obj.id]))
        elif old is not None and all(d.id in ok for d in position):
            cell = old  # drawn where it belongs: only its look is wrong
        else:
            # A cell another object's position words name is not free for this one (a stray there is replaced
            # by that object, not by an object that may go anywhere).
            others = {n for oid, n in named.items() if oid != obj.id}
            cell = _target_cell(
                obj, position, objects, state.layout, places, (taken - {old} if old else taken) | others, prefer=strays
            )
            if old is not None and old != cell:
                regions.append(EditRegion(box=CELL_BOXES[old], text="", concept_ids=[obj.id]))
        taken.add(cell)
        regions.append(
            EditRegion(box=CELL_BOXES[cell], text=region_text(obj, deps[obj.id], cell), concept_ids=[obj.id])
        )
    if counts:
        # A count is drawn again whole, one region per thing counted: in the cells no asked object explains (where
        # its things, or wrong ones, are drawn now), then in free ones; what is left unexplained is cleared, so
        # that exactly as many are seen as asked.
        unexplained = set(occupied) - set(places.values()) - {cell_of(r.box) for r in regions if r.text}
        reserved = set(named.values()) - {cell_of(r.box) for r in regions if r.text}
        free = [c for c in FREE_ORDER if c in unexplained] + [
            c for c in FREE_ORDER if c not in taken | unexplained | reserved
        ]
        for count in counts:
            wanted = NUMBERS.get(count.text.split()[0].lower(), 0)
            if not wanted or len(free) < wanted:
                return []
            cells, free = free[:wanted], free[wanted:]
            text = _count_phrase(count, deps[count.id])
            regions += [
                EditRegion(box=CELL_BOXES[c], text=f"{text} {CELL_PHRASES[c]}", concept_ids=[count.id]) for c in cells
            ]
        strays |= unexplained
    strays -= {cell_of(r.box) for r in regions}
    drawn = {cell_of(r.box) for r in regions if r.text}
    regions = [r for r in regions if r.text or cell_of(r.box) not in drawn]  # a cell one object leaves, another takes
    return [*clears, *(EditRegion(box=CELL_BOXES[c], text="", concept_ids=[]) for c in sorted(strays)), *regions]


def _relation_moves(
    broken: list[Concept],
    objects: list[Concept],
    deps: dict[str, list[Concept]],
    ok: AbstractSet[str],
    places: dict[str, str],
    taken: AbstractSet[str],
) -> dict[str, str]:
    """Cells chosen together for both ends of a missing relation ('a square to the left of a ring') where placing
    the subject alone cannot satisfy it: the other end is being redrawn too (it has no place yet), or nothing free
    lies on the asked side of where it stands. In order: the subject, when only the relation is wrong with it,
    stays and the other end is drawn on the right side of it; else the other end stays and the subject moves; else
    both move to a free pair (their own cells count as free). Object id -> cell, for the objects placed here."""
    moves: dict[str, str] = {}
    for subject in broken:
        for relation in deps[subject.id]:
            sign = relation_sign(relation.text)
            if relation.kind != "relation" or relation.id in ok or named_cell(relation.text) or sign is None:
                continue
            noun = relation.text.split()[-1]
            other = next((o for o in objects if o.id != subject.id and o.text.split()[-1] == noun), None)
            if other is None or {subject.id, other.id} & moves.keys() or _named_cell(other, deps):
                continue
            own = {places[o.id] for o in (subject, other) if o.id in places}
            free = [c for c in FREE_ORDER if c not in taken]
            other_whole = other not in broken and other.id in places
            if other_whole and pair_for(sign, places[other.id], free):
                continue  # the usual move: the subject goes to the asked side of where the other stands
            stays = subject.id in places and all(d.id in ok for d in [subject, *deps[subject.id]] if d is not relation)
            flipped = (-sign[0], -sign[1])
            if stays and (pair := pair_for(flipped, places[subject.id], free)):
                moves[other.id], moves[subject.id] = pair
            elif pair := (other_whole and pair_for(sign, places[other.id], [*free, *own])) or pair_for(
                sign, None, [*free, *sorted(own)]
            ):
                moves[subject.id], moves[other.id] = pair
    return moves


def _named_cell(obj: Concept, deps: dict[str, list[Concept]]) -> str | None:
    """The cell the object's position words name ('a star on the right': right), if any."""
    return next((cell for d in deps[obj.id] if d.kind == "relation" and (cell := named_cell(d.text))), None)


def absent_regions(concepts: list[Concept], best: Candidate) -> list[EditRegion]:
    """A region cleared to the background for each object that must be absent and is not: where the critic saw it,
    else where it was when it was removed."""
    ok = best.satisfied_ids
    seen = {v.concept_id: v.box for v in best.verdicts if v.box}
    return [
        EditRegion(box=box, text="", concept_ids=[c.id])
        for c in concepts
        if c.kind == "absent" and c.id not in ok and (box := seen.get(c.id) or c.box) is not None
    ]


FREE_ORDER = ("centre", "top left", "bottom right", "top right", "bottom left", "top", "bottom", "left", "right")


def _target_cell(
    obj: Concept,
    position: list[Concept],
    objects: list[Concept],
    layout: dict[str, Box],
    places: dict[str, str],
    taken: set[str],
    prefer: AbstractSet[str] = frozenset(),
) -> str:
    """Where a misplaced or missing object goes: the cell its position words name; for a relation, a free cell on
    the right side of where the other object is (the object whose noun ends the relation); else a `prefer` cell
    that is free (a stray's, which the object replaces), else the layout's cell, else the first free one."""
    free = [c for c in FREE_ORDER if c not in taken]
    for d in position:
        if cell := named_cell(d.text):
            return cell
        sign = relation_sign(d.text)
        other = next((o for o in objects if o.id != obj.id and o.text.split()[-1] == d.text.split()[-1]), None)
        pair = pair_for(sign, places[other.id], free) if sign and other and other.id in places else None
        if pair:
            return pair[0]
    if swap := [c for c in free if c in prefer]:
        return swap[0]
    planned = cell_of(layout[obj.id]) if obj.id in layout else None
    if planned and planned not in taken:
        return planned
    return free[0] if free else planned or "centre"


def _phrase(obj: Concept, deps: list[Concept]) -> str:
    """The object's name without its place ('boston bull' of 'a boston bull on the left') with the adjectives of
    its attributes written as '<article> <adjectives> <noun>' ('a large red star'); an attribute said another way
    ('the lighthouse is striped') adds nothing."""
    read = read_phrase(obj.text)
    name = [*read.adjectives, read.noun] if read else obj.text.split()
    adjectives = [
        w
        for d in deps
        if d.kind == "attribute"
        and len(ws := d.text.split()) > 2
        and ws[0].lower() in ("a", "an", "the")
        and ws[-1] == name[-1]
        for w in ws[1:-1]
        if w not in name
    ]
    words = " ".join([*adjectives, *name])
    return f"{article(words)} {words}"


def _count_phrase(count: Concept, deps: list[Concept]) -> str:
    """One of the things a count counts, with its attributes' words ('a cyan circle' of 'two circles' and 'two cyan
    circles')."""
    noun = singular(count.text.split()[-1])
    adjectives = [w for d in deps if d.kind == "attribute" for w in d.text.split()[1:-1]]
    words = " ".join([*dict.fromkeys(adjectives), noun])
    return f"{article(words)} {words}"


def region_text(obj: Concept, deps: list[Concept], cell: str) -> str:
    """What to draw in an object's region: its noun with every attribute's words, and the cell's place words
    ('a large red heart in the top left')."""
    return f"{_phrase(obj, deps)} {CELL_PHRASES[cell]}"


def object_phrase(concept: Concept, concepts: list[Concept]) -> str | None:
    """What to retrieve for a concept: the whole phrase of the object it belongs to, as its region states it but
    without the place ('a large red star' for 'a red star' or 'a star'), so the reference shows the object with the
    look the prompt asks for; None for a concept of no object (a style)."""
    by_id = {c.id: c for c in concepts}
    root = concept
    while root.depends_on and root.depends_on[0] in by_id:
        root = by_id[root.depends_on[0]]
    return _phrase(root, dependents(concepts)[root.id]) if root.kind == "object" else None


def query_for(concept: Concept, concepts: list[Concept], caption: str | None) -> str:
    """What to retrieve for a concept: the query the critic wrote for it when that says more than the concept's own
    text (a VLM's "a photo of a bombay cat"), else the whole phrase of its object (object_phrase), else its text."""
    if caption and caption != concept.text:
        return caption
    return object_phrase(concept, concepts) or concept.text


def _untouched(source: Candidate, regions: list[EditRegion]) -> set[str]:
    """Ids of the concepts whose object the critic saw in `source` outside every region: its box overlaps none, and
    no region is for it."""
    named = {cid for r in regions for cid in r.concept_ids}
    return {
        v.concept_id
        for v in source.verdicts
        if v.concept_id not in named and v.box is not None and not any(v.box.overlaps(r.box) for r in regions)
    }


def kept_boxes(source: Candidate, regions: list[EditRegion], concepts: list[Concept]) -> list[Box]:
    """The boxes of the objects an edit of `source` leaves alone (those whose verdicts kept_verdicts keeps): the
    edit's margins stop at them, so an object beside a redrawn region keeps every pixel."""
    objects = {c.id for c in concepts if c.kind == "object"}
    kept = _untouched(source, regions) & objects
    return [v.box for v in source.verdicts if v.concept_id in kept and v.box is not None]


def kept_verdicts(source: Candidate, edit: Edit, concepts: list[Concept]) -> list[ConceptVerdict]:
    """The source's verdicts an edit leaves standing: when every pixel outside the regions was kept, those of each
    object the critic saw outside every region (its box overlaps none, and no region is for it), with its attributes
    and places. Relations between objects and counts, which a redrawn object may change, and every object seen
    nowhere or inside a region are judged again."""
    if not edit.exact_outside:
        return []
    untouched = _untouched(source, edit.regions)
    by_id = {c.id: c for c in concepts}

    def stands(c: Concept) -> bool:
        if c.kind == "object":
            return c.id in untouched
        place = c.kind == "relation" and bool(named_cell(c.text))
        return (c.kind == "attribute" or place) and bool(c.depends_on) and all(p in untouched for p in c.depends_on)

    return [v for v in source.verdicts if v.concept_id in by_id and stands(by_id[v.concept_id])]
