"""A deterministic procedural world of small coloured shapes.

Scenes are 32x32 RGB images on a white background holding one or two objects. Three of the
shapes (heart, crescent, star) are RARE: the miniature text-to-image model never learns them
from text, so it can only draw them from a retrieved reference image. That is the ImageRAG
effect in miniature, measurable on a CPU.

CLI:
    python -m imagerag.tools.miniworld.world corpus OUT_DIR --n 6000 --seed 1 [--exclude-shape heart]
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)

COMMON_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "hourglass")
RARE_SHAPES: tuple[str, ...] = ("heart", "crescent", "star")
SHAPES: tuple[str, ...] = COMMON_SHAPES + RARE_SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 185),
    "orange": (250, 130, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Centre of each position slot, in output pixels.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "centre": (16.0, 16.0),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

SIZES: dict[str, float] = {"small": 4.5, "large": 7.0}  # radius in output pixels
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# Position pairs far enough apart that two large objects do not overlap.
_FAR_PAIRS = {frozenset(("left", "right")), frozenset(("top", "bottom"))}


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene. dx/dy is a small sub-slot jitter in pixels (rendering variety)."""

    shape: str
    colour: str
    position: str
    size: str = "small"
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")

    @property
    def is_rare(self) -> bool:
        return self.shape in RARE_SHAPES


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError("two objects of a scene share a position")
        object.__setattr__(self, "objects", tuple(self.objects))

    @property
    def has_rare(self) -> bool:
        return any(o.is_rare for o in self.objects)


@dataclass(frozen=True)
class Concept:
    """A checkable fact about one object, with a stand-alone caption for it."""

    object_index: int
    kind: str  # "shape" | "colour" | "position"
    value: str
    text: str


# ----------------------------------------------------------------------------- captions


def object_phrase(
    obj: ObjectSpec,
    *,
    shape_word: str | None = None,
    with_size: bool | None = None,
    with_colour: bool = True,
    with_position: bool = True,
) -> str:
    """'a large red heart on the left'. Canonical form marks only 'large'."""
    words = ["a"]
    if with_size is None:
        with_size = obj.size == "large"
    if with_size:
        words.append(obj.size)
    if with_colour:
        words.append(obj.colour)
    words.append(shape_word or obj.shape)
    if with_position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def caption(scene: Scene) -> str:
    return " and ".join(object_phrase(o) for o in scene.objects)


def concepts(scene: Scene) -> list[Concept]:
    """Per object: the shape is present, its colour, its position."""
    out: list[Concept] = []
    for i, o in enumerate(scene.objects):
        out.append(Concept(i, "shape", o.shape, f"a {o.shape}"))
        out.append(Concept(i, "colour", o.colour, f"a {o.colour} {o.shape}"))
        out.append(Concept(i, "position", o.position, f"a {o.shape} {POSITION_PHRASES[o.position]}"))
    return out


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
        cx, cy = POSITIONS[o.position]
        _draw_shape(draw, o.shape, (cx + o.dx) * s, (cy + o.dy) * s, SIZES[o.size] * s, COLOURS[o.colour])
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_array(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 array (N, 32, 32, 3)."""
    return np.stack([np.asarray(render(sc), dtype=np.uint8) for sc in scenes])


# ----------------------------------------------------------------------------- sampling


def _allowed_pair(p1: str, p2: str) -> bool:
    return p1 != p2


def sample_scene(
    rng: random.Random,
    n_objects: int = 1,
    shapes: Sequence[str] = SHAPES,
    jitter: float = 1.5,
    colours: Sequence[str] = COLOUR_NAMES,
) -> Scene:
    """A random scene. Two-object scenes use two different positions; unless the pair is
    left/right or top/bottom, both objects are small so that they do not overlap."""
    if n_objects not in (1, 2):
        raise ValueError("n_objects must be 1 or 2")
    positions = rng.sample(POSITION_NAMES, n_objects)
    far = n_objects == 1 or frozenset(positions) in _FAR_PAIRS
    objs = []
    for pos in positions:
        size = rng.choice(SIZE_NAMES) if far else "small"
        objs.append(
            ObjectSpec(
                shape=rng.choice(list(shapes)),
                colour=rng.choice(list(colours)),
                position=pos,
                size=size,
                dx=round(rng.uniform(-jitter, jitter), 2),
                dy=round(rng.uniform(-jitter, jitter), 2),
            )
        )
    return Scene(tuple(objs))


def sample_scenes(seed: int, n: int, p_two: float = 0.4, shapes: Sequence[str] = SHAPES) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, 2 if rng.random() < p_two else 1, shapes=shapes) for _ in range(n)]


# ----------------------------------------------------------------------------- corpus


def corpus_scenes(n: int, seed: int = 1, exclude_shapes: Iterable[str] = ()) -> list[Scene]:
    """Mostly single-object scenes; the first block enumerates every shape x colour x position x
    size once (so every concept, rare included, is present), the rest is random (20% two-object)."""
    excl = set(exclude_shapes)
    shapes = [s for s in SHAPES if s not in excl]
    rng = random.Random(seed)
    scenes: list[Scene] = []
    for shape in shapes:
        for colour in COLOUR_NAMES:
            for pos in POSITION_NAMES:
                for size in SIZE_NAMES:
                    scenes.append(
                        Scene(
                            (
                                ObjectSpec(
                                    shape, colour, pos, size, round(rng.uniform(-1, 1), 2), round(rng.uniform(-1, 1), 2)
                                ),
                            )
                        )
                    )
    rng.shuffle(scenes)
    scenes = scenes[:n]
    while len(scenes) < n:
        scenes.append(sample_scene(rng, 2 if rng.random() < 0.2 else 1, shapes=shapes))
    return scenes


def write_corpus(
    out_dir: str | Path,
    n: int = 6000,
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
        if on_image is not None and ((i + 1) % 250 == 0 or i + 1 == n):
            on_image(i + 1, n)
    return paths


# ----------------------------------------------------------------------------- held-out prompts

HELDOUT_BASE_SEED = 10_000_000  # training uses seeds < 1_000_000


@dataclass(frozen=True)
class HeldoutPrompt:
    group: str  # "common" | "rare" | "two_object"
    scene: Scene
    prompt: str = field(default="")


def heldout_prompts(seed: int = 0, n_common: int = 80, n_rare: int = 80, n_two: int = 60) -> list[HeldoutPrompt]:
    """Benchmark prompts (>= 200). two-object: half contain exactly one rare shape."""
    rng = random.Random(HELDOUT_BASE_SEED + seed)
    out: list[HeldoutPrompt] = []
    for _ in range(n_common):
        sc = sample_scene(rng, 1, shapes=COMMON_SHAPES, jitter=0.0)
        out.append(HeldoutPrompt("common", sc, caption(sc)))
    for i in range(n_rare):
        sc = sample_scene(rng, 1, shapes=(RARE_SHAPES[i % 3],), jitter=0.0)
        out.append(HeldoutPrompt("rare", sc, caption(sc)))
    for i in range(n_two):
        sc = sample_scene(rng, 2, shapes=COMMON_SHAPES, jitter=0.0)
        if i % 2 == 0:
            k = rng.randrange(2)
            objs = list(sc.objects)
            objs[k] = ObjectSpec(rng.choice(RARE_SHAPES), objs[k].colour, objs[k].position, objs[k].size)
            sc = Scene(tuple(objs))
        out.append(HeldoutPrompt("two_object", sc, caption(sc)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.tools.miniworld.world")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write a retrieval corpus of PNG + .txt caption pairs")
    c.add_argument("out_dir")
    c.add_argument("--n", type=int, default=6000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--exclude-shape", action="append", default=[], choices=SHAPES)
    args = ap.parse_args(argv)
    if args.cmd == "corpus":
        paths = write_corpus(args.out_dir, args.n, args.seed, args.exclude_shape)
        print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
