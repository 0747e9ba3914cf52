"""Pixels of a layout: which cells of an image hold something, the masks an edit redraws, and clearing regions to
the background. Where things go is planned on the grid (tools.grid); the critic says where it sees an object
(judges.ClipJudge.locate), and edits redraw there."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

from imagerag.tools.config import ReferenceView
from imagerag.tools.grid import CELL_BOXES
from imagerag.tools.types import Box


def occupied_cells(image: Image.Image, share: float = 0.02) -> set[str]:
    """Grid cells where more than `share` of the pixels differ clearly from the background."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    away = np.abs(pixels - np.array(background_colour(image))).sum(-1) > 60
    height, width = away.shape
    out = set()
    for cell, box in CELL_BOXES.items():
        left, top, right, bottom = box.pixels(width, height)
        if away[top:bottom, left:right].mean() > share:
            out.add(cell)
    return out


def region_mask(size: tuple[int, int], boxes: Iterable[Box], margin: int, keep: Iterable[Box] = ()) -> Image.Image:
    """Mode-L mask, white inside the boxes grown by `margin` pixels but never inside a `keep` box: what an edit
    redraws. The margin lets a redrawn object spill over its box; `keep` holds the boxes of objects the edit leaves
    alone, which a neighbour's margin must not eat into (a large star's tip clipped by 2 pixels reads as a triangle)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        left, top, right, bottom = box.pixels(*size, margin=margin)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    for box in keep:
        left, top, right, bottom = box.pixels(*size)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=0)
    return mask


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """The image's background colour: the median of its border pixels."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    r, g, b = np.median(border, axis=0).astype(int).tolist()
    return r, g, b


def clear(image: Image.Image, boxes: Iterable[Box], margin: int, keep: Iterable[Box] = ()) -> Image.Image:
    """`image` painted over in its background colour inside the boxes (grown by `margin`, `keep` spared as in
    region_mask): removed objects."""
    out = image.convert("RGB")
    return Image.composite(
        Image.new("RGB", out.size, background_colour(out)), out, region_mask(out.size, boxes, margin, keep)
    )


def isolate(image: Image.Image, box: Box, margin: int = 0) -> Image.Image:
    """`image` with everything outside `box` (grown by `margin`) painted in its background colour: what is in the
    box, alone, where it was."""
    out = Image.new("RGB", image.size, background_colour(image))
    region = box.pixels(*image.size, margin=margin)
    out.paste(image.convert("RGB").crop(region), region[:2])
    return out


def object_view(image: Image.Image, box: Box, view: ReferenceView) -> Image.Image:
    """The object a reference was retrieved for, as the generator is handed it: 'crop' cuts out its box with a
    margin (an adapter's image processor then scales it, so the object fills the view); 'isolate' keeps the image's
    size and the object's place and paints the rest in the background colour (for an adapter trained on references
    that hold one object where it is drawn). Either way the box grows by a margin: objects spill over their boxes."""
    if view == "isolate":
        return isolate(image, box, edit_margin(image.size))
    left, top, right, bottom = box.pixels(*image.size)
    return image.convert("RGB").crop(box.pixels(*image.size, margin=round(0.15 * max(right - left, bottom - top))))


def edit_margin(size: tuple[int, int]) -> int:
    """How far an edit's mask reaches past its boxes: objects drawn in a box may spill a little over it."""
    return max(2, min(size) // 32)
