"""Region edits: the edit tool keeps every pixel outside its mask on the pipelines that inpaint, shares the loaded
weights and dtype, the rules plan what to redraw, and the loop edits the best image when it holds some objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripted import ScriptedCritic

from imagerag.agent.config import Settings
from imagerag.agent.run import run
from imagerag.graphs.rules import edit_regions, kept_verdicts, targets_for_regions
from imagerag.graphs.state import RunState
from imagerag.tools.backends.layout import clear, edit_margin, object_view, region_mask
from imagerag.tools.backends.loading import load_backends
from imagerag.tools.backends.planner import RuleDecomposer
from imagerag.tools.backends.store import chroma_client, reference_cache
from imagerag.tools.grid import CELL_BOXES, rule_layout
from imagerag.tools.toolkit import Toolkit
from imagerag.tools.types import Box, Candidate, ConceptVerdict, EditRegion, RetrievalHit


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _outside_equal(before: Image.Image, after: Image.Image, regions: list[EditRegion]) -> bool:
    mask = np.asarray(region_mask(before.size, [r.box for r in regions], edit_margin(before.size))) > 0
    return bool((np.asarray(before)[~mask] == np.asarray(after)[~mask]).all()) and bool(mask.any())


@pytest.mark.parametrize("profile", ["tiny", "tiny-sdxl", "mini"])
def test_an_edit_keeps_every_pixel_outside_its_mask_and_shares_the_loaded_weights(profile, data_dir, tmp_path):
    backends = load_backends(Settings(profile=profile, data_dir=data_dir, device="cpu"))
    spec = backends.profile.generator
    tools = Toolkit(backends, tmp_path)
    source = tools.images.put(_noise((spec.width or 32, spec.height or 32)))
    regions = [
        EditRegion(box=CELL_BOXES["top left"], text="a red square"),
        EditRegion(box=CELL_BOXES["right"], text=""),
    ]
    chroma_client(data_dir)  # its reference cache becomes a folder references may be read from
    reference = reference_cache(data_dir) / "edit-test-red.png"
    reference.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(reference)
    hit = RetrievalHit(id="r", caption="a red square", similarity=1.0, source=str(reference), query="a red square")
    edited = tools.edit(source, regions, [hit], seed=3)
    before, after = tools.images.get(source), tools.images.get(edited.image_id)
    assert edited.edit is not None and edited.edit.exact_outside and edited.edit.source == source
    assert _outside_equal(before, after, regions) and before.tobytes() != after.tobytes()
    # The cleared region is the background colour; the inpainting pipeline reuses every loaded module, in its dtype.
    pipe, inpaint = backends.generator.pipe, backends.generator._inpainting()
    assert {name: id(module) for name, module in inpaint.components.items() if module is not None} == {
        name: id(module) for name, module in pipe.components.items() if module is not None
    }
    assert inpaint.unet.dtype == pipe.unet.dtype == pipe.vae.dtype


def _reference(data_dir: Path, name: str, colour: str) -> RetrievalHit:
    chroma_client(data_dir)  # its reference cache becomes a folder references may be read from
    path = reference_cache(data_dir) / f"edit-test-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return RetrievalHit(id=name, caption=name, similarity=1.0, source=str(path), query=name)


@pytest.mark.parametrize("profile", ["tiny", "mini"])
def test_each_region_reference_acts_only_in_its_own_region(profile, data_dir, tmp_path, monkeypatch):
    """Two objects redrawn in one edit, each with its own reference: one adapter, two images, two masks, passed the
    way diffusers' IPAdapterMaskProcessor expects; every pixel outside the regions is kept."""
    backends = load_backends(Settings(profile=profile, data_dir=data_dir, device="cpu"))
    seen: dict = {}
    inpaint = backends.generator._inpainting()
    original = type(inpaint).__call__

    def spy(pipe, *args, **kwargs):
        seen.update(kwargs)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(type(inpaint), "__call__", spy)
    spec = backends.profile.generator
    size = (spec.width or 32, spec.height or 32)
    tools = Toolkit(backends, tmp_path)
    source = tools.images.put(_noise(size))
    heart, square = _reference(data_dir, "heart", "red"), _reference(data_dir, "square", "blue")
    regions = [
        EditRegion(box=CELL_BOXES["top left"], text="a red heart", reference_ids=["heart"]),
        EditRegion(box=CELL_BOXES["bottom right"], text="a blue square", reference_ids=["square"]),
    ]
    edited = tools.edit(source, regions, [square, heart], seed=2)
    assert [h.id for h in edited.references] == ["heart", "square"]
    [images] = seen["ip_adapter_image"]
    [masks] = seen["cross_attention_kwargs"]["ip_adapter_masks"]
    assert len(images) == 2 and masks.shape == (1, 2, size[1], size[0])
    for i, region in enumerate(regions):
        expected = np.asarray(region_mask(size, [region.box], edit_margin(size))) > 0
        assert (masks[0, i].numpy() > 0.5).tolist() == expected.tolist()
    assert edited.edit is not None and edited.edit.exact_outside
    assert _outside_equal(tools.images.get(source), tools.images.get(edited.image_id), regions)


def test_omnigen_edits_with_the_image_in_context_and_says_it_cannot_keep_pixels(data_dir, tmp_path, monkeypatch):
    backends = load_backends(Settings(profile="tiny-omnigen", data_dir=data_dir, device="cpu"))
    seen = {}
    original = type(backends.generator.pipe).__call__

    def spy(pipe, *args, **kwargs):
        seen.update(kwargs)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(type(backends.generator.pipe), "__call__", spy)
    tools = Toolkit(backends, tmp_path)
    source = tools.images.put(_noise((32, 32)))
    edited = tools.edit(source, [EditRegion(box=CELL_BOXES["centre"], text="a heart")], [], seed=1)
    assert edited.edit is not None and not edited.edit.exact_outside
    assert len(seen["input_images"]) == 1 and "<|image_1|>" in seen["prompt"] and "a heart" in seen["prompt"]


PROMPT = "a red heart in the top left, a blue square on the right and a ring"


def _state(satisfied: set[str], boxes: dict[str, str], strays: tuple[str, ...] = (), prompt: str = PROMPT) -> RunState:
    concepts, _ = RuleDecomposer().decompose(prompt)
    verdicts = [
        ConceptVerdict(
            concept_id=c.id,
            satisfied=c.id in satisfied,
            score=0.8 if c.id in satisfied else 0.2,
            box=CELL_BOXES[boxes[c.id]] if c.id in boxes else None,
        )
        for c in concepts
    ]
    best = Candidate(
        image_id="0" * 32, round=1, prompt=prompt, seed=0, verdicts=verdicts, strays=[CELL_BOXES[c] for c in strays]
    )
    return RunState(message=prompt, prompt=prompt, concepts=concepts, layout=rule_layout(concepts), candidates=[best])


def test_the_concepts_and_layout_of_the_rules_prompt():
    state = _state(set(), {})
    assert [(c.id, c.kind, c.text) for c in state.concepts] == [
        ("c1", "object", "a heart"),
        ("c2", "attribute", "a red heart"),
        ("c3", "relation", "a heart in the top left"),
        ("c4", "object", "a square"),
        ("c5", "attribute", "a blue square"),
        ("c6", "relation", "a square on the right"),
        ("c7", "object", "a ring"),
    ]
    assert state.layout == {"c1": CELL_BOXES["top left"], "c4": CELL_BOXES["right"], "c7": CELL_BOXES["centre"]}


def test_an_edit_redraws_only_the_objects_that_miss_something():
    # The square is complete (on the right), the ring is drawn in the centre, the heart is missing.
    state = _state({"c4", "c5", "c6", "c7"}, {"c4": "right", "c7": "centre"})
    [region] = edit_regions(state, occupied={"right", "centre"})
    assert region.text == "a red heart in the top left" and region.box == CELL_BOXES["top left"]
    assert region.concept_ids == ["c1"]


def test_an_object_in_its_place_with_a_wrong_look_is_redrawn_in_place_and_a_misplaced_one_moves():
    wrong_colour = _state({"c1", "c3", "c4", "c5", "c6", "c7"}, {"c1": "top left", "c4": "right", "c7": "centre"})
    [region] = edit_regions(wrong_colour, occupied={"top left", "right", "centre"})
    assert region.box == CELL_BOXES["top left"] and region.text == "a red heart in the top left"
    misplaced = _state({"c1", "c2", "c4", "c5", "c6", "c7"}, {"c1": "bottom", "c4": "right", "c7": "centre"})
    cleared, drawn = edit_regions(misplaced, occupied={"bottom", "right", "centre"})
    assert (cleared.box, cleared.text) == (CELL_BOXES["bottom"], "")
    assert drawn.box == CELL_BOXES["top left"]


def test_with_region_references_every_broken_object_is_redrawn_each_with_its_own_target():
    # Only the ring is right: the heart and the square are both redrawn in one edit, each retrieving for itself.
    state = _state({"c7"}, {"c7": "centre"})
    regions = edit_regions(state, occupied={"centre"})
    assert [r.concept_ids for r in regions] == [["c1"], ["c4"]]
    assert [(i, c.id) for i, c in targets_for_regions(state, regions, limit=4)] == [(0, "c1"), (1, "c4")]
    assert [(i, c.id) for i, c in targets_for_regions(state, regions, limit=1)] == [(0, "c1")]
    # A reference goes to what text does not draw: once images from text showed the whole square more often than
    # they missed it (the first image missed it), it is redrawn from text.
    shown = [
        state.candidates[0].model_copy(
            update={
                "image_id": str(i) * 32,
                "verdicts": [
                    v.model_copy(update={"satisfied": v.concept_id in {"c4", "c5", "c6"}})
                    for v in state.candidates[0].verdicts
                ],
            }
        )
        for i in (1, 2)
    ]
    once = state.model_copy(update={"candidates": [*state.candidates, shown[0]]})
    assert [(i, c.id) for i, c in targets_for_regions(once, regions, limit=4)] == [(0, "c1"), (1, "c4")]
    twice = state.model_copy(update={"candidates": [*state.candidates, *shown]})
    assert [(i, c.id) for i, c in targets_for_regions(twice, regions, limit=4)] == [(0, "c1")]


def test_no_edit_when_nothing_is_worth_keeping_or_nothing_is_missing():
    assert edit_regions(_state({"c2"}, {}), occupied=set()) == []
    everything = {f"c{i}" for i in range(1, 8)}
    assert edit_regions(_state(everything, {}), occupied=set()) == []


def test_a_stray_is_cleared_once_everything_asked_for_is_there():
    everything = {f"c{i}" for i in range(1, 8)}
    placed = {"c1": "top left", "c4": "right", "c7": "centre"}
    [region] = edit_regions(
        _state(everything, placed, strays=("bottom left",)), occupied={*placed.values(), "bottom left"}
    )
    assert (region.box, region.text, region.concept_ids) == (CELL_BOXES["bottom left"], "", [])


def test_a_missing_object_with_no_place_of_its_own_is_redrawn_over_a_stray_and_one_with_a_place_where_it_says():
    # The ring (no place words) is missing and a stray sits at the bottom: the ring is drawn there, over it.
    state = _state({"c1", "c2", "c3", "c4", "c5", "c6"}, {"c1": "top left", "c4": "right"}, strays=("bottom",))
    [region] = edit_regions(state, occupied={"top left", "right", "bottom"})
    assert (region.box, region.text, region.concept_ids) == (CELL_BOXES["bottom"], "a ring at the bottom", ["c7"])
    # The heart must be in the top left: it is drawn there, and the stray is cleared.
    state = _state({"c4", "c5", "c6", "c7"}, {"c4": "right", "c7": "centre"}, strays=("bottom",))
    cleared, drawn = edit_regions(state, occupied={"right", "centre", "bottom"})
    assert (cleared.box, cleared.text, cleared.concept_ids) == (CELL_BOXES["bottom"], "", [])
    assert (drawn.box, drawn.concept_ids) == (CELL_BOXES["top left"], ["c1"])


RELATION = "a square to the left of a ring and an hourglass"


def _relation_state(satisfied: set[str], boxes: dict[str, str]) -> RunState:
    concepts, _ = RuleDecomposer().decompose(RELATION)
    assert [(c.id, c.kind) for c in concepts] == [
        ("c1", "object"),
        ("c2", "relation"),
        ("c3", "object"),
        ("c4", "object"),
    ]
    verdicts = [
        ConceptVerdict(concept_id=c.id, satisfied=c.id in satisfied, score=0.5, box=CELL_BOXES.get(boxes.get(c.id, "")))
        for c in concepts
    ]
    best = Candidate(image_id="0" * 32, round=1, prompt=RELATION, seed=0, verdicts=verdicts)
    return RunState(
        message=RELATION, prompt=RELATION, concepts=concepts, layout=rule_layout(concepts), candidates=[best]
    )


def _column(box: Box) -> int:
    return round(box.x0 * 3)


def test_a_missing_relation_end_is_drawn_on_the_asked_side_of_the_object_that_stands():
    # The square stands at the bottom left, the ring is missing: the square stays, the ring goes to its right.
    state = _relation_state({"c1", "c4"}, {"c1": "bottom left", "c4": "top right"})
    [region] = edit_regions(state, occupied={"bottom left", "top right"})
    assert region.concept_ids == ["c3"] and region.text.startswith("a ring ") and _column(region.box) > 0


def test_both_ends_of_a_relation_move_when_no_free_cell_lies_on_the_asked_side():
    # The ring stands in the top left (nothing is left of it) and the square on the right (nothing is right of it).
    state = _relation_state({"c1", "c3", "c4"}, {"c1": "right", "c3": "top left", "c4": "centre"})
    regions = edit_regions(state, occupied={"right", "top left", "centre"})
    drawn = {r.concept_ids[0]: r.box for r in regions if r.text}
    cleared = {cell for r in regions if not r.text for cell, box in CELL_BOXES.items() if box == r.box}
    assert set(drawn) == {"c1", "c3"} and _column(drawn["c1"]) < _column(drawn["c3"])
    assert CELL_BOXES["centre"] not in drawn.values() and cleared <= {"right", "top left"}


def test_an_object_with_no_place_of_its_own_leaves_the_cell_another_objects_words_name():
    # Nothing is right and a stray sits on the right, where the square must go: the ring, placed first and free to
    # go anywhere, does not take it (both would be drawn there); it goes where the layout put it.
    state = _state(set(), {}, strays=("right",), prompt="a ring and a blue square on the right")
    regions = edit_regions(state, occupied={"right"}, compose_over=1)
    drawn = {r.concept_ids[0]: r.box for r in regions if r.text}
    assert drawn == {"c1": state.layout["c1"], "c2": CELL_BOXES["right"]} and state.layout["c1"] != CELL_BOXES["right"]


COUNTED = "a red heart in the top left and two blue squares"


@pytest.mark.parametrize(
    ("satisfied", "occupied", "drawn", "cleared"),
    [
        # Three things where two squares belong: two are drawn again in their cells, the third is cleared.
        ({"c1", "c2", "c3"}, {"centre", "bottom", "right"}, ["centre", "bottom"], ["right"]),
        # Two squares of the wrong colour: both are drawn again where they are, nothing is cleared.
        ({"c1", "c2", "c3", "c4"}, {"centre", "bottom"}, ["centre", "bottom"], []),
        # One thing only: it is drawn again, and the second square goes to a free cell (not the heart's).
        ({"c1", "c2", "c3"}, {"centre"}, ["centre", "bottom right"], []),
    ],
)
def test_a_count_that_misses_something_is_drawn_again_one_region_per_thing(satisfied, occupied, drawn, cleared):
    state = _state(satisfied, {"c1": "top left"}, prompt=COUNTED)
    regions = edit_regions(state, occupied={"top left", *occupied})
    by_cell = {cell: r for r in regions for cell, box in CELL_BOXES.items() if box == r.box}
    assert sorted(c for c, r in by_cell.items() if r.text) == sorted(drawn)
    assert sorted(c for c, r in by_cell.items() if not r.text) == cleared
    assert all(r.text.startswith("a blue square ") and r.concept_ids == ["c4"] for r in regions if r.text)
    # With every concept right there is nothing to do; a prompt of a count alone is drawn again whole.
    assert edit_regions(_state({f"c{i}" for i in range(1, 6)}, {"c1": "top left"}, prompt=COUNTED), occupied) == []
    assert edit_regions(_state(set(), {}, prompt="two blue squares"), occupied=occupied) == []


def test_a_margin_stops_at_the_boxes_it_must_keep():
    size, margin = (48, 48), 2
    grown = np.asarray(region_mask(size, [CELL_BOXES["centre"]], margin)) > 0
    kept = np.asarray(region_mask(size, [CELL_BOXES["centre"]], margin, keep=[CELL_BOXES["right"]])) > 0
    left, top, right, bottom = CELL_BOXES["right"].pixels(*size)
    assert grown[top:bottom, left:right].any() and not kept[top:bottom, left:right].any()
    # Elsewhere the margin is as before.
    assert (grown & ~kept).sum() == grown[top:bottom, left:right].sum()
    image = Image.new("RGB", size, "white")
    image.paste((255, 0, 0), (16, 16, 48, 32))  # something in the centre and on the right
    cleared = np.asarray(clear(image, [CELL_BOXES["centre"]], margin, keep=[CELL_BOXES["right"]]))
    assert (cleared[16:32, 14:32] == 255).all() and (cleared[16:32, 32:48] == [255, 0, 0]).all()


def test_with_no_object_whole_an_edit_composes_the_image_when_a_whole_image_cannot_take_every_reference():
    # Nothing asked for is right; the bottom holds a stray, the centre something no stray (as a count's objects are).
    state = _state(set(), {}, strays=("bottom",))
    assert edit_regions(state, occupied={"centre", "bottom"}) == []
    assert edit_regions(state, occupied={"centre", "bottom"}, compose_over=3) == []  # one whole image takes them all
    regions = edit_regions(state, occupied={"centre", "bottom"}, compose_over=1)
    drawn = {r.concept_ids[0]: r.box for r in regions if r.text}
    # Each object in a region of its own; the ring, with no place of its own, over the stray; the centre is kept.
    assert drawn == {"c1": CELL_BOXES["top left"], "c4": CELL_BOXES["right"], "c7": CELL_BOXES["bottom"]}
    assert [r for r in regions if not r.text] == []
    targets = targets_for_regions(state, regions, limit=4)
    assert [c.id for _, c in targets] == ["c1", "c4", "c7"]


def test_verdicts_outside_an_exact_edit_stand():
    state = _state({"c4", "c5", "c6", "c7"}, {"c4": "right", "c7": "centre"})
    regions = edit_regions(state, occupied={"right", "centre"})
    from imagerag.tools.types import Edit

    kept = kept_verdicts(
        state.candidates[0], Edit(source="0" * 32, regions=regions, exact_outside=True), state.concepts
    )
    assert [v.concept_id for v in kept] == ["c4", "c5", "c6", "c7"]
    assert (
        kept_verdicts(state.candidates[0], Edit(source="x", regions=regions, exact_outside=False), state.concepts) == []
    )


def test_the_loop_edits_the_best_image_when_it_holds_some_objects(data_dir, tmp_path):
    """tiny (SD 1.5 layout): the first image has the square and not the heart; the round edits it."""
    settings = Settings(profile="tiny", data_dir=data_dir, device="cpu")
    # The critic sees the square in the bottom right cell; the heart's region (the layout's centre) is elsewhere.
    critic = ScriptedCritic([{"c2"}, {"c1"}], boxes={"c2": CELL_BOXES["bottom right"]})
    backends = dataclasses.replace(load_backends(settings), critic=critic)
    result = run("a heart and a square", settings, tmp_path / "runs", backends=backends)
    assert [s.node for s in result.steps] == ["plan", "generate", "critique", "retrieve", "edit", "critique", "finish"]
    first, edited = result.candidates
    assert edited.edit is not None and edited.edit.source == first.image_id and edited.edit.exact_outside
    [region] = edited.edit.regions
    assert region.concept_ids == ["c1"] and region.text.startswith("a heart ")
    # The square's verdict was kept from the first image; only the heart was judged again.
    assert {v.concept_id for v in edited.verdicts} == {"c1", "c2"} and critic.calls == 2
    images = Path(result.run_dir) / "images"
    before, after = (Image.open(images / f"{c.image_id}.png").convert("RGB") for c in (first, edited))
    assert _outside_equal(before, after, edited.edit.regions)
    # The heart's margin stops at the square's box (diagonal neighbours share a corner): the square keeps every pixel.
    square = CELL_BOXES["bottom right"].pixels(*before.size)
    assert before.crop(square).tobytes() == after.crop(square).tobytes()
    assert "edit" in (Path(result.run_dir) / "report.html").read_text()


def test_one_edit_redraws_two_missing_objects_each_with_its_own_reference(data_dir, tmp_path, monkeypatch):
    """tiny: the first image has only the ring; one edit redraws the heart and the square, each region with the
    reference retrieved for its object, masked to it."""
    settings = Settings(profile="tiny", data_dir=data_dir, device="cpu")
    critic = ScriptedCritic([{"c3"}, {"c1", "c2", "c3"}], boxes={"c3": CELL_BOXES["bottom right"]})
    backends = dataclasses.replace(load_backends(settings), critic=critic)
    masks: list = []
    original = type(backends.generator).edit

    def spy(generator, image, mask, prompt, seed, references=(), reference_masks=(), on_step=None):
        masks.append(list(reference_masks))
        return original(generator, image, mask, prompt, seed, references, reference_masks, on_step)

    monkeypatch.setattr(type(backends.generator), "edit", spy)
    result = run("a heart, a square and a ring", settings, tmp_path / "runs", backends=backends)
    assert [s.node for s in result.steps] == ["plan", "generate", "critique", "retrieve", "edit", "critique", "finish"]
    edited = result.candidates[-1]
    assert edited.edit is not None and edited.edit.exact_outside
    drawn = [r for r in edited.edit.regions if r.text]
    assert [r.concept_ids for r in drawn] == [["c1"], ["c2"]]
    assert all(len(r.reference_ids) == 1 for r in drawn) and drawn[0].reference_ids != drawn[1].reference_ids
    assert [h.id for h in edited.references] == [r.reference_ids[0] for r in drawn]
    assert len(masks) == 1 and len(masks[0]) == 2
    assert (Path(result.run_dir) / "report.html").read_text().count("its own reference: ") == 2


@pytest.mark.parametrize(
    ("message", "script", "region"),
    [
        (
            "make the square blue",
            [{"c1", "c2"}, set(), {"c1", "c2", "c3"}],
            ("a blue square in the top left", "top left"),
        ),
        ("move the heart to the left", [{"c1", "c2"}, set(), {"c1", "c2", "c3"}], ("a heart on the left", "left")),
    ],
)
def test_a_thread_message_about_one_object_becomes_an_edit_of_it(data_dir, tmp_path, message, script, region):
    settings = Settings(profile="tiny", data_dir=data_dir, device="cpu")
    backends = dataclasses.replace(load_backends(settings), critic=ScriptedCritic(script))
    first = run("a heart and a square", settings, tmp_path / "runs", thread=tmp_path.name, backends=backends)
    assert first.status == "satisfied" and len(first.candidates) == 1
    second = run(message, settings, tmp_path / "runs", thread=tmp_path.name, backends=backends)
    assert second.status == "satisfied", second.stop_reason
    edited = second.candidates[-1]
    assert edited.edit is not None and edited.edit.source == first.candidates[0].image_id
    drawn = [r for r in edited.edit.regions if r.text]
    assert [(r.text, r.box) for r in drawn] == [(region[0], CELL_BOXES[region[1]])]


def test_a_reference_object_is_handed_over_cropped_with_a_margin_or_alone_in_its_place():
    image = Image.new("RGB", (100, 100), (250, 250, 250))
    image.paste((255, 0, 0), (10, 10, 30, 30))  # the object, in the box below
    image.paste((0, 0, 255), (60, 60, 90, 90))  # another object
    box = Box(x0=0.1, y0=0.1, x1=0.3, y1=0.3)
    crop = object_view(image, box, "crop")
    assert crop.size == (26, 26) and crop.getpixel((13, 13)) == (255, 0, 0)  # 20 px and 3 px on each side
    alone = object_view(image, box, "isolate")
    assert alone.size == image.size and alone.getpixel((20, 20)) == (255, 0, 0)
    assert alone.getpixel((75, 75)) == (250, 250, 250)  # the other object is gone
