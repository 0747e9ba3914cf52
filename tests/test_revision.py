"""Objects with identity, a thread's messages read as typed changes or refused, one apply function for both
readers (rules and a scripted LLM), and the critics' absent-object concept. No models, no files."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from langchain_core.messages import HumanMessage
from PIL import Image
from scripted import ScriptedChatModel

from imagerag.tools.backends.judges import ClipJudge, VLMJudge, VLMJudgement
from imagerag.tools.backends.planner import (
    ConceptList,
    LLMDecomposer,
    RuleDecomposer,
    revise_turn,
)
from imagerag.tools.config import PROFILES
from imagerag.tools.grid import CELL_BOXES
from imagerag.tools.revision import (
    OPEN_VOCABULARY,
    Add,
    Move,
    NewObject,
    ObjectRef,
    Remove,
    Replace,
    SetAttribute,
    Undo,
    apply_change,
    apply_changes,
    check_changes,
    miniworld_vocabulary,
    objects_of_concepts,
    render_prompt,
    split_clauses,
    vocabulary_for,
)
from imagerag.tools.types import Concept, ConceptVerdict, ScenePlan

MINI = miniworld_vocabulary()


def mini() -> RuleDecomposer:
    return RuleDecomposer(MINI)


def judged(concepts: list[Concept]) -> list[Concept]:
    """The concepts as if the critic had judged each one satisfied on the best image."""
    return [c.model_copy(update={"verdict": "satisfied", "score": 0.9, "attempts": 1}) for c in concepts]


def texts(concepts: list[Concept]) -> list[str]:
    return [c.text for c in concepts]


def turn(prompt: str, message: str, reader: RuleDecomposer | None = None, **kwargs):
    """Plan `prompt`, judge everything satisfied, then read and apply `message`."""
    reader = reader or mini()
    scene, concepts, _ = reader.plan(prompt)
    concepts = judged(concepts)
    return scene, concepts, revise_turn(reader, scene, concepts, message, **kwargs)


# ----------------------------------------------------------------------------- clauses


def test_clauses_split_at_and_commas_and_then_but_never_inside_a_phrase():
    assert split_clauses("make the heart red and move the ring to the bottom left") == [
        "make the heart red",
        "move the ring to the bottom left",
    ]
    assert split_clauses("add a red circle and a blue square") == ["add a red circle and a blue square"]
    assert split_clauses("make the cat black and white") == ["make the cat black and white"]
    assert split_clauses("make the square red, then add a star and remove the ring.") == [
        "make the square red",
        "then add a star",
        "remove the ring",
    ]
    assert split_clauses("add a red circle, a blue square and a green star") == [
        "add a red circle, a blue square and a green star"
    ]


def test_an_add_of_two_objects_is_one_change_and_black_and_white_is_one_colour():
    scene, _, _ = RuleDecomposer().plan("a cat on the left")
    understanding = RuleDecomposer().understand("add a red circle and a blue square", scene)
    [add] = understanding.changes
    assert isinstance(add, Add) and [(o.noun, o.attributes) for o in add.objects] == [
        ("circle", ["red"]),
        ("square", ["blue"]),
    ]
    [recolour] = RuleDecomposer().understand("make the cat black and white", scene).changes
    assert isinstance(recolour, SetAttribute) and (recolour.kind, recolour.value) == ("colour", "black and white")


def test_a_verb_carries_over_to_a_clause_that_has_none():
    scene, _, _ = mini().plan("a blue heart on the left and a yellow ring on the right")
    changes = mini().understand("make the heart red and the ring green", scene).changes
    assert [(c.target.id, c.value) for c in changes if isinstance(c, SetAttribute)] == [("o1", "red"), ("o2", "green")]


# ----------------------------------------------------------------------------- objects with identity


def test_two_objects_of_one_shape_stay_two_objects():
    scene, concepts, tokens = mini().plan("a red square on the left and a blue square on the right")
    assert tokens == 0
    assert [(o.id, o.noun, o.attributes, o.cell) for o in scene.objects] == [
        ("o1", "square", {"colour": "red"}, "left"),
        ("o2", "square", {"colour": "blue"}, "right"),
    ]
    assert [(c.id, c.text, c.object_id, c.depends_on) for c in concepts] == [
        ("c1", "a square", "o1", []),
        ("c2", "a red square", "o1", ["c1"]),
        ("c3", "a square on the left", "o1", ["c1"]),
        ("c4", "a square", "o2", []),
        ("c5", "a blue square", "o2", ["c4"]),
        ("c6", "a square on the right", "o2", ["c4"]),
    ]


def test_decomposed_concepts_name_their_object_and_attribute_kind():
    scene, concepts, _ = RuleDecomposer().plan(
        "A photo of a large red heart on the left and a blue square, in watercolour style"
    )
    assert [(c.text, c.object_id, c.attribute) for c in concepts] == [
        ("a heart", "o1", None),
        ("a large heart", "o1", "size"),
        ("a red heart", "o1", "colour"),
        ("a heart on the left", "o1", None),
        ("a square", "o2", None),
        ("a blue square", "o2", "colour"),
        ("in watercolour style", None, None),
    ]
    assert [d.text for d in scene.extras] == ["in watercolour style"]
    # A relation to another object is a relation to its id; the prompt names the other object once.
    scene, _, _ = RuleDecomposer().plan("a cat to the left of a red sofa")
    cat, sofa = scene.objects
    assert (cat.relation, cat.relative_to, sofa.attributes) == ("to the left of", sofa.id, {"colour": "red"})
    assert render_prompt(scene) == "a cat to the left of a red sofa"


def test_the_llm_decomposer_gives_objects_ids_and_keeps_what_it_cannot_break_down():
    answer = ConceptList.model_validate(
        {
            "concepts": [
                {"text": "a dog", "kind": "object"},
                {"text": "a brown dog", "kind": "attribute", "parent": 1, "attribute": "colour"},
                {"text": "the dog wears a green scarf", "kind": "attribute", "parent": 1},
                {"text": "a dog on the left", "kind": "relation", "parent": 1},
                {"text": "watercolour style", "kind": "style"},
            ]
        }
    )
    llm = ScriptedChatModel(messages=iter(()), structured=iter([answer]))
    scene, concepts, tokens = LLMDecomposer(llm).plan("a brown dog in a green scarf on the left, watercolour")
    [dog] = scene.objects
    assert (dog.id, dog.noun, dog.attributes, dog.cell) == ("o1", "dog", {"colour": "brown"}, "left")
    assert [d.text for d in dog.details] == ["the dog wears a green scarf"]
    assert [c.object_id for c in concepts] == ["o1", "o1", "o1", "o1", None] and tokens == 100


def test_a_name_of_several_words_stays_the_objects_name():
    concepts = [Concept(id="c1", text="a boston bull"), Concept(id="c2", text="a large dog")]
    scene, tagged = objects_of_concepts(concepts)
    assert [(o.noun, o.attributes) for o in scene.objects] == [("boston bull", {}), ("dog", {"size": "large"})]
    revised = revise_turn(RuleDecomposer(), scene, tagged, "make the bull brown")
    assert revised.applied is not None and revised.applied.prompt == "a brown boston bull and a large dog"
    assert revised.applied.concepts[0].text == "a boston bull"  # unchanged: kept as first written


def test_concepts_from_before_object_ids_get_a_scene_with_their_ids_and_verdicts():
    old = [
        Concept(id="c1", text="a heart", verdict="satisfied"),
        Concept(id="c2", text="a red heart", kind="attribute", depends_on=["c1"], verdict="missing"),
    ]
    scene, tagged = objects_of_concepts(old, MINI)
    assert [(o.noun, o.attributes) for o in scene.objects] == [("heart", {"colour": "red"})]
    assert [(c.id, c.verdict, c.object_id, c.attribute) for c in tagged] == [
        ("c1", "satisfied", "o1", None),
        ("c2", "missing", "o1", "colour"),
    ]


# ----------------------------------------------------------------------------- each kind of change


def test_a_recolour_replaces_only_the_colour_and_keeps_the_other_verdicts():
    _, _, revised = turn("a large blue circle", "make the circle red")
    applied = revised.applied
    assert applied is not None and applied.scene.objects[0].attributes == {"size": "large", "colour": "red"}
    assert applied.prompt == "a large red circle"
    assert [(c.id, c.text, c.verdict) for c in applied.concepts] == [
        ("c1", "a circle", "satisfied"),
        ("c2", "a large circle", "satisfied"),
        ("c4", "a red circle", "pending"),
    ]
    assert applied.concepts[2].depends_on == ["c1"] and applied.concepts[2].attribute == "colour"
    assert not any("blue" in t for t in texts(applied.concepts))
    # "make the hourglass large" keeps its colour the same way.
    _, _, revised = turn("a small purple hourglass", "make the hourglass large")
    assert revised.applied is not None
    assert [(c.id, c.text, c.verdict) for c in revised.applied.concepts] == [
        ("c1", "an hourglass", "satisfied"),
        ("c4", "a large hourglass", "pending"),
        ("c3", "a purple hourglass", "satisfied"),
    ]


def test_a_recolour_leaves_no_contradicting_concept():
    _, _, revised = turn("a cyan arrow at the top and a red star on the left", "make the arrow yellow")
    assert revised.applied is not None
    arrow = [c.text for c in revised.applied.concepts if c.object_id == "o1"]
    assert arrow == ["an arrow", "a yellow arrow", "an arrow at the top"]
    assert not any("cyan" in t for t in texts(revised.applied.concepts))


def test_a_move_to_a_cell_changes_the_place_and_makes_no_object_of_place_words():
    _, _, revised = turn("a green triangle at the top", "move the triangle to the bottom")
    [move] = revised.understanding.changes
    assert isinstance(move, Move) and (move.target.id, move.cell) == ("o1", "bottom")
    applied = revised.applied
    assert applied is not None and applied.prompt == "a green triangle at the bottom"
    assert [(c.text, c.kind, c.verdict) for c in applied.concepts] == [
        ("a triangle", "object", "satisfied"),
        ("a green triangle", "attribute", "satisfied"),
        ("a triangle at the bottom", "relation", "pending"),
    ]
    assert applied.concepts[0].box == CELL_BOXES["bottom"]  # the object's planned box follows it


def test_the_issues_conversation_is_understood_turn_by_turn():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    revised = revise_turn(reader, scene, judged(concepts), "make the heart red and move the ring to the bottom left")
    applied = revised.applied
    assert applied is not None and len(revised.understanding.changes) == 2
    assert [(o.noun, o.attributes, o.cell) for o in applied.scene.objects] == [
        ("heart", {"size": "large", "colour": "red"}, "centre"),
        ("ring", {"size": "small", "colour": "yellow"}, "bottom left"),
    ]
    assert not any(t.startswith(("a bottom", "a left")) for t in texts(applied.concepts))
    assert applied.prompt == "a large red heart in the centre and a small yellow ring in the bottom left"
    later = revise_turn(reader, applied.scene, applied.concepts, "add a green star in the top right")
    assert later.applied is not None
    assert [(o.id, o.noun, o.cell) for o in later.applied.scene.objects][-1] == ("o3", "star", "top right")


def test_a_move_relative_to_another_object_is_a_relation_to_its_id():
    _, _, revised = turn("a red star on the left and a blue ring at the bottom", "move the star above the ring")
    applied = revised.applied
    assert applied is not None
    star = applied.scene.objects[0]
    assert (star.cell, star.relation, star.relative_to) == (None, "above", "o2")
    assert "a star above a blue ring" in texts(applied.concepts)
    assert applied.prompt == "a red star above a blue ring at the bottom"


def test_an_add_appends_new_objects_and_keeps_every_old_concept():
    _, concepts, revised = turn("a red heart", "also add a large cyan cross at the top and a small star")
    applied = revised.applied
    assert applied is not None
    assert [(o.id, o.noun, o.attributes, o.cell) for o in applied.scene.objects] == [
        ("o1", "heart", {"colour": "red"}, None),
        ("o2", "cross", {"size": "large", "colour": "cyan"}, "top"),
        ("o3", "star", {"size": "small"}, None),
    ]
    assert applied.concepts[: len(concepts)] == concepts
    assert all(c.verdict == "pending" for c in applied.concepts[len(concepts) :])
    assert applied.prompt == "a red heart, a large cyan cross at the top and a small star"


def test_a_remove_makes_an_absent_concept_where_the_object_was_seen():
    reader = mini()
    scene, concepts, _ = reader.plan("a red heart on the left and a blue square")
    square = next(c for c in concepts if c.text == "a square")
    seen = {square.id: CELL_BOXES["bottom right"]}  # where the critic saw the square on the best image
    revised = revise_turn(reader, scene, judged(concepts), "remove the square", seen=seen)
    applied = revised.applied
    assert applied is not None and [o.noun for o in applied.scene.objects] == ["heart"]
    assert applied.prompt == "a red heart on the left"
    absent = applied.concepts[-1]
    assert (absent.kind, absent.text, absent.object_id, absent.box) == (
        "absent",
        "no blue square",
        "o2",
        CELL_BOXES["bottom right"],
    )
    assert absent.verdict == "pending" and absent.depends_on == []
    assert texts(applied.concepts)[:-1] == ["a heart", "a red heart", "a heart on the left"]
    # Later turns keep the absence; adding the same object back ends it.
    again = revise_turn(reader, applied.scene, applied.concepts, "make the heart green")
    assert again.applied is not None and again.applied.concepts[-1].id == absent.id
    back = revise_turn(reader, applied.scene, applied.concepts, "add a blue square")
    assert back.applied is not None and not any(c.kind == "absent" for c in back.applied.concepts)


def test_a_replace_puts_the_new_object_in_the_old_ones_place():
    _, _, revised = turn(
        "a red square on the left and a star at the top", "replace the square with a large yellow ring"
    )
    applied = revised.applied
    assert applied is not None
    assert [(o.id, o.noun, o.attributes, o.cell) for o in applied.scene.objects] == [
        ("o3", "ring", {"size": "large", "colour": "yellow"}, "left"),
        ("o2", "star", {}, "top"),
    ]
    assert applied.prompt == "a large yellow ring on the left and a star at the top"
    assert [(c.kind, c.text, c.box) for c in applied.concepts if c.kind == "absent"] == [
        ("absent", "no red square", CELL_BOXES["left"])
    ]


def test_undo_returns_to_the_previous_turns_objects_and_is_refused_with_none():
    reader = mini()
    before, concepts, _ = reader.plan("a blue heart")
    first = revise_turn(reader, before, judged(concepts), "make the heart red")
    assert first.applied is not None
    undone = revise_turn(reader, first.applied.scene, first.applied.concepts, "undo the last change", previous=before)
    assert undone.applied is not None and isinstance(undone.understanding.changes[0], Undo)
    assert undone.applied.scene == before and undone.applied.prompt == "a blue heart"
    assert "a blue heart" in texts(undone.applied.concepts)
    refused = revise_turn(reader, first.applied.scene, first.applied.concepts, "undo")
    assert refused.applied is None and refused.understanding.refusals[0].clause == "undo"


def _assert_revised(
    reader: RuleDecomposer, scene: ScenePlan, concepts: list[Concept], cases: tuple[tuple[str, str], ...]
) -> None:
    """Each (message, prompt): the message, read against the scene, revises it to that prompt."""
    for message, prompt in cases:
        revised = revise_turn(reader, scene, concepts, message)
        assert revised.applied is not None and revised.applied.prompt == prompt, message


def test_other_ways_of_saying_a_change():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    _assert_revised(
        reader,
        scene,
        concepts,
        (
            ("the heart should be red", "a large red heart in the centre and a small yellow ring at the top"),
            ("make everything red", "a large red heart in the centre and a small red ring at the top"),
            ("make the ring a little bigger", "a large blue heart in the centre and a large yellow ring at the top"),
            (
                "change the colour of the ring to cyan",
                "a large blue heart in the centre and a small cyan ring at the top",
            ),
            ("turn the ring into a red circle", "a large blue heart in the centre and a red circle at the top"),
            ("put the heart below the ring", "a large blue heart below a small yellow ring at the top"),
            ("Please make the heart red.", "a large red heart in the centre and a small yellow ring at the top"),
        ),
    )
    # Removing every object would leave nothing to draw: refused, quoting the clause.
    revised = revise_turn(reader, scene, concepts, "remove the heart and the ring")
    assert revised.applied is None and "nothing to draw" in revised.understanding.message


def test_polite_wishes_complaints_and_side_words_are_read_or_refused_never_guessed():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    _assert_revised(
        reader,
        scene,
        concepts,
        (
            ("can you make the heart red please", "a large red heart in the centre and a small yellow ring at the top"),
            ("actually, make the ring green too", "a large blue heart in the centre and a small green ring at the top"),
            (
                "I want a green star in the top right",
                "a large blue heart in the centre, a small yellow ring at the top and a green star in the top right",
            ),
            (
                "there should also be a cyan cross at the bottom",
                "a large blue heart in the centre, a small yellow ring at the top and a cyan cross at the bottom",
            ),
            ("i'd like the heart yellow", "a large yellow heart in the centre and a small yellow ring at the top"),
            ("the ring is too small", "a large blue heart in the centre and a large yellow ring at the top"),
            ("no more ring", "a large blue heart in the centre"),
            ("take the ring out", "a large blue heart in the centre"),
            ("change the ring's colour to green", "a large blue heart in the centre and a small green ring at the top"),
            ("set the heart to red", "a large red heart in the centre and a small yellow ring at the top"),
            ("recolour the ring to be purple", "a large blue heart in the centre and a small purple ring at the top"),
            ("can the ring be red?", "a large blue heart in the centre and a small red ring at the top"),
            ("make the heart and the ring red", "a large red heart in the centre and a small red ring at the top"),
            ("increase the size of the ring", "a large blue heart in the centre and a large yellow ring at the top"),
            ("i want the ring at the bottom", "a large blue heart in the centre and a small yellow ring at the bottom"),
            ("make heart red", "a large red heart in the centre and a small yellow ring at the top"),
            (
                "add a second ring in the bottom right",
                "a large blue heart in the centre, a small yellow ring at the top and a ring in the bottom right",
            ),
        ),
    )
    # 'next to' names no side: asked, not guessed; an object cannot be moved onto another one in a grid world.
    for message, why in (
        ("put the ring next to the heart", "which side"),
        ("move the ring to the centre", "the centre already holds a large blue heart"),
        ("add a red star in the centre", "the centre already holds a large blue heart"),
    ):
        revised = revise_turn(reader, scene, concepts, message)
        assert revised.applied is None and why in revised.understanding.message, message


def test_a_bare_direction_moves_one_cell_from_where_the_object_is():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    _assert_revised(
        reader,
        scene,
        concepts,
        (
            ("move the ring left", "a large blue heart in the centre and a small yellow ring in the top left"),
            ("move the heart down a bit", "a large blue heart at the bottom and a small yellow ring at the top"),
            ("shift the heart one cell right", "a large blue heart on the right and a small yellow ring at the top"),
            # 'to the left' is the cell on the left, not a step; nor is a cell whose name ends in a direction
            ("move the heart to the left", "a large blue heart on the left and a small yellow ring at the top"),
            (
                "put the heart in the bottom left",
                "a large blue heart in the bottom left and a small yellow ring at the top",
            ),
            ("put the ring on the right", "a large blue heart in the centre and a small yellow ring on the right"),
        ),
    )
    revised = revise_turn(reader, scene, concepts, "move the ring up")
    assert revised.applied is None and "already at the top edge" in revised.understanding.message


def test_it_in_a_later_message_is_the_object_the_last_message_spoke_of():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    first = revise_turn(reader, scene, concepts, "make it red")
    assert first.applied is None and "which object 'it' is" in first.understanding.message
    added = revise_turn(reader, scene, concepts, "add a green star in the top right")
    assert added.applied is not None
    star = added.applied.scene.focus
    assert [added.applied.scene.object(i).noun for i in star] == ["star"]
    later = revise_turn(
        reader, added.applied.scene, judged(added.applied.concepts), "make it purple, then move it down"
    )
    assert later.applied is not None
    assert later.applied.prompt.endswith("a purple star on the right")
    assert later.applied.scene.focus == star  # still the star for the message after
    # A removed object is no longer 'it'.
    gone = revise_turn(reader, later.applied.scene, judged(later.applied.concepts), "remove the star")
    assert gone.applied is not None and gone.applied.scene.focus == []


def test_remove_it_removes_the_object_the_last_message_spoke_of():
    reader = mini()
    scene, concepts, _ = reader.plan("a blue ring and a red star on the left")
    added = revise_turn(reader, scene, concepts, "add a large red heart at the top")
    assert added.applied is not None
    for message in ("remove it", "take it out", "delete that"):
        gone = revise_turn(reader, added.applied.scene, judged(added.applied.concepts), message)
        assert gone.applied is not None, (message, gone.understanding.message)
        assert gone.applied.prompt == "a blue ring and a red star on the left", message
    # With nothing spoken of, 'it' is still asked about, not guessed.
    unclear = revise_turn(reader, scene, concepts, "remove it")
    assert unclear.applied is None and "which object 'it' is" in unclear.understanding.message


def test_a_bare_direction_after_an_object_named_by_its_place():
    reader = mini()
    scene, concepts, _ = reader.plan("a red square on the left and a blue square on the right")
    _assert_revised(
        reader,
        scene,
        concepts,
        (
            ("move the square on the left down", "a red square in the bottom left and a blue square on the right"),
            ("move the square on the right up a bit", "a red square on the left and a blue square in the top right"),
            # a cell that reads whole is still a cell, not a step
            ("move the square on the left to the top", "a red square at the top and a blue square on the right"),
            ("put the blue square in the bottom left", "a red square on the left and a blue square in the bottom left"),
        ),
    )


def test_apply_change_needs_a_checked_change():
    scene, _, _ = mini().plan("a blue heart")
    with pytest.raises(ValueError, match="checked change"):
        apply_change(scene, SetAttribute(target=ObjectRef(noun="heart"), value="red"))


# ----------------------------------------------------------------------------- references and refusals


def test_two_squares_are_addressed_by_place_or_attribute_and_otherwise_asked_which():
    reader = mini()
    scene, concepts, _ = reader.plan("a red square on the left and a blue square on the right")
    for words in ("the square on the left", "the left square", "the red square"):
        [change] = reader.understand(f"make {words} green", scene).changes
        assert isinstance(change, SetAttribute) and change.target.id == "o1", words
    revised = revise_turn(reader, scene, concepts, "make the square green")
    assert revised.applied is None
    [refusal] = revised.understanding.refusals
    assert refusal.clause == "make the square green" and refusal.candidates == ["o1", "o2"]
    assert (
        refusal.reason
        == "which square do you mean: the red square on the left (o1) or the blue square on the right (o2)?"
    )
    # A square placed by a relation is found where the critic saw it.
    scene, concepts, _ = reader.plan("a red square to the left of a ring and a blue square at the bottom")
    seen = {concepts[0].id: CELL_BOXES["top left"]}
    [change] = revise_turn(
        reader, scene, concepts, "remove the square in the top left", seen=seen
    ).understanding.changes
    assert isinstance(change, Remove) and change.target.id == "o1"


def test_refusals_quote_the_clause_and_leave_the_thread_untouched():
    reader = mini()
    scene, concepts, _ = reader.plan("a blue circle")
    for message, clause, why in (
        ("add a dog", "add a dog", "'dog'"),
        ("make the circle pink", "make the circle pink", "'pink'"),
        ("remove the star", "remove the star", "no star"),
        ("make the circle red and sing a song", "sing a song", "no change I can make"),
        ("move the circle somewhere nice", "move the circle somewhere nice", "no change I can make"),
        ("a red heart", "a red heart", "no change I can make"),
    ):
        revised = revise_turn(reader, scene, concepts, message)
        assert revised.applied is None, message
        assert [r.clause for r in revised.understanding.refusals] == [clause], message
        assert why in revised.understanding.refusals[0].reason, message
        assert f'"{clause}"' in revised.understanding.message


def test_an_open_vocabulary_refuses_only_what_does_not_parse():
    reader = RuleDecomposer()
    assert vocabulary_for("open") is OPEN_VOCABULARY and vocabulary_for("miniworld").closed
    assert PROFILES["mini"].vocabulary == "miniworld" and PROFILES["sdxl"].vocabulary == "open"
    _, _, revised = turn("a dog with a red scarf, a lighthouse", "make the scarf green", reader)
    assert revised.applied is not None and revised.applied.prompt == "a dog, a green scarf and a lighthouse"
    _, _, revised = turn("a dog", "add a purple unicorn and move the dog to the beach", reader)
    applied = revised.applied
    assert applied is not None
    assert [(o.noun, o.attributes, o.place) for o in applied.scene.objects] == [
        ("dog", {}, "at the beach"),
        ("unicorn", {"colour": "purple"}, None),
    ]
    _, _, revised = turn("a dog", "make the dog fluffy", reader)
    assert revised.applied is not None and revised.applied.scene.objects[0].attributes == {"fluffy": "fluffy"}
    _, _, revised = turn("a dog", "dance with the dog", reader)
    assert revised.applied is None and revised.understanding.refusals[0].clause == "dance with the dog"


# ----------------------------------------------------------------------------- the LLM path


def _llm(*answers) -> ScriptedChatModel:
    return ScriptedChatModel(messages=iter(()), structured=iter(answers))


def test_the_llm_reader_returns_the_same_changes_applied_by_the_same_function():
    reader = mini()
    scene, concepts, _ = reader.plan("a large blue heart in the centre and a small yellow ring at the top")
    message = "make the heart red and move the ring to the bottom left"
    answer = {
        "changes": [
            {
                "op": "set_attribute",
                "clause": "make the heart red",
                "target": {"id": "o1"},
                "kind": "colour",
                "value": "red",
            },
            {
                "op": "move",
                "clause": "move the ring to the bottom left",
                "target": {"noun": "ring"},
                "cell": "bottom left",
            },
        ]
    }
    llm = _llm(answer)
    revised = revise_turn(LLMDecomposer(llm, vocabulary=MINI), scene, concepts, message)
    by_rules = revise_turn(reader, scene, concepts, message)
    assert revised.applied is not None and revised.applied == by_rules.applied
    assert revised.understanding.tokens == 100
    prompt = llm.seen[0][0]
    assert isinstance(prompt, HumanMessage) and "- o1: a large blue heart in the centre" in prompt.content
    assert message in prompt.content and "objects: arrow" in prompt.content


def test_the_llm_readers_unknown_or_malformed_changes_are_refused():
    scene, _, _ = mini().plan("a blue heart")
    answer = {
        "changes": [
            {"op": "remove", "clause": "remove the dragon", "target": {"id": "o9"}},
            {"op": "set_attribute", "clause": "make it pink", "target": {"id": "o1"}, "value": "pink"},
            {"op": "add", "clause": "add a dog", "objects": [{"noun": "dog"}]},
            {
                "op": "move",
                "clause": "move it near",
                "target": {"id": "o1"},
                "relation": "near",
                "relative_to": {"id": "o1"},
            },
        ],
        "refusals": [{"clause": "and sing", "reason": "not an image change"}],
    }
    understanding = LLMDecomposer(_llm(answer), vocabulary=MINI).understand("...", scene)
    assert not understanding.understood and understanding.changes == []
    assert [r.clause for r in understanding.refusals] == [
        "and sing",
        "remove the dragon",
        "make it pink",
        "add a dog",
        "move it near",
    ]
    malformed = {"changes": [{"op": "explode", "target": {"id": "o1"}}]}
    understanding = LLMDecomposer(_llm(malformed, None), retries=1, vocabulary=MINI).understand("boom", scene)
    [refusal] = understanding.refusals
    assert refusal.clause == "boom" and "could not be read as changes" in refusal.reason


def test_check_changes_sees_the_scene_that_earlier_changes_made():
    scene, _, _ = mini().plan("a blue heart")
    understanding = check_changes(
        [
            Add(objects=[NewObject(noun="star", attributes=["small"], cell="top")]),
            SetAttribute(target=ObjectRef(pronoun=True), value="red"),
            Replace(target=ObjectRef(noun="heart"), by=NewObject(noun="ring")),
        ],
        scene,
        MINI,
    )
    assert understanding.understood
    applied = apply_changes(scene, [], understanding.changes, vocabulary=MINI)
    assert render_prompt(applied.scene) == "a ring and a small red star at the top"


# ----------------------------------------------------------------------------- the critics and absent objects


class _ColourEmbedder:
    """A CLIP stand-in: a text is its colour word's RGB direction; an image its drawn pixels' mean colour (a blank
    one points elsewhere). So 'a red square' matches a cell with something red drawn, and nothing else."""

    COLOURS: ClassVar[dict[str, tuple[int, int, int]]] = {
        "red": (220, 30, 30),
        "blue": (30, 70, 225),
        "green": (30, 160, 50),
    }

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            rgb = next((c for w, c in self.COLOURS.items() if w in text.split()), (0, 0, 0))
            rows.append([*rgb, 0.0 if any(rgb) else 1.0])
        return self._unit(rows)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        rows = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3)
            drawn = pixels[np.abs(pixels - 255).sum(1) > 60]
            rows.append([*drawn.mean(0), 0.0] if len(drawn) else [0.0, 0.0, 0.0, 1.0])
        return self._unit(rows)

    @staticmethod
    def _unit(rows) -> np.ndarray:
        array = np.asarray(rows, dtype=float)
        return array / np.linalg.norm(array, axis=1, keepdims=True)


def _image(*squares: tuple[str, str]) -> Image.Image:
    """A 48 px white image with a square of each (colour, cell)."""
    image = Image.new("RGB", (48, 48), "white")
    for colour, cell in squares:
        left, top, _, _ = CELL_BOXES[cell].pixels(48, 48)
        image.paste(_ColourEmbedder.COLOURS[colour], (left + 3, top + 3, left + 13, top + 13))
    return image


def test_the_clip_judge_holds_an_absent_object_when_it_is_gone():
    judge = ClipJudge(_ColourEmbedder(), threshold=0.9)  # type: ignore[arg-type]
    absent = Concept(id="c9", kind="absent", text="no red square", box=CELL_BOXES["left"])
    still_there = judge.critique(_image(("red", "left"), ("blue", "right")), [absent]).verdicts[0]
    assert not still_there.satisfied and still_there.score < 0.5 and still_there.caption is None
    assert "seen in left" in still_there.evidence
    gone = judge.critique(_image(("blue", "right")), [absent]).verdicts[0]
    assert gone.satisfied and gone.score > 0.5 and gone.box is None
    # With no other square asked for, it must be gone from everywhere: drawn elsewhere, it is still there.
    moved = judge.critique(_image(("red", "bottom")), [absent]).verdicts[0]
    assert not moved.satisfied
    # With another square asked for, only where it was counts.
    other = [Concept(id="c1", text="a square"), absent]
    assert judge.critique(_image(("red", "bottom")), other).verdicts[1].satisfied


def test_the_vlm_judge_is_told_what_must_be_gone_and_never_retrieves_for_it():
    absent = Concept(id="c2", kind="absent", text="no red square", box=CELL_BOXES["left"])
    concepts = [Concept(id="c1", text="a blue ring"), absent]
    answer = VLMJudgement(
        verdicts=[
            ConceptVerdict(concept_id="c1", satisfied=True, score=0.9),
            ConceptVerdict(concept_id="c2", satisfied=False, score=0.1, caption="a red square"),
        ]
    )
    llm = _llm(answer)
    critique = VLMJudge(llm).critique(Image.new("RGB", (8, 8)), concepts, "a blue ring")
    assert [(v.satisfied, v.caption) for v in critique.verdicts] == [(True, None), (False, None)]
    text = llm.seen[0][0].content[0]["text"]
    assert "c2 (absent): no red square: satisfied only if the image does NOT show this object where it was" in text
    assert "x 0.00-0.33 and y 0.33-0.67" in text


def test_the_scene_model_round_trips_as_json():
    _, _, revised = turn("a red square on the left and a blue square on the right", "remove the blue square")
    assert revised.applied is not None
    again = ScenePlan.model_validate_json(revised.applied.scene.model_dump_json())
    assert again == revised.applied.scene and again.next_object_id() == "o3"


class _ShapeEmbedder(_ColourEmbedder):
    """The colour stand-in where a shape word without a colour word points to its shape's colour: a circle is what
    red looks like, a square what blue does."""

    SHAPE_COLOURS: ClassVar[dict[str, str]] = {"circle": "red", "square": "blue"}

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return super().embed_texts(
            [
                text if any(w in self.COLOURS for w in text.split()) else self.SHAPE_COLOURS[text.split()[-1]]
                for text in texts
            ]
        )


def test_the_checked_stop_looks_at_each_object_and_attribute_in_the_objects_own_cell():
    rivals = {"object": ("circle", "square"), "colour": ("red", "blue", "green")}
    judge = ClipJudge(_ShapeEmbedder(), threshold=0.9, rivals=rivals, stop_margin=0.2)  # type: ignore[arg-type]
    image = _image(("blue", "left"), ("red", "right"))
    square = Concept(id="c1", text="a blue square")
    red = Concept(id="c2", kind="attribute", text="a red square", depends_on=["c1"])
    # Judged alone, 'a red square' finds red in the right cell and passes, though the square is blue.
    assert judge.critique(image, [square, red]).verdicts[1].satisfied
    passed = [ConceptVerdict(concept_id=c, satisfied=True, score=0.9) for c in ("c1", "c2")]
    checked = judge.verify(image, [square, red], passed)
    assert checked[0] == passed[0]  # the blue square reads as a square in its cell
    assert not checked[1].satisfied and checked[1].score < 0.5
    assert "not in its object's cell (left)" in checked[1].evidence
    # A 'square' drawn more red than blue reads more as a circle in its own cell: not confirmed.
    reddish = Image.new("RGB", (48, 48), "white")
    reddish.paste((200, 30, 110), (3, 3, 13, 13))
    plain = Concept(id="c1", text="a square")
    [doubted] = judge.verify(reddish, [plain], [passed[0]])
    assert not doubted.satisfied and "reads too much as a circle" in doubted.evidence
    # One that reads more as a square than as a circle, but by less than the stop's margin, is not confirmed either.
    close = Image.new("RGB", (48, 48), "white")
    close.paste((170, 40, 200), (3, 3, 13, 13))
    [near] = judge.verify(close, [plain], [passed[0]])
    assert not near.satisfied and "reads too much as a circle" in near.evidence
    judge.stop_margin = 0.0
    assert judge.verify(close, [plain], [passed[0]]) == [passed[0]]
    # A square of a blue that is nearly as red passes 'a blue square' (over a lower threshold) but reads more as red.
    lenient = ClipJudge(_ShapeEmbedder(), threshold=0.5, rivals=rivals)  # type: ignore[arg-type]
    purple = Image.new("RGB", (48, 48), "white")
    purple.paste((150, 30, 150), (3, 3, 13, 13))
    blue = Concept(id="c2", kind="attribute", text="a blue square", depends_on=["c1"])
    _, colour = lenient.verify(purple, [plain, blue], passed)
    assert not colour.satisfied and "reads more as a red square" in colour.evidence
    # Without rivals (an open world) an object is not checked against other nouns.
    assert ClipJudge(_ShapeEmbedder(), threshold=0.9).verify(reddish, [plain], [passed[0]]) == [passed[0]]  # type: ignore[arg-type]
