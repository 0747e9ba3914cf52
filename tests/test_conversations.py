"""Conversations on a thread: each message read as typed changes of objects with identity, refused with a question
when it cannot be mapped (the thread untouched), a removed object cleared and required absent, undo, and branches
from an earlier turn; from the CLI too."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw
from scripted import FakeGenerator, fake_backends
from test_cli import imagerag

from imagerag.agent.run import history, run
from imagerag.graphs.state import Budget
from imagerag.tools.grid import CELL_BOXES, cell_of, named_cell
from imagerag.tools.types import Concept, ConceptVerdict, Critique

PROMPT = "a red square on the left and a blue circle on the right"
WHITE = (255, 255, 255)


class TwoObjects(FakeGenerator):
    """Draws a red square in the left cell and a blue circle in the right cell on white (48 px)."""

    def generate(self, prompt, seed, n=1, references=(), on_step=None):
        self.calls.append({"prompt": prompt, "seed": seed, "n": n, "references": len(references)})
        images = []
        for _ in range(n):
            image = Image.new("RGB", (48, 48), WHITE)
            draw = ImageDraw.Draw(image)
            draw.rectangle((4, 20, 12, 28), fill="red")
            draw.ellipse((36, 20, 44, 28), fill="blue")
            images.append(image)
        return images


def cell_blank(image: Image.Image, cell: str) -> bool:
    left, top, right, bottom = CELL_BOXES[cell].pixels(*image.size)
    return bool((np.asarray(image.convert("RGB"))[top:bottom, left:right] == WHITE).all())


def shows_red(image: Image.Image, cell: str) -> bool:
    """Whether the red square's pixels are in the cell (an edit's margin may paint a rim of a neighbouring cell)."""
    left, top, right, bottom = CELL_BOXES[cell].pixels(*image.size)
    return bool((np.asarray(image.convert("RGB"))[top:bottom, left:right] == (255, 0, 0)).all(-1).any())


class TextCritic:
    """Satisfies the concept texts in `ok`, a place only when its cell holds something; sees the square where
    something other than the circle is drawn and the circle on the right; an absent object is satisfied when the
    cell where it was is blank."""

    def __init__(self, ok: set[str]):
        self.ok, self.calls = ok, []

    @staticmethod
    def cell_of_square(image: Image.Image) -> str:
        """Where something other than the circle is drawn (the square, or what an edit drew for it)."""
        return next((cell for cell in CELL_BOXES if cell != "right" and not cell_blank(image, cell)), "left")

    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str) -> Critique:
        self.calls.append([c.text for c in concepts])
        verdicts = []
        for c in concepts:
            if c.kind == "absent":
                satisfied = c.box is not None and cell_blank(image, cell_of(c.box))
                verdicts.append(ConceptVerdict(concept_id=c.id, satisfied=satisfied, score=0.9 if satisfied else 0.1))
                continue
            box = CELL_BOXES[self.cell_of_square(image) if "square" in c.text else "right"]
            cell = named_cell(c.text) if c.kind == "relation" else None
            satisfied = c.text in self.ok and (cell is None or not cell_blank(image, cell))
            score = 0.9 if satisfied else 0.1
            verdicts.append(
                ConceptVerdict(
                    concept_id=c.id, satisfied=satisfied, score=score, box=box if c.kind == "object" else None
                )
            )
        return Critique(verdicts=verdicts)


OK = {"a square", "a red square", "a square on the left", "a circle", "a blue circle", "a circle on the right"}


def settings_for(tiny_settings):
    return tiny_settings.model_copy(update={"budget": Budget(max_rounds=3, max_generations=4)})


def test_an_instruction_it_cannot_map_is_refused_with_the_clause_and_the_thread_stays_as_it_was(
    tiny_settings, tiny_store, tmp_path
):
    backends = fake_backends(tiny_store, TextCritic(OK | {"a green square"}), generator=TwoObjects())
    settings = settings_for(tiny_settings)
    first = run(PROMPT, settings, tmp_path, thread="t", backends=backends)
    assert first.status == "satisfied" and [o.noun for o in first.scene.objects] == ["square", "circle"]

    refused = run("sing a song about it", settings, tmp_path, thread="t", backends=backends)
    assert refused.status == "needs_clarification" and "sing a song about it" in refused.clarification
    assert refused.turn == 1 and refused.concepts == first.concepts and refused.candidates == first.candidates
    assert refused.scene == first.scene and len(history("t", settings)) == 1

    second = run("make the square green", settings, tmp_path, thread="t", backends=backends)
    assert second.status == "satisfied" and second.turn == 2
    assert second.prompt == "a green square on the left and a blue circle on the right"
    texts = [c.text for c in second.concepts]
    assert "a green square" in texts and "a red square" not in texts and "a blue circle" in texts
    # Identity: the square is the same object, recoloured; the circle's concepts kept their ids and verdicts.
    assert [o.id for o in second.scene.objects] == [o.id for o in first.scene.objects]
    circle = {c.text: c.id for c in first.concepts if "circle" in c.text}
    assert {c.text: c.id for c in second.concepts if "circle" in c.text} == circle


def test_a_reference_that_could_mean_two_objects_asks_which_and_a_place_resolves_it(
    tiny_settings, tiny_store, tmp_path
):
    prompt = "a red square on the left and a blue square on the right"
    ok = {"a square", "a red square", "a blue square", "a square on the left", "a square on the right"}
    backends = fake_backends(tiny_store, TextCritic(ok | {"a large square", "a large red square"}))
    settings = settings_for(tiny_settings)
    first = run(prompt, settings, tmp_path, thread="two", backends=backends)
    assert [o.noun for o in first.scene.objects] == ["square", "square"]  # two objects of one shape stay two

    asked = run("make the square large", settings, tmp_path, thread="two", backends=backends)
    assert asked.status == "needs_clarification" and "which" in asked.clarification.lower()
    assert asked.scene == first.scene

    done = run("make the square on the left large", settings, tmp_path, thread="two", backends=backends)
    left, right = done.scene.objects
    assert left.attributes.get("size") == "large" and "size" not in right.attributes
    assert right == first.scene.objects[1]


def test_remove_clears_the_object_and_the_run_is_satisfied_only_once_it_is_gone(tiny_settings, tiny_store, tmp_path):
    critic = TextCritic(OK)
    backends = fake_backends(tiny_store, critic, generator=TwoObjects())
    settings = settings_for(tiny_settings)
    run(PROMPT, settings, tmp_path, thread="rm", backends=backends)

    removed = run("remove the square", settings, tmp_path, thread="rm", backends=backends)
    absent = [c for c in removed.concepts if c.kind == "absent"]
    assert [o.noun for o in removed.scene.objects] == ["circle"] and len(absent) == 1
    assert "square" not in removed.prompt and absent[0].box is not None
    assert removed.status == "satisfied"
    best = Image.open(removed.best_image)
    assert cell_blank(best, "left") and not cell_blank(best, "right")  # the square is gone, the circle kept
    # The carried image still showed the square: the absent concept failed there, and an edit cleared its region.
    assert removed.best.edit is not None and [r.text for r in removed.best.edit.regions] == [""]
    assert not any(h for c in removed.candidates if c.turn == 2 for h in c.references)  # nothing retrieved for it


def test_undo_returns_to_the_image_and_objects_before_and_a_branch_continues_from_an_earlier_turn(
    tiny_settings, tiny_store, tmp_path
):
    backends = fake_backends(tiny_store, TextCritic(OK | {"a green square", "a green circle"}), generator=TwoObjects())
    settings = settings_for(tiny_settings)
    first = run(PROMPT, settings, tmp_path, thread="u", backends=backends)
    run("make the square green", settings, tmp_path, thread="u", backends=backends)

    undone = run("undo", settings, tmp_path, thread="u", backends=backends)
    assert undone.turn == 3 and undone.scene.objects == first.scene.objects and undone.prompt == first.prompt
    assert undone.best.image_id == first.best.image_id  # the image from before the change, carried forward

    branch = run("make the circle green", settings, tmp_path, thread="u", backends=backends, from_turn=1)
    assert branch.turn == 4 and [o.attributes["colour"] for o in branch.scene.objects] == ["red", "green"]
    turns = history("u", settings)
    assert [(t.index, t.parent) for t in turns] == [(1, None), (2, 1), (3, 2), (4, 1)]
    assert turns[1].scene is not None and turns[1].scene.objects[0].attributes["colour"] == "green"


def test_the_cli_shows_objects_per_turn_undoes_and_exits_2_on_a_refused_message(data_dir, tmp_path):
    common = ("--data-dir", str(data_dir), "--out", str(tmp_path))
    made = imagerag("generate", PROMPT, "--profile", "tiny", "--thread", "cli", "--json", *common)
    assert made.exit_code == 0, made.output
    # No --profile: the thread draws with the profile it recorded (tiny), not the default.
    refused = imagerag("generate", "sing a song", "--thread", "cli", *common)
    assert refused.exit_code == 2 and "needs clarification" in refused.output and "sing a song" in refused.output
    changed = imagerag("generate", "make the circle green", "--thread", "cli", "--json", *common)
    assert changed.exit_code == 0, changed.output
    assert json.loads(changed.stdout[changed.stdout.index("{") :])["turn"] == 2
    undone = imagerag("thread", "undo", "cli", *common)
    assert undone.exit_code == 0, undone.output
    shown = imagerag("history", "cli", "--concepts", "--data-dir", str(data_dir))
    assert shown.exit_code == 0, shown.output
    assert "o2: green circle, right" in shown.output and "o2: blue circle, right" in shown.output
    assert "a green circle" in shown.output and "undo" in shown.output


def test_a_move_clears_the_old_place_and_it_stays_clear(tiny_settings, tiny_store, tmp_path):
    ok = OK | {"a square at the bottom"}
    backends = fake_backends(tiny_store, TextCritic(ok), generator=TwoObjects())
    settings = settings_for(tiny_settings)
    run(PROMPT, settings, tmp_path, thread="mv", backends=backends)
    moved = run("move the square to the bottom", settings, tmp_path, thread="mv", backends=backends)
    assert moved.status == "satisfied" and "a square at the bottom" in [c.text for c in moved.concepts]
    assert "a square on the left" not in [c.text for c in moved.concepts]  # the old place is no concept any more
    edit = moved.best.edit
    assert edit is not None and {(cell_of(r.box), bool(r.text)) for r in edit.regions} == {
        ("left", False),
        ("bottom", True),
    }
    best = Image.open(moved.best_image)
    assert not shows_red(best, "left") and not cell_blank(best, "bottom")  # the square left its old place
    # The next turn starts from that image: the old place stays clear when something else changes.
    later = run("make the circle green", settings, tmp_path, thread="mv", backends=backends)
    assert not shows_red(Image.open(later.best_image), "left") and later.turn == 3
