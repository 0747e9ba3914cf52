"""The 3x3 grid a layout is planned on: cell names and the phrases that name them, relation words, and a box per
object concept from the prompt's words alone (LMD-style layouts from an LLM come through the decomposer instead).
Pure functions of text and boxes: the loop's rules use them as much as the backends do."""

from __future__ import annotations

import re
from collections.abc import Sequence

from imagerag.tools.types import Box, Concept

GRID = 3
# Cells row by row, and how a prompt names a place in each.
CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
CELL_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_CELL_WORDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern), cell)
    for pattern, cell in (
        (r"\b(top|upper) left\b", "top left"),
        (r"\b(top|upper) right\b", "top right"),
        (r"\b(bottom|lower) left\b", "bottom left"),
        (r"\b(bottom|lower) right\b", "bottom right"),
        (r"\b(at|on) the (top|upper)\b|\bat the top\b", "top"),
        (r"\b(at|on) the (bottom|lower)\b", "bottom"),
        (r"\b(on|at|to) the left\b(?! of)", "left"),
        (r"\b(on|at|to) the right\b(?! of)", "right"),
        (r"\b(centre|center|middle)\b", "centre"),
    )
]
_RELATIONS: dict[str, tuple[int, int]] = {  # (dcol, drow) sign of the subject against the other object
    "to the left of": (-1, 0),
    "left of": (-1, 0),
    "to the right of": (1, 0),
    "right of": (1, 0),
    "above": (0, -1),
    "below": (0, 1),
    "under": (0, 1),
}


def cell_box(cell: str) -> Box:
    row, col = divmod(CELL_NAMES.index(cell), GRID)
    return Box(x0=col / GRID, y0=row / GRID, x1=(col + 1) / GRID, y1=(row + 1) / GRID)


CELL_BOXES: dict[str, Box] = {cell: cell_box(cell) for cell in CELL_NAMES}


def named_cell(text: str) -> str | None:
    """The grid cell a phrase names ('a star in the top left' -> 'top left'), if any."""
    lowered = text.lower()
    return next((cell for pattern, cell in _CELL_WORDS if pattern.search(lowered)), None)


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6}


def singular(noun: str) -> str:
    """'stars' -> 'star', 'crosses' -> 'cross', 'hourglasses' -> 'hourglass', 'boxes' -> 'box'."""
    if noun.endswith("es") and noun[:-2].endswith(("s", "x", "ch", "sh")):
        return noun[:-2]
    return noun[:-1] if noun.endswith("s") and not noun.endswith("ss") else noun


def relation_object(text: str) -> str | None:
    """The other object of a relation: 'a star to the left of a blue ring' -> 'a blue ring'."""
    lowered = f" {text.lower()} "
    for words in sorted(_RELATIONS, key=len, reverse=True):
        if f" {words} " in lowered:
            return lowered.split(f" {words} ", 1)[1].strip() or None
    return None


def relation_sign(text: str) -> tuple[int, int] | None:
    """(dcol, drow) of a relation's subject against its other object: 'a star to the left of a ring' -> (-1, 0)."""
    lowered = text.lower()
    return next((sign for words, sign in _RELATIONS.items() if f" {words} " in f" {lowered} "), None)


def rule_layout(concepts: Sequence[Concept]) -> dict[str, Box]:
    """A grid cell for every single object (a concept of kind object): the cell its position words name; for a
    relation, a free pair of cells that satisfies it; otherwise the next free cell, centre first. Counts ('two
    stars') get no box: they are several objects, redrawn with the whole image."""
    objects = [c for c in concepts if not c.depends_on and c.kind == "object"]
    dependents: dict[str, list[Concept]] = {}
    for c in concepts:
        for parent in c.depends_on:
            dependents.setdefault(parent, []).append(c)
    cells: dict[str, str] = {}
    for obj in objects:
        for dep in dependents.get(obj.id, []):
            if dep.kind == "relation" and (cell := named_cell(dep.text)) and cell not in cells.values():
                cells[obj.id] = cell
    free = ["centre", "top left", "bottom right", "top right", "bottom left", "top", "bottom", "left", "right"]
    for obj in objects:
        for dep in dependents.get(obj.id, []):
            sign = relation_sign(dep.text) if dep.kind == "relation" and not named_cell(dep.text) else None
            other = next((o for o in objects if o.id != obj.id and _noun(o.text) in dep.text.split()[2:]), None)
            if sign is None or other is None or obj.id in cells:
                continue
            pair = pair_for(sign, cells.get(other.id), [c for c in free if c not in cells.values()])
            if pair:
                cells[obj.id] = pair[0]
                cells.setdefault(other.id, pair[1])
    for obj in objects:
        if obj.id not in cells:
            cells[obj.id] = next((c for c in free if c not in cells.values()), "centre")
    return {concept_id: CELL_BOXES[cell] for concept_id, cell in cells.items()}


def _noun(text: str) -> str:
    return text.split()[-1]


def article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" or words.lower().startswith("hour") else "a"


def pair_for(sign: tuple[int, int], fixed: str | None, free: list[str]) -> tuple[str, str] | None:
    """Cells (subject, other) with the subject on the `sign` side of the other; the other's cell kept if fixed."""
    others = [fixed] if fixed else free
    for other in others:
        orow, ocol = divmod(CELL_NAMES.index(other), GRID)
        for cell in free:
            if cell == other:
                continue
            row, col = divmod(CELL_NAMES.index(cell), GRID)
            dcol, drow = sign
            if (dcol == 0 or (col - ocol) * dcol > 0) and (drow == 0 or (row - orow) * drow > 0):
                return cell, other
    return None


DIRECTIONS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


def shifted(cell: str, direction: str) -> str | None:
    """The cell one step from `cell` in a direction ('up', 'down', 'left', 'right'); None past the grid's edge."""
    row, col = divmod(CELL_NAMES.index(cell), GRID)
    dcol, drow = DIRECTIONS[direction]
    row, col = row + drow, col + dcol
    return CELL_NAMES[row * GRID + col] if 0 <= row < GRID and 0 <= col < GRID else None


def cell_of(box: Box) -> str:
    """The grid cell holding the box's centre."""
    col = min(GRID - 1, int((box.x0 + box.x1) / 2 * GRID))
    row = min(GRID - 1, int((box.y0 + box.y1) / 2 * GRID))
    return CELL_NAMES[row * GRID + col]
