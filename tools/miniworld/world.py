"""A deterministic procedural world of small coloured shapes on a 3x3 grid.

Scenes are 48x48 RGB images on a white background holding one to four objects, each in its own cell of a
3x3 grid (16 px a cell). An object has a shape, a colour, a size and a cell. Three shapes (heart, crescent,
star) are RARE: the miniature text-to-image model never learns them from text, so it can only draw them from
a retrieved reference image. That is the ImageRAG effect in miniature, measurable on a CPU.

The space of scenes is split in two halves by a hash of the scene's specification (`Scene.half`): the retrieval
corpus draws only from the "corpus" half and evaluation prompts only from the "eval" half, so no evaluation
scene can appear in the corpus, whatever the seeds.

CLI:
    python -m imagerag.tools.miniworld.world corpus OUT_DIR --n 20000 --seed 1 [--exclude-shape heart]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from imagerag.tools.grid import CELL_NAMES, CELL_PHRASES

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)
MAX_OBJECTS = 4

COMMON_SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "ring",
    "hourglass",
    "arrow",
    "semicircle",
)
RARE_SHAPES: tuple[str, ...] = ("heart", "crescent", "star")
SHAPES: tuple[str, ...] = COMMON_SHAPES + RARE_SHAPES
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}

# Far apart in RGB, so that an autoencoder's small colour shifts never turn one into another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 185),
    "cyan": (20, 190, 205),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: dict[str, float] = {"small": 4.5, "large": 6.5}  # radius in output pixels
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
JITTER = 0.75  # largest offset of an object from its cell's centre, in output pixels

# The grid's cells and how prompts name them: the runtime's layout vocabulary (tools.backends.layout).
CELLS: tuple[str, ...] = CELL_NAMES

Relation = Literal["left of", "right of", "above", "below"]
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


def cell_row_col(cell: str) -> tuple[int, int]:
    return divmod(CELLS.index(cell), GRID)


def cell_centre(cell: str) -> tuple[float, float]:
    row, col = cell_row_col(cell)
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def holds(relation: str, a_cell: str, b_cell: str) -> bool:
    """Whether an object in a_cell stands in `relation` to one in b_cell: judged on grid columns and rows."""
    (ar, ac), (br, bc) = cell_row_col(a_cell), cell_row_col(b_cell)
    return {"left of": ac < bc, "right of": ac > bc, "above": ar < br, "below": ar > br}[relation]


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene. dx/dy: its offset from the cell's centre in pixels (rendering variety)."""

    shape: str
    colour: str
    size: str
    cell: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOUR_NAMES, "colour"),
            (self.size, SIZE_NAMES, "size"),
            (self.cell, CELLS, "cell"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")
        if max(abs(self.dx), abs(self.dy)) > JITTER:
            raise ValueError(f"offset ({self.dx}, {self.dy}) is over {JITTER} px from the cell's centre")

    @property
    def is_rare(self) -> bool:
        return self.shape in RARE_SHAPES

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.shape, self.colour, self.size, self.cell


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        cells = [o.cell for o in self.objects]
        if not 1 <= len(cells) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {len(cells)}")
        if len(set(cells)) != len(cells):
            raise ValueError("two objects of a scene share a cell")

    @property
    def has_rare(self) -> bool:
        return any(o.is_rare for o in self.objects)

    @property
    def key(self) -> tuple[tuple[str, str, str, str], ...]:
        """The scene's specification without rendering jitter: equal keys are the same scene."""
        return tuple(sorted(o.key for o in self.objects))

    @property
    def half(self) -> Literal["corpus", "eval"]:
        digest = hashlib.sha256(repr(self.key).encode()).digest()
        return "corpus" if digest[0] % 2 == 0 else "eval"


# ----------------------------------------------------------------------------- captions


def object_phrase(obj: ObjectSpec) -> str:
    """'a large red heart in the top left': every attribute, as the corpus captions name them."""
    return f"a {obj.size} {obj.colour} {obj.shape} {CELL_PHRASES[obj.cell]}"


def caption(scene: Scene) -> str:
    """The corpus caption: every object with every attribute, row by row."""
    ordered = sorted(scene.objects, key=lambda o: CELLS.index(o.cell))
    return " and ".join(object_phrase(o) for o in ordered)


# ----------------------------------------------------------------------------- rendering


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    bg = BACKGROUND
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        ri = r * 0.5
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=bg)
    elif shape == "hourglass":
        draw.polygon([(cx - r * 0.8, cy - r), (cx + r * 0.8, cy - r), (cx, cy)], fill=fill)
        draw.polygon([(cx - r * 0.8, cy + r), (cx + r * 0.8, cy + r), (cx, cy)], fill=fill)
    elif shape == "arrow":  # pointing up: a head over a stem
        draw.polygon([(cx, cy - r), (cx + r * 0.9, cy), (cx - r * 0.9, cy)], fill=fill)
        draw.rectangle((cx - r * 0.3, cy, cx + r * 0.3, cy + r), fill=fill)
    elif shape == "semicircle":  # the upper half of a disc
        draw.pieslice((cx - r, cy - r * 0.6, cx + r, cy + r * 1.4), 180, 360, fill=fill)
    elif shape == "heart":
        lobe = r * 0.5
        draw.ellipse((cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe), fill=fill)
        draw.ellipse((cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe), fill=fill)
        draw.polygon([(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r)], fill=fill)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        off = r * 0.55
        draw.ellipse((cx - r + off, cy - r * 1.05, cx + r + off, cy + r * 0.95), fill=bg)
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    else:  # pragma: no cover - guarded by ObjectSpec
        raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        cx, cy = cell_centre(o.cell)
        _draw_shape(draw, o.shape, (cx + o.dx) * s, (cy + o.dy) * s, SIZES[o.size] * s, COLOURS[o.colour])
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_array(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 array (N, 48, 48, 3)."""
    return np.stack([np.asarray(render(sc), dtype=np.uint8) for sc in scenes])


# ----------------------------------------------------------------------------- sampling


def random_object(rng: random.Random, cell: str, shapes: Sequence[str] = SHAPES, jitter: float = JITTER) -> ObjectSpec:
    return ObjectSpec(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(COLOUR_NAMES),
        size=rng.choice(SIZE_NAMES),
        cell=cell,
        dx=round(rng.uniform(-jitter, jitter), 2),
        dy=round(rng.uniform(-jitter, jitter), 2),
    )


def sample_scene(rng: random.Random, n_objects: int, shapes: Sequence[str] = SHAPES, jitter: float = JITTER) -> Scene:
    """n_objects random objects in distinct random cells."""
    cells = rng.sample(CELLS, n_objects)
    return Scene(tuple(random_object(rng, cell, shapes, jitter) for cell in cells))


def sample_scenes(
    seed: int, n: int, weights: Sequence[float] = (0.3, 0.3, 0.2, 0.2), shapes: Sequence[str] = SHAPES
) -> list[Scene]:
    """n random scenes; weights[i] is the share of scenes with i + 1 objects."""
    rng = random.Random(seed)
    counts = range(1, len(weights) + 1)
    return [sample_scene(rng, rng.choices(counts, weights)[0], shapes) for _ in range(n)]


# ----------------------------------------------------------------------------- corpus


def corpus_scenes(n: int, seed: int = 1, exclude_shapes: Iterable[str] = ()) -> list[Scene]:
    """The retrieval corpus: n scenes of the corpus half only, no two rendering to the same image (a jitter below
    a pixel apart). It opens with every object (shape x colour x size x cell) alone once, where that scene is in the
    corpus half, so every concept, rare included, is present; the rest is random (60% single objects)."""
    excl = set(exclude_shapes)
    shapes = [s for s in SHAPES if s not in excl]
    rng = random.Random(seed)
    singles = [
        Scene((ObjectSpec(shape, colour, size, cell, *(round(rng.uniform(-0.5, 0.5), 2) for _ in "xy")),))
        for shape in shapes
        for colour in COLOUR_NAMES
        for size in SIZE_NAMES
        for cell in CELLS
    ]
    singles = [sc for sc in singles if sc.half == "corpus"]
    rng.shuffle(singles)
    scenes: list[Scene] = []
    seen: set[bytes] = set()

    def add(scene: Scene) -> None:
        key = hashlib.blake2b(render(scene).tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            scenes.append(scene)

    for sc in singles[:n]:
        add(sc)
    while len(scenes) < n:
        sc = sample_scene(rng, rng.choices((1, 2, 3, 4), (0.6, 0.2, 0.1, 0.1))[0], shapes)
        if sc.half == "corpus":
            add(sc)
    return scenes


def write_corpus(
    out_dir: str | Path,
    n: int = 20_000,
    seed: int = 1,
    exclude_shapes: Iterable[str] = (),
    on_image: Callable[[int, int], None] | None = None,
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sc in enumerate(corpus_scenes(n, seed, exclude_shapes)):
        stem = out / f"scene_{i:06d}"
        render(sc).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption(sc) + "\n")
        paths.append(stem.with_suffix(".png"))
        if on_image is not None and ((i + 1) % 500 == 0 or i + 1 == n):
            on_image(i + 1, n)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.tools.miniworld.world")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write a retrieval corpus of PNG + .txt caption pairs")
    c.add_argument("out_dir")
    c.add_argument("--n", type=int, default=20_000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--exclude-shape", action="append", default=[], choices=SHAPES)
    args = ap.parse_args(argv)
    if args.cmd == "corpus":
        paths = write_corpus(args.out_dir, args.n, args.seed, args.exclude_shape)
        print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
