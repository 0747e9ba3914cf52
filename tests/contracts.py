"""The contracts every registered backend passes, fakes and real ones alike, in the manner of diffusers'
PipelineTesterMixin: a test class inherits a contract and provides the fixture that builds its backend
(tests/test_contracts.py runs every family and profile kind; a third-party package can run them on its own).

A generator draws n images in one call that equal n single draws at consecutive seeds, takes references (and, when
it says it can, one reference per region of an edit: RegionReferencesContract), and keeps every pixel outside an edit's mask when it says
so. A critic gives one verdict per concept, in order, scores in [0, 1], a box only where it says where an object is,
and the same verdicts for the same image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagerag.tools.backends.diffusion import Generator
from imagerag.tools.backends.judges import Critic
from imagerag.tools.types import Box, Concept

MakeGenerator = Callable[[], Generator]


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_mask(size: tuple[int, int], left: bool = True) -> Image.Image:
    """White over the left (or right) half: what an edit redraws."""
    mask = Image.new("L", size, 0)
    width, height = size
    ImageDraw.Draw(mask).rectangle(
        (0, 0, width // 2 - 1, height - 1) if left else (width // 2, 0, width - 1, height - 1), fill=255
    )
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class GeneratorContract:
    """A test class inheriting this provides the fixture `make_generator`: a callable giving the generator under
    test, a fresh one each time for stand-ins that keep state between calls, the one loaded (and cached) for real
    models. Without it pytest stops each test with "fixture 'make_generator' not found"."""

    # 8-bit levels: a batched call may take other kernels than a single one, never another image. The same call with
    # and without a reference runs the same kernels, so there any difference at all is the reference's.
    TOLERANCE = 2

    @pytest.fixture
    def reference(self) -> Image.Image:
        return noise((32, 32), seed=11)

    def prompt_for(self, text: str, references: int, edit: bool = False) -> str:
        """The prompt the family takes with `references` reference images (and, for an edit, the source): a family
        that takes images in context needs their placeholders, which its profile's templates write."""
        return text

    def test_it_draws_n_images_of_one_size_and_reports_its_steps(self, make_generator: MakeGenerator) -> None:
        steps: list[tuple[int, int]] = []
        images = make_generator().generate("a red square", seed=0, n=2, on_step=lambda s, t: steps.append((s, t)))
        assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
        assert images[0].size == images[1].size and images[0].size[0] > 0
        assert steps and all(1 <= s <= t for s, t in steps)
        assert [s for s, _ in steps] == sorted({s for s, _ in steps})  # one report per step, in order
        assert steps[-1][0] == steps[-1][1]  # the progress reaches its total

    def test_a_batch_equals_single_draws_at_consecutive_seeds(self, make_generator: MakeGenerator) -> None:
        batch = make_generator().generate("a blue ring", seed=5, n=2)
        singles = [make_generator().generate("a blue ring", seed=seed, n=1)[0] for seed in (5, 6)]
        for drawn, alone in zip(batch, singles, strict=True):
            assert np.abs(pixels(drawn) - pixels(alone)).max() <= self.TOLERANCE
        assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > self.TOLERANCE  # two seeds, two images

    def test_references_reach_the_model(self, make_generator: MakeGenerator, reference: Image.Image) -> None:
        generator = make_generator()
        assert generator.max_references >= 1 and generator.max_region_references >= 1
        plain = make_generator().generate("a green star", seed=1)[0]
        conditioned = make_generator().generate(self.prompt_for("a green star", 1), seed=1, references=[reference])[0]
        assert (
            np.abs(pixels(plain) - pixels(conditioned)).max() > 0
        )  # the same call path: any change is the reference's

    def test_an_edit_keeps_the_pixels_outside_its_mask_when_it_says_so(self, make_generator: MakeGenerator) -> None:
        source = make_generator().generate("a red square", seed=2)[0]
        mask = half_mask(source.size)
        edited, exact = make_generator().edit(source, mask, self.prompt_for("a blue ring", 0, edit=True), seed=3)
        assert edited.size == source.size and isinstance(exact, bool)
        outside = np.asarray(mask) == 0
        changed = np.abs(pixels(edited) - pixels(source)).max(axis=-1)
        assert changed[~outside].max() > 0  # something was drawn inside
        if exact:
            assert changed[outside].max() == 0


class DiffusersContract(GeneratorContract):
    """A diffusers family also runs every component in one dtype and builds its edit pipeline over the same
    modules (no second copy of the weights)."""

    def test_one_dtype_and_no_second_copy_of_the_weights(self, make_generator: MakeGenerator) -> None:
        generator = make_generator()
        pipe = generator.pipe  # type: ignore[attr-defined]
        dtypes = {m.dtype for m in pipe.components.values() if hasattr(m, "dtype") and hasattr(m, "parameters")}
        assert len(dtypes) == 1, dtypes
        inpainting = getattr(generator, "_inpainting", None)
        if inpainting is not None:
            edit_pipe = inpainting()
            assert {n: id(m) for n, m in edit_pipe.components.items() if m is not None} == {
                n: id(m) for n, m in pipe.components.items() if m is not None
            }


class RegionReferencesContract:
    """A generator that masks references to regions (max_region_references > 1: an IP-Adapter with masks) also
    shows that the masks reach the model: swapping two regions' references changes the edit."""

    def test_each_region_reference_reaches_its_region(
        self, make_generator: MakeGenerator, reference: Image.Image
    ) -> None:
        generator = make_generator()
        assert generator.max_region_references >= 2
        source = generator.generate("a red square", seed=2)[0]
        mask = Image.new("L", source.size, 255)
        references = [reference, noise((32, 32), seed=12)]
        regions = [half_mask(source.size, left=True), half_mask(source.size, left=False)]
        swapped = regions[::-1]
        a, _ = make_generator().edit(source, mask, "two objects", 4, references, regions)
        b, _ = make_generator().edit(source, mask, "two objects", 4, references, swapped)
        assert np.abs(pixels(a) - pixels(b)).max() > 0  # the masks, not only the images, arrived


CONCEPTS = [
    Concept(id="c1", text="a square"),
    Concept(id="c2", text="a red square", kind="attribute", depends_on=["c1"]),
    Concept(id="c3", text="a square on the left", kind="relation", depends_on=["c1"]),
    Concept(id="c4", text="two rings", kind="count"),
]


class CriticContract:
    """A test class inheriting this provides the fixture `critic`, the critic under test; `image` is an image it can
    read."""

    @pytest.fixture
    def image(self) -> Image.Image:
        image = Image.new("RGB", (48, 48), "white")
        ImageDraw.Draw(image).rectangle((2, 18, 14, 30), fill="red")
        return image

    def test_one_verdict_per_concept_in_order_with_scores_in_range(self, critic: Critic, image: Image.Image) -> None:
        critique = critic.critique(image, CONCEPTS, "a red square on the left and two rings")
        assert [v.concept_id for v in critique.verdicts] == [c.id for c in CONCEPTS]
        assert all(isinstance(v.satisfied, bool) and 0.0 <= v.score <= 1.0 for v in critique.verdicts)
        assert critique.tokens >= 0

    def test_boxes_only_for_objects_and_within_the_image(self, critic: Critic, image: Image.Image) -> None:
        critique = critic.critique(image, CONCEPTS, "a red square on the left and two rings")
        for verdict in critique.verdicts:
            assert verdict.box is None or isinstance(verdict.box, Box)
        kinds = {c.id: c.kind for c in CONCEPTS}
        assert all(v.box is None for v in critique.verdicts if kinds[v.concept_id] == "count")

    def test_a_missing_concept_can_be_retrieved_for(self, critic: Critic, image: Image.Image) -> None:
        critique = critic.critique(image, CONCEPTS, "a red square on the left and two rings")
        assert all(v.caption for v in critique.verdicts if not v.satisfied)

    def test_the_same_image_gets_the_same_verdicts(self, critic: Critic, image: Image.Image) -> None:
        first = critic.critique(image, CONCEPTS, "p").verdicts
        again = critic.critique(image.copy(), CONCEPTS, "p").verdicts
        assert [(v.satisfied, round(v.score, 4)) for v in first] == [(v.satisfied, round(v.score, 4)) for v in again]
