"""The loop's pure rules (graphs/rules.py) on small hand-made states: no models, no files, no graphs.

Both policies decide with these functions, so each rule is pinned here by exact values, one behaviour per test.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

import imagerag.graphs.state as state_module
from imagerag.graphs.rules import (
    absent_regions,
    best_candidate,
    best_of_turn,
    claims_stop,
    clock,
    concepts_from_best,
    drawn_from_text,
    edit_regions,
    enforce_dependencies,
    object_phrase,
    query_for,
    rank_key,
    stop_reason,
    targets_for_round,
)
from imagerag.graphs.state import Budget, RunState, Usage
from imagerag.tools.types import Box, Candidate, Concept, ConceptVerdict, Edit, EditRegion, RetrievalHit, Verdict

# Two objects (c1 a fox, c2 a tree) and one attribute of each (c3 red -> c1, c4 tall -> c2).
FOX, TREE, RED, TALL = "c1", "c2", "c3", "c4"


def concept(cid: str, parent: str | None = None, verdict: Verdict = "pending", attempts: int = 0) -> Concept:
    return Concept(
        id=cid,
        text=f"concept {cid}",
        kind="attribute" if parent else "object",
        verdict=verdict,
        attempts=attempts,
        depends_on=[parent] if parent else [],
    )


def scene(verdicts: dict[str, Verdict] | None = None) -> list[Concept]:
    """The fox-and-tree concepts, with verdicts by id (pending when not given)."""
    verdicts = verdicts or {}
    return [
        concept(FOX, verdict=verdicts.get(FOX, "pending")),
        concept(TREE, verdict=verdicts.get(TREE, "pending")),
        concept(RED, FOX, verdict=verdicts.get(RED, "pending")),
        concept(TALL, TREE, verdict=verdicts.get(TALL, "pending")),
    ]


def verdict(cid: str, satisfied: bool, score: float | None = None, evidence: str = "") -> ConceptVerdict:
    score = (0.9 if satisfied else 0.1) if score is None else score
    return ConceptVerdict(concept_id=cid, satisfied=satisfied, score=score, evidence=evidence)


def hit() -> RetrievalHit:
    return RetrievalHit(id="ref", caption="a reference", similarity=0.5, source="refs/ref.png")


def candidate(
    image_id: str,
    satisfied: set[str] | dict[str, float],
    *,
    judged_ids: tuple[str, ...] = (FOX, TREE, RED, TALL),
    round: int = 1,
    turn: int = 1,
    references: bool = False,
    default_score: float | None = None,
) -> Candidate:
    """An image judged on `judged_ids`: those in `satisfied` (a set, or ids with their scores) pass."""
    scores = satisfied if isinstance(satisfied, dict) else {}
    verdicts = [verdict(cid, cid in satisfied, scores.get(cid, default_score)) for cid in judged_ids]
    return Candidate(
        image_id=image_id,
        round=round,
        turn=turn,
        prompt="a red fox and a tall tree",
        seed=round,
        references=[hit()] if references else [],
        verdicts=verdicts,
    )


def unjudged(image_id: str, round: int = 1) -> Candidate:
    return Candidate(image_id=image_id, round=round, prompt="a red fox and a tall tree", seed=0)


def run_state(concepts: list[Concept], candidates: Sequence[Candidate] = (), **fields: Any) -> RunState:
    return RunState(message="a red fox and a tall tree", concepts=concepts, candidates=list(candidates), **fields)


def best_id(candidates: list[Candidate], concepts: list[Concept]) -> str | None:
    best = best_candidate(candidates, concepts)
    return best.image_id if best else None


# --- drawn_from_text -------------------------------------------------------------------------------------------------


def test_drawn_from_text_counts_only_images_drawn_without_references():
    text_only = candidate("t", {FOX, RED})
    with_refs = candidate("r", {TREE, TALL}, references=True)
    assert drawn_from_text([text_only, with_refs], scene()) == {FOX, RED}


def test_drawn_from_text_ignores_verdicts_that_are_not_satisfied():
    assert drawn_from_text([candidate("t", set())], scene()) == set()
    assert drawn_from_text([], scene()) == set()


def test_drawn_from_text_needs_more_images_showing_a_concept_than_missing_it():
    lucky, missed = candidate("a", {FOX, RED, TREE}), candidate("b", {FOX, RED}, round=2)
    assert drawn_from_text([lucky], scene()) == {FOX, RED, TREE}
    assert drawn_from_text([lucky, missed], scene()) == {FOX, RED}


def test_an_edit_from_text_shows_only_what_it_redrew():
    # The tree was drawn from a reference; an edit without one redrew the fox and kept the tree: only the fox (with
    # its attribute) was drawn from text.
    region = EditRegion(box=Box(x0=0.0, y0=0.0, x1=0.5, y1=0.5), text="a red fox", concept_ids=[FOX])
    edit = Edit(source="r", regions=[region], exact_outside=True)
    with_refs = candidate("r", {TREE, TALL}, references=True)
    edited = candidate("e", {FOX, RED, TREE, TALL}, round=2).model_copy(update={"edit": edit})
    assert drawn_from_text([with_refs, edited], scene()) == {FOX, RED}


# --- rank_key / best_candidate ---------------------------------------------------------------------------------------


def test_rank_key_orders_roots_then_hard_roots_then_count_then_strays_then_score_then_earlier_round():
    image = candidate("x", {FOX: 1.0, RED: 0.8}, default_score=0.1, round=3)
    image = image.model_copy(update={"strays": [Box(x0=0.0, y0=0.0, x1=1 / 3, y1=1 / 3)]})
    key = rank_key(image, roots=frozenset({FOX, TREE}), hard=frozenset({FOX}))
    assert key == (1, 1, 2, -1, pytest.approx((1.0 + 0.1 + 0.8 + 0.1) / 4), -3)


def test_an_image_with_an_object_nobody_asked_for_ranks_below_one_without_and_does_not_end_the_run():
    everything = {FOX, TREE, RED, TALL}
    stray = Box(x0=0.0, y0=0.0, x1=1 / 3, y1=1 / 3)
    strayed = candidate("a", {c: 0.99 for c in everything}).model_copy(update={"strays": [stray]})
    clean = candidate("b", {c: 0.6 for c in everything}, round=2)
    assert best_id([strayed, clean], scene()) == "b"
    done = scene(dict.fromkeys(everything, "satisfied"))
    assert stop_reason(run_state(done, [strayed], budget=ROOM)) is None
    assert stop_reason(run_state(done, [strayed, clean], budget=ROOM)) == "satisfied"


def test_best_candidate_prefers_more_objects_over_more_attributes():
    both_objects = candidate("objects", {FOX, TREE})
    one_object_two_attributes = candidate("attributes", {FOX, RED, TALL})
    concepts = scene()
    assert best_id([one_object_two_attributes, both_objects], concepts) == "objects"
    assert best_id([both_objects, one_object_two_attributes], concepts) == "objects"


def test_best_candidate_prefers_more_objects_over_an_object_only_references_drew():
    # A third root, a style no text-only image showed: an image with only that hard root still loses to one
    # with two ordinary objects (objects first, hard roots second).
    concepts = [*scene(), concept("c5")]
    text_objects = candidate("objects", {FOX, TREE}, judged_ids=(FOX, TREE, "c5"), round=2)
    ref_style = candidate("style", {"c5"}, judged_ids=(FOX, TREE, "c5"), round=1, references=True)
    assert best_id([ref_style, text_objects], concepts) == "objects"


def test_best_candidate_prefers_the_object_no_text_only_image_showed():
    # With as many objects, the reference-conditioned image showing the tree (which no text-only image drew)
    # beats the text-only fox that has more satisfied concepts, a higher score and an earlier round.
    text_fox = candidate("text-fox", {FOX: 1.0, RED: 1.0}, round=1)
    ref_tree = candidate("ref-tree", {TREE: 0.6}, round=2, references=True)
    assert best_id([text_fox, ref_tree], scene()) == "ref-tree"


def test_best_candidate_prefers_more_satisfied_concepts_when_objects_tie():
    more = candidate("more", {FOX: 0.6, RED: 0.6}, default_score=0.0)
    fewer = candidate("fewer", {FOX: 1.0}, default_score=0.9)
    assert more.score < fewer.score
    assert best_id([fewer, more], scene()) == "more"


def test_best_candidate_prefers_the_higher_mean_score_when_counts_tie():
    low = candidate("low", {FOX: 0.7}, default_score=0.1)
    high = candidate("high", {FOX: 0.95}, default_score=0.1)
    assert best_id([low, high], scene()) == "high"
    assert best_id([high, low], scene()) == "high"


def test_best_candidate_prefers_the_earlier_round_on_a_full_tie():
    late = candidate("late", {FOX}, round=3)
    early = candidate("early", {FOX}, round=1)
    assert best_id([late, early], scene()) == "early"


def test_best_candidate_never_chooses_an_unjudged_image():
    judged_but_poor = candidate("poor", set())
    assert best_id([unjudged("new", round=5), judged_but_poor], scene()) == "poor"
    assert best_candidate([unjudged("a"), unjudged("b")], scene()) is None


def test_best_candidate_of_nothing_is_none():
    assert best_candidate([], scene()) is None


def test_best_of_turn_looks_at_the_current_turn_only():
    old_perfect = candidate("old", {FOX, TREE, RED, TALL}, turn=1)
    new_poor = candidate("new", set(), turn=2)
    state = run_state(scene(), [old_perfect, new_poor], turn=2)
    assert getattr(best_of_turn(state), "image_id", None) == "new"
    assert best_of_turn(run_state(scene(), [old_perfect], turn=2)) is None


# --- enforce_dependencies --------------------------------------------------------------------------------------------


def test_attribute_of_a_missing_object_is_made_unsatisfied_with_capped_score():
    verdicts = [verdict(FOX, False, 0.2, "no fox"), verdict(RED, True, 0.95, "red fur")]
    out = enforce_dependencies(verdicts, scene())
    assert out[0] == verdicts[0]
    assert out[1] == ConceptVerdict(
        concept_id=RED, satisfied=False, score=0.49, evidence="red fur (needs c1, which is missing)"
    )


def test_demoted_attribute_keeps_a_score_already_below_the_cap():
    out = enforce_dependencies([verdict(FOX, False), verdict(RED, True, 0.3, "")], scene())
    assert out[1] == ConceptVerdict(concept_id=RED, satisfied=False, score=0.3, evidence="(needs c1, which is missing)")


def test_enforce_dependencies_returns_the_concepts_order():
    verdicts = [verdict(TALL, True), verdict("c9", True), verdict(RED, False), verdict(TREE, True), verdict(FOX, True)]
    out = enforce_dependencies(verdicts, scene())
    assert [v.concept_id for v in out] == [FOX, TREE, RED, TALL, "c9"]  # unknown ids last
    assert out == [verdicts[4], verdicts[3], verdicts[2], verdicts[0], verdicts[1]]  # nothing else changed


def test_parents_not_judged_or_satisfied_do_not_block():
    not_judged = [verdict(RED, True, 0.8, "red fur")]
    assert enforce_dependencies(not_judged, scene()) == not_judged
    parent_ok = [verdict(FOX, True), verdict(RED, True, 0.8, "red fur")]
    assert enforce_dependencies(parent_ok, scene()) == parent_ok


def test_unsatisfied_attribute_of_a_missing_object_is_left_as_judged():
    verdicts = [verdict(FOX, False), verdict(RED, False, 0.7, "pink fur")]
    assert enforce_dependencies(verdicts, scene()) == verdicts


def test_demotion_cascades_down_a_chain_in_prompt_order():
    # c1 an object, c2 an attribute of it, c3 a detail of that attribute (c3 -> c2 -> c1).
    concepts = [concept("c1"), concept("c2", "c1"), concept("c3", "c2")]
    out = enforce_dependencies([verdict("c1", False), verdict("c2", True), verdict("c3", True)], concepts)
    assert [(v.concept_id, v.satisfied) for v in out] == [("c1", False), ("c2", False), ("c3", False)]
    assert out[2].evidence == "(needs c2, which is missing)"


def test_demotion_cascades_down_a_chain_whatever_the_concept_order():
    # The same chain with the detail listed before the attribute it needs (an LLM planner may number them so):
    # "never satisfied while a concept it depends on is missing" must hold whatever the order.
    concepts = [concept("c1"), concept("c3", "c2"), concept("c2", "c1")]
    out = enforce_dependencies([verdict("c1", False), verdict("c2", True), verdict("c3", True)], concepts)
    assert {v.concept_id: v.satisfied for v in out} == {"c1": False, "c2": False, "c3": False}


# --- claims_stop -----------------------------------------------------------------------------------------------------


def test_an_image_claims_the_stop_only_when_every_concept_is_judged_and_satisfied():
    every = [verdict(c, True) for c in (FOX, TREE, RED, TALL)]
    assert claims_stop(every, scene())
    assert not claims_stop([*every[:3], verdict(TALL, False)], scene())
    assert not claims_stop(every[:3], scene())  # the tall tree not judged yet
    assert not claims_stop([], [])


# --- object_phrase ---------------------------------------------------------------------------------------------------


def test_a_concept_is_retrieved_for_by_its_objects_whole_phrase_without_the_place():
    star = Concept(id="c1", text="a star", kind="object")
    large = Concept(id="c2", text="a large star", kind="attribute", depends_on=["c1"])
    red = Concept(id="c3", text="a red star", kind="attribute", depends_on=["c1"])
    place = Concept(id="c4", text="a star in the top left", kind="relation", depends_on=["c1"])
    style = Concept(id="c5", text="pixel art", kind="style")
    concepts = [star, large, red, place, style]
    assert [object_phrase(c, concepts) for c in concepts] == [*["a large red star"] * 4, None]
    # An object named in several words keeps them; an attribute said another way adds nothing.
    bull = Concept(id="c1", text="a boston bull", kind="object")
    brown = Concept(id="c2", text="a brown boston bull", kind="attribute", depends_on=["c1"])
    scarf = Concept(id="c3", text="the dog wears a green scarf", kind="attribute", depends_on=["c1"])
    assert object_phrase(scarf, [bull, brown, scarf]) == "a brown boston bull"
    # Place words of an object's own text are not part of what to retrieve.
    left = Concept(id="c1", text="a red heart on the left", kind="object")
    assert object_phrase(left, [left]) == "a red heart"


def test_a_query_the_critic_wrote_comes_first_else_the_objects_whole_phrase():
    star = Concept(id="c1", text="a star", kind="object")
    red = Concept(id="c2", text="a red star", kind="attribute", depends_on=["c1"])
    assert query_for(red, [star, red], "a photo of a red star") == "a photo of a red star"  # a VLM's own query
    assert query_for(red, [star, red], "a red star") == "a red star"  # the CLIP critic repeats the concept
    assert query_for(star, [star, red], None) == "a red star"


# --- concepts_from_best ----------------------------------------------------------------------------------------------


def test_concepts_take_the_verdicts_of_the_best_image_of_the_latest_turn():
    earlier_turn_perfect = candidate("old", {FOX, TREE, RED, TALL}, turn=1)
    latest_poor = candidate("poor", {FOX: 0.8}, turn=2, judged_ids=(FOX, TREE))
    latest_best = candidate("best", {FOX: 0.9, RED: 0.7}, turn=2, judged_ids=(FOX, TREE, RED))
    concepts = scene()
    out = concepts_from_best(concepts, [earlier_turn_perfect, latest_poor, latest_best])
    assert [(c.id, c.verdict, c.score) for c in out] == [
        (FOX, "satisfied", 0.9),
        (TREE, "missing", 0.1),
        (RED, "satisfied", 0.7),
        (TALL, "pending", None),  # no verdict on the chosen image: unchanged
    ]
    assert out[3] is concepts[3]
    assert [c.verdict for c in concepts] == ["pending"] * 4  # the input is not modified


def test_concepts_carry_the_evidence_of_the_chosen_image():
    image = candidate("x", set(), judged_ids=())
    image = image.model_copy(update={"verdicts": [verdict(FOX, True, 0.8, "a fox in the snow")]})
    out = concepts_from_best(scene(), [image])
    assert (out[0].verdict, out[0].score, out[0].evidence) == ("satisfied", 0.8, "a fox in the snow")


def test_concepts_unchanged_when_the_latest_turn_has_no_judged_image():
    concepts = scene()
    judged_earlier = candidate("old", {FOX}, turn=1)
    assert concepts_from_best(concepts, [judged_earlier, unjudged("new").model_copy(update={"turn": 2})]) is concepts
    assert concepts_from_best(concepts, []) is concepts


# --- targets_for_round -----------------------------------------------------------------------------------------------


def test_references_go_to_missing_concepts_that_text_did_not_draw():
    # The red fur was drawn from text once (just not on the best image): it needs another sample, not a reference.
    concepts = scene({FOX: "satisfied", TREE: "missing", RED: "missing", TALL: "missing"})
    state = run_state(concepts, [candidate("t", {FOX, RED})])
    assert [c.id for c in targets_for_round(state, 5)] == [TREE, TALL]


def test_references_keep_what_only_referenced_images_showed_when_text_drew_every_missing_concept():
    concepts = scene({FOX: "satisfied", TREE: "satisfied", RED: "missing", TALL: "satisfied"})
    state = run_state(concepts, [candidate("t", {FOX, RED}), candidate("r", {FOX, TREE, TALL}, references=True)])
    assert [c.id for c in targets_for_round(state, 5)] == [TREE, TALL]


def test_references_go_to_the_missing_when_text_drew_everything():
    concepts = [
        concept(FOX, verdict="satisfied"),
        concept(TREE, verdict="missing"),
        concept(RED, FOX, verdict="missing"),
    ]
    text_images = [
        candidate("t1", {FOX, RED}, judged_ids=(FOX, TREE, RED)),
        candidate("t2", {FOX, TREE}, judged_ids=(FOX, TREE, RED)),
    ]
    state = run_state(concepts, text_images)
    assert [c.id for c in targets_for_round(state, 5)] == [TREE, RED]


def test_targets_order_objects_then_attributes_then_attributes_of_missing_objects_least_tried_first():
    concepts = [
        concept("a_of_missing", "o_tried", verdict="missing"),
        concept("a_tried", "o_ok", verdict="missing", attempts=3),
        concept("o_tried", verdict="missing", attempts=2),
        concept("a_fresh", "o_ok", verdict="missing", attempts=1),
        concept("o_ok", verdict="satisfied"),
        concept("o_fresh", verdict="pending"),
        concept("o_fresh_too", verdict="missing"),
    ]
    state = run_state(concepts)  # no image yet: nothing was drawn from text
    expected = ["o_fresh", "o_fresh_too", "o_tried", "a_fresh", "a_tried", "a_of_missing"]
    assert [c.id for c in targets_for_round(state, 10)] == expected
    assert [c.id for c in targets_for_round(state, 3)] == expected[:3]
    assert [c.id for c in targets_for_round(state, 1)] == ["o_fresh"]


def test_targets_ignore_images_of_earlier_turns():
    # A text-only image of turn 1 drew the tree; in turn 2 (a revised prompt) that says nothing any more.
    concepts = scene({FOX: "satisfied", TREE: "missing", RED: "satisfied", TALL: "satisfied"})
    old = candidate("old", {TREE}, turn=1)
    new = candidate("new", {FOX, RED, TALL}, turn=2, references=True)
    state = run_state(concepts, [old, new], turn=2)
    assert [c.id for c in targets_for_round(state, 2)] == [TREE]


# --- clock / stop_reason ---------------------------------------------------------------------------------------------


@pytest.fixture
def frozen_now(monkeypatch) -> float:
    """RunState.elapsed() reads time.time() through graphs.state; pin it so seconds are exact."""
    now = 1_000_000.0
    monkeypatch.setattr(state_module, "time", SimpleNamespace(time=lambda: now))
    return now


def test_clock_brings_seconds_up_to_now_and_keeps_the_counts(frozen_now):
    usage = Usage(rounds=2, generations=3, critic_calls=3, llm_tokens=40, seconds=1.0)
    state = run_state(scene(), usage=usage, started_at=frozen_now - 12.5)
    assert clock(state) == Usage(rounds=2, generations=3, critic_calls=3, llm_tokens=40, seconds=12.5)
    assert state.usage.seconds == 1.0  # a copy, not a mutation


def test_clock_applies_to_a_given_usage_even_an_all_zero_one(frozen_now):
    state = run_state(scene(), usage=Usage(rounds=4, llm_tokens=99), started_at=frozen_now - 3.0)
    assert clock(state, Usage()) == Usage(seconds=3.0)
    assert clock(state, Usage(generations=2)) == Usage(generations=2, seconds=3.0)


def test_clock_counts_zero_seconds_before_the_run_started():
    assert clock(run_state(scene(), usage=Usage(rounds=1))) == Usage(rounds=1, seconds=0.0)


def test_clock_counts_real_time_since_start():
    state = run_state(scene(), started_at=time.time() - 30.0)
    assert 30.0 <= clock(state).seconds < 3600.0


ROOM = Budget(max_rounds=4, max_generations=6, max_seconds=900.0, max_tokens=1000)


def test_stop_reason_failed_comes_first():
    state = run_state(scene({cid: "satisfied" for cid in (FOX, TREE, RED, TALL)}), status="failed")
    assert stop_reason(state) == "failed"


def test_stop_reason_satisfied_when_every_concept_is_satisfied_even_with_budget_spent():
    satisfied = scene({cid: "satisfied" for cid in (FOX, TREE, RED, TALL)})
    assert stop_reason(run_state(satisfied, budget=ROOM)) == "satisfied"
    assert stop_reason(run_state(satisfied, budget=ROOM, usage=Usage(rounds=4, generations=6))) == "satisfied"


def test_stop_reason_not_satisfied_with_one_concept_left_or_no_concepts():
    almost = scene({cid: "satisfied" for cid in (FOX, TREE, RED)})
    assert stop_reason(run_state(almost, budget=ROOM, started_at=time.time())) is None
    assert stop_reason(run_state([], budget=ROOM, started_at=time.time())) is None


@pytest.mark.parametrize(
    ("usage", "ago", "reason"),
    [
        (Usage(rounds=4, generations=6, llm_tokens=1000), 1000.0, "rounds"),
        (Usage(rounds=3, generations=6, llm_tokens=1000), 1000.0, "generations"),
        (Usage(rounds=3, generations=5, llm_tokens=1000), 900.0, "seconds"),
        (Usage(rounds=3, generations=5, llm_tokens=1000), 899.0, "tokens"),
        (Usage(rounds=3, generations=5, llm_tokens=999), 899.0, None),
    ],
    ids=["rounds-first", "generations-next", "seconds-next", "tokens-last", "room-left"],
)
def test_stop_reason_names_the_first_budget_spent(frozen_now, usage, ago, reason):
    state = run_state(scene(), budget=ROOM, usage=usage, started_at=frozen_now - ago)
    assert stop_reason(state) == (f"budget_exhausted:{reason}" if reason else None)


def test_stop_reason_reads_seconds_from_the_clock_not_the_stored_usage(frozen_now):
    stale = Usage(seconds=0.0)
    assert stop_reason(run_state(scene(), budget=ROOM, usage=stale, started_at=frozen_now - 901.0)) == (
        "budget_exhausted:seconds"
    )
    stored_only = Usage(seconds=5000.0)
    assert stop_reason(run_state(scene(), budget=ROOM, usage=stored_only, started_at=frozen_now - 1.0)) is None


def test_stop_reason_without_seconds_or_token_limits_runs_on(frozen_now):
    unlimited = Budget(max_rounds=4, max_generations=6, max_seconds=None, max_tokens=None)
    usage = Usage(rounds=3, generations=5, llm_tokens=10**9)
    assert stop_reason(run_state(scene(), budget=unlimited, usage=usage, started_at=frozen_now - 1e6)) is None


# --- absent objects ---------------------------------------------------------------------------------------------------

GONE = "c5"  # a tree a message removed: it must be absent, judged where it was


def with_absence(verdicts: dict[str, Verdict]) -> list[Concept]:
    box = Box(x0=0.0, y0=0.0, x1=1 / 3, y1=1 / 3)
    gone = Concept(id=GONE, text="no tree", kind="absent", verdict=verdicts.get(GONE, "pending"), box=box)
    return [*scene(verdicts), gone]


def test_an_absent_object_is_never_a_reference_target():
    concepts = with_absence({FOX: "satisfied", TREE: "satisfied", RED: "satisfied", TALL: "satisfied"})
    best = candidate("a", {FOX, TREE, RED, TALL}, judged_ids=(FOX, TREE, RED, TALL, GONE))
    assert targets_for_round(run_state(concepts, [best]), limit=3) == []


def test_an_absent_object_still_seen_is_cleared_where_it_was_and_nothing_else_is_redrawn():
    concepts = with_absence({FOX: "satisfied", TREE: "satisfied", RED: "satisfied", TALL: "satisfied"})
    best = candidate("a", {FOX, TREE, RED, TALL}, judged_ids=(FOX, TREE, RED, TALL, GONE))
    [region] = edit_regions(run_state(concepts, [best]), occupied=set())
    assert region.text == "" and region.concept_ids == [GONE] and region.box == concepts[-1].box
    gone = candidate("b", {FOX, TREE, RED, TALL, GONE}, judged_ids=(FOX, TREE, RED, TALL, GONE))
    assert edit_regions(run_state(concepts, [gone]), occupied=set()) == []  # absent already: nothing to clear
    assert absent_regions(concepts, gone) == []
