"""A third-party package adds a generator family and a critic without touching this project's code, and the loop runs
on them (issue 21).

The package, `solidgen`, is written into a temporary folder with its own `solidgen-0.1.dist-info` (METADATA and
entry_points.txt, as pip would install it) and put on the PYTHONPATH of a subprocess only: the venv is not changed.
Its generator is no diffusers pipeline: it draws flat PIL shapes from the prompt's words. Without a reference it draws
a colour muted, the way a text-to-image model gets a rare colour almost right; with a reference it draws it pure and
tints the background with the reference's mean colour. Its critic counts pure-colour pixels, so it rejects what the
generator drew from text alone: the loop has to go round once (retrieve, then regenerate or edit with a reference)
before it is satisfied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGERAG = Path(sys.executable).with_name("imagerag")  # the venv's console script

pytestmark = pytest.mark.slow  # subprocesses that load torch, build the tiny CLIP and index the tiny corpus

SOLIDGEN = '''
"""solidgen: flat shapes in flat colours, drawn with PIL from the prompt's words."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from imagerag.tools.config import ClipSpec, GeneratorSpec, Profile
from imagerag.tools.types import Box, ConceptVerdict, Critique

SIZE = 32
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
GREY = (128, 128, 128)


def pure(name):
    return ImageColor.getrgb(name)


def muted(name):
    """What it draws for a colour it has no reference for: halfway to grey."""
    return tuple((c + g) // 2 for c, g in zip(pure(name), GREY))


def mean_colour(image):
    return tuple(int(v) for v in np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0))


class SolidGenerator:
    """The `solid` family: one flat shape per prompt, its colour and shape read from the words."""

    max_references = 1
    max_region_references = 2  # in an edit, each reference tints only its own region

    def __init__(self, spec):
        self.spec = spec

    @classmethod
    def from_pretrained(cls, spec, model_path, ip_adapter_path, device="auto", offload="none", compile=False):
        return cls(spec)

    def _draw(self, prompt, seed, references, size=(SIZE, SIZE)):
        rng = random.Random(seed)
        words = prompt.lower().replace(",", " ").split()
        colour = next((w for w in words if w in COLOURS), "black")
        level = 200 + rng.randrange(40)
        background = (level, level, level)
        if references:
            tint = mean_colour(references[0])
            background = tuple((b + t) // 2 for b, t in zip(background, tint))
        image = Image.new("RGB", size, background)
        fill = pure(colour) if references else muted(colour)
        w, h = size
        x, y = rng.randrange(w // 4), rng.randrange(h // 4)
        box = (x, y, x + w // 2, y + h // 2)
        draw = ImageDraw.Draw(image)
        if "ring" in words or "circle" in words:
            draw.ellipse(box, outline=fill, width=3)
        else:
            draw.rectangle(box, fill=fill)
        return image

    def generate(self, prompt, seed, n=1, references=(), on_step=None):
        images = [self._draw(prompt, seed + i, list(references)[: self.max_references]) for i in range(n)]
        if on_step is not None:
            on_step(1, 1)
        return images

    def edit(self, image, mask, prompt, seed, references=(), reference_masks=(), on_step=None):
        image, mask = image.convert("RGB"), mask.convert("L")
        drawn = self._draw(prompt, seed, list(references)[:1], image.size)
        for reference, where in list(zip(references, reference_masks))[: self.max_region_references]:
            tinted = Image.blend(drawn, Image.new("RGB", image.size, mean_colour(reference)), 0.5)
            drawn = Image.composite(tinted, drawn, where.convert("L"))
        if on_step is not None:
            on_step(1, 1)
        return Image.composite(drawn, image, mask), True


class SolidCritic:
    """A colour word holds where at least 5% of the pixels are exactly that colour; a concept without one holds
    where anything is drawn on the background."""

    SHARE = 0.05

    def critique(self, image, concepts, prompt=""):
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        background = pixels[0, 0]
        verdicts = []
        for concept in concepts:
            colours = [w for w in concept.text.lower().split() if w in COLOURS]
            if colours:
                where = np.ones(pixels.shape[:2], dtype=bool)
                for name in colours:
                    where &= (np.abs(pixels - np.array(pure(name))) <= 4).all(axis=-1)
                what = "pure " + " ".join(colours)
            else:
                where = (np.abs(pixels - background) > 4).any(axis=-1)
                what = "drawn"
            share = float(where.mean())
            satisfied = share >= self.SHARE
            box = None
            if satisfied and concept.kind == "object":
                ys, xs = np.nonzero(where)
                h, w = where.shape
                box = Box(x0=xs.min() / w, y0=ys.min() / h, x1=(xs.max() + 1) / w, y1=(ys.max() + 1) / h)
            verdicts.append(
                ConceptVerdict(
                    concept_id=concept.id,
                    satisfied=satisfied,
                    score=min(1.0, share / self.SHARE / 2),
                    evidence=f"solid-critic: {share:.1%} of the pixels {what} (needs {self.SHARE:.0%})",
                    caption=None if satisfied or concept.kind == "absent" else concept.text,
                    box=box,
                )
            )
        return Critique(verdicts=verdicts)


def solid_critic(parts):
    return SolidCritic()


PROFILE = Profile(
    name="solid",
    description="solidgen's flat shapes, judged by counting pixels",
    generator=GeneratorSpec(family="solid", model_id="solid:none", regenerate_template="regenerate_plain"),
    clip=ClipSpec(model="tiny:clip", judge_threshold=0.0, retrieval_min_similarity=-1.0),
    collection="tiny",
    local=True,
    critic="solid-critic",
)
'''

ENTRY_POINTS = """
[imagerag.generators]
solid = solidgen:SolidGenerator

[imagerag.critics]
solid-critic = solidgen:solid_critic

[imagerag.profiles]
solid = solidgen:PROFILE
"""

CONTRACTS = f'''
"""The project's contract suites, run by the plugin's author on the plugin's own backends."""

import sys

import pytest

sys.path.insert(0, {str(REPO / "tests")!r})

from contracts import CriticContract, GeneratorContract, RegionReferencesContract  # noqa: E402

from imagerag.tools.backends.registries import CRITICS, GENERATORS  # noqa: E402
from imagerag.tools.config import PROFILES  # noqa: E402


class TestSolidGenerator(GeneratorContract, RegionReferencesContract):
    @pytest.fixture
    def make_generator(self):
        spec = PROFILES["solid"].generator
        return lambda: GENERATORS[spec.family].from_pretrained(spec, spec.model_id, None)


class TestSolidCritic(CriticContract):
    @pytest.fixture
    def critic(self):
        return CRITICS["solid-critic"](None)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """A folder holding solidgen as pip would install it: the module and its dist-info."""
    root = tmp_path_factory.mktemp("site")
    (root / "solidgen").mkdir()
    (root / "solidgen" / "__init__.py").write_text(textwrap.dedent(SOLIDGEN))
    info = root / "solidgen-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: solidgen\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS.lstrip())
    (root / "test_solid_contracts.py").write_text(textwrap.dedent(CONTRACTS))
    return root


def run(args: list[str], cwd: Path, plugin: Path | None, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGERAG_", "PYTHONPATH"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False", IMAGERAG_DATA_DIR=str(data_dir)
    )
    if plugin is not None:
        env["PYTHONPATH"] = str(plugin)
    return subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_third_party_generator_and_critic_run_the_loop(plugin: Path, tmp_path: Path):
    from PIL import Image

    data = tmp_path / "data"
    done = run(
        [str(IMAGERAG), "generate", "a red square", "--profile", "solid", "--data-dir", str(data)]
        + ["--out", str(tmp_path / "runs"), "--json"],
        tmp_path,
        plugin,
        data,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    result = json.loads((Path(printed["run_dir"]) / "run.json").read_text())
    assert result["profile"] == "solid" and result["status"] == "satisfied", result["stop_reason"]
    assert printed["status"] == result["status"]

    # The loop went round once: the image drawn from text alone missed, a reference fixed it.
    first, *_, last = result["candidates"]
    assert len(result["candidates"]) == 2 and result["generations"] == 2
    assert first["references"] == [] and last["references"]
    assert not all(v["satisfied"] for v in first["verdicts"])
    assert all(v["satisfied"] for v in last["verdicts"])
    assert result["best"]["image_id"] == last["image_id"]
    nodes = [s["node"] for s in result["steps"]]
    assert nodes[:4] == ["plan", "generate", "critique", "retrieve"], nodes
    assert nodes[4] in {"regenerate", "edit"} and nodes[5:] == ["critique", "finish"], nodes

    # The critic judged: its evidence is in every verdict, the concepts' included.
    verdicts = [v for c in result["candidates"] for v in c["verdicts"]]
    assert verdicts and all(v["evidence"].startswith("solid-critic: ") for v in verdicts)
    assert all(c["evidence"].startswith("solid-critic: ") for c in result["concepts"])

    # The generator drew: flat images of its size, the first with its muted red, the best with pure red.
    def image_of(candidate: dict) -> Image.Image:
        image = Image.open(Path(result["run_dir"]) / "images" / f"{candidate['image_id']}.png").convert("RGB")
        assert image.size == (32, 32)
        return image

    def colours(candidate: dict) -> set[tuple[int, int, int]]:
        return {rgb for _, rgb in image_of(candidate).getcolors(32 * 32)}

    assert (191, 64, 64) in colours(first) and (255, 0, 0) not in colours(first)
    assert (255, 0, 0) in colours(last)
    assert len(colours(first)) == len(colours(last)) == 2  # a shape on a background: no diffusion model draws that
    # The reference reached it: the background is halfway between a grey and the reference's mean colour.
    reference = Image.open(last["references"][0]["source"]).convert("RGB")
    tint = [sum(channel) // len(channel) for channel in zip(*reference.getdata(), strict=True)]
    corner = image_of(last).getpixel((31, 31))
    greys = {2 * c - t for c, t in zip(corner, tint, strict=True)}
    assert corner != (255, 0, 0) and max(greys) - min(greys) <= 1, (corner, tint)


def test_without_the_package_the_profile_is_refused_naming_the_entry_point_group(tmp_path: Path):
    done = run(
        [str(IMAGERAG), "generate", "a red square", "--profile", "solid", "--out", str(tmp_path / "runs")],
        tmp_path,
        None,
        tmp_path / "data",
    )
    assert done.returncode == 2, done.stderr
    assert "'solid'" in done.stderr and "imagerag.profiles" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_the_plugin_passes_the_projects_contract_suites(plugin: Path, tmp_path: Path):
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "test_solid_contracts.py")],
        plugin,
        plugin,
        tmp_path / "data",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # GeneratorContract 4 + RegionReferencesContract 1 + CriticContract 4, none skipped
    assert "9 passed" in done.stdout and "skipped" not in done.stdout, done.stdout
