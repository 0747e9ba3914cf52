"""Threads that refine over turns, typed streaming events, review pauses, and dependency-aware long prompts."""

import pytest
from PIL import Image
from scripted import FakeGenerator, ScriptedChatModel, ScriptedCritic, fake_backends

from imagerag.agent.events import BudgetLeft, Finished, NodeFinished, NodeStarted, ReviewRequested, Verdicts
from imagerag.agent.run import RunError, history, resume, run, stream
from imagerag.graphs.nodes import ReviewDecision
from imagerag.graphs.state import Budget
from imagerag.tools.backends.planner import ConceptList, RuleDecomposer, revise_turn
from imagerag.tools.files import content_id

PROMPT = "a heart and a blue square"  # c1 a heart, c2 a square, c3 a blue square (needs c2)


class ConceptCritic:
    """Satisfies exactly the concept texts in `ok` (the set can change between turns)."""

    def __init__(self, ok: set[str]):
        self.ok, self.calls = ok, []

    def critique(self, image, concepts, prompt):
        from imagerag.tools.types import ConceptVerdict, Critique

        self.calls.append([c.text for c in concepts])
        return Critique(
            verdicts=[
                ConceptVerdict(concept_id=c.id, satisfied=c.text in self.ok, score=0.9 if c.text in self.ok else 0.1)
                for c in concepts
            ]
        )


def settings_for(tiny_settings, **update):
    return tiny_settings.model_copy(update={"budget": Budget(max_rounds=3), **update})


def test_a_thread_refines_its_image_over_turns(tiny_settings, tiny_store, tmp_path):
    critic = ConceptCritic({"a heart", "a square", "a blue square"})
    backends = fake_backends(tiny_store, critic)
    settings = settings_for(tiny_settings)
    first = run(PROMPT, settings, tmp_path, thread="scarf", backends=backends)
    assert first.status == "satisfied" and first.turn == 1 and first.run_dir.endswith("scarf")

    critic.ok |= {"a green square"}  # the changed concept is satisfied only by a new image
    critic.calls.clear()
    second = run("now make the square green", settings, tmp_path, thread="scarf", backends=backends)
    assert second.turn == 2 and second.prompt == "a heart and a green square"
    heart, square, changed = second.concepts
    assert (heart.id, heart.text, heart.verdict) == ("c1", "a heart", "satisfied") and square.id == "c2"
    assert changed.id == "c4" and changed.text == "a green square"
    # The best image was carried into the turn and judged only on the changed concept.
    assert critic.calls[0] == ["a green square"]
    assert second.status == "satisfied" and second.rounds == 0 and second.candidates[-1].round == 0

    third = run("add a yellow star at the top", settings, tmp_path, thread="scarf", backends=backends)
    assert [c.text for c in third.concepts][-3:] == ["a star", "a yellow star", "a star at the top"]
    assert third.concepts[-1].depends_on == [third.concepts[-3].id]
    assert third.status == "budget_exhausted" and third.generations == 3  # the star never appears
    assert third.best.turn == 3

    turns = history("scarf", settings)
    assert [t.message for t in turns] == [PROMPT, "now make the square green", "add a yellow star at the top"]
    assert turns[2].missing == ["a star", "a yellow star", "a star at the top"]


def test_a_thread_name_is_validated_and_unknown_threads_are_clear_errors(tiny_settings, tmp_path):
    with pytest.raises(RunError, match="invalid thread name"):
        next(stream(PROMPT, tiny_settings, tmp_path, thread="../escape"))
    with pytest.raises(RunError, match="no thread 'ghost'"):
        history("ghost", tiny_settings)
    with pytest.raises(RunError, match="no run folder or thread 'ghost'"):
        next(resume("ghost", settings=tiny_settings))


def test_stream_yields_typed_events_in_order(tiny_settings, tiny_store, tmp_path):
    backends = fake_backends(tiny_store, ScriptedCritic([{"c2"}, {"c1", "c2"}]))
    events = list(stream("a heart and a square", settings_for(tiny_settings), tmp_path, backends=backends))
    kinds = [e.kind for e in events]
    assert kinds[0] == "node_started" and isinstance(events[-1], Finished)
    started = [e.node for e in events if isinstance(e, NodeStarted)]
    finished = [e.node for e in events if isinstance(e, NodeFinished)]
    assert started == finished == ["plan", "generate", "critique", "retrieve", "edit", "critique", "finish"]
    assert "diffusion_step" in kinds and "retrieved" in kinds and "edited" in kinds
    assert [len(e.verdicts) for e in events if isinstance(e, Verdicts)] == [2, 2]
    budgets = [e for e in events if isinstance(e, BudgetLeft)]
    assert budgets[-1].rounds == 1 and budgets[-1].generations == 4
    assert events[-1].result.status == "satisfied"


def test_review_pauses_before_regeneration_and_applies_the_decision(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    backends = fake_backends(tiny_store, ScriptedCritic([set(), {"c1", "c2"}]), generator=generator)
    settings = settings_for(tiny_settings, review=True)
    events = list(stream("a heart and a square", settings, tmp_path, thread="reviewed", backends=backends))
    pause = events[-1]
    assert isinstance(pause, ReviewRequested) and pause.request["hits"]
    assert (tmp_path / "reviewed" / "run.json").read_text().count('"paused"') == 1
    with pytest.raises(RunError, match="waits for a review"):
        next(resume(pause.run_dir, settings=settings, backends=backends))

    mine = tmp_path / "my-heart.png"
    Image.new("RGB", (8, 8), "red").save(mine)
    final = list(
        resume(
            pause.run_dir,
            ReviewDecision(action="replace", images=[str(mine)], caption="my heart"),
            settings,
            backends=backends,
        )
    )[-1]
    assert isinstance(final, Finished) and final.result.status == "satisfied"
    [reference] = final.result.best.references
    # The replacement's bytes are copied into the data folder's reference cache (a server never reads a path).
    copy = settings.data_dir / "references" / f"{content_id(mine.read_bytes())}.png"
    assert reference.caption == "my heart" and reference.source == str(copy)
    assert generator.calls[-1]["references"] == 1


def test_run_with_a_reviewer_that_drops_references(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    seen = []

    def reviewer(request):
        seen.append(request)
        return ReviewDecision(action="drop")

    result = run(PROMPT, settings_for(tiny_settings, review=True), tmp_path, backends=backends, reviewer=reviewer)
    assert len(seen) == 2 and result.generations == 3
    assert [c["references"] for c in generator.calls] == [0, 0, 0]


def test_long_prompts_fix_objects_before_their_attributes_and_rotate_within_the_reference_limit(
    tiny_settings, tiny_store, tmp_path
):
    specs = ConceptList(
        concepts=[
            {"text": "a lighthouse", "kind": "object"},
            {"text": "the lighthouse is striped", "kind": "attribute", "parent": 1},
            {"text": "a boston bull", "kind": "object"},
            {"text": "the dog wears a green scarf", "kind": "attribute", "parent": 3},
            {"text": "a sailboat", "kind": "object"},
            {"text": "a kite", "kind": "object"},
            {"text": "watercolour style", "kind": "style"},
        ]
    )
    llm = ScriptedChatModel(messages=iter(()), structured=iter([specs]))
    generator = FakeGenerator()
    generator.max_references = 3  # OmniGen-like
    # The critic "sees" stripes on every image, but a child never counts while its object is missing.
    critic = ConceptCritic({"the lighthouse is striped", "watercolour style"})
    backends = fake_backends(tiny_store, critic, generator=generator)
    from imagerag.tools.backends.planner import LLMDecomposer

    backends.decomposer = LLMDecomposer(llm)
    result = run(
        "a boston bull in a green scarf by a striped lighthouse, a sailboat, watercolour",
        settings_for(tiny_settings, budget=Budget(max_rounds=3)),
        tmp_path,
        backends=backends,
    )
    by_text = {c.text: c for c in result.concepts}
    assert by_text["the lighthouse is striped"].depends_on == ["c1"]
    assert (
        by_text["the lighthouse is striped"].verdict == "missing"
        and "needs c1" in by_text["the lighthouse is striped"].evidence
    )
    assert by_text["watercolour style"].verdict == "satisfied"
    targeted = [s.summary.split(": ")[0] for s in result.steps if s.node == "retrieve"]
    # Objects before the attributes that need them, three per round (the generator's limit), and the object
    # left out of the first round leads the second.
    assert targeted == [
        "for 'a lighthouse', 'a boston bull', 'a sailboat'",
        "for 'a kite', 'a lighthouse', 'a boston bull'",
    ]


def test_rule_revisions_on_an_open_vocabulary():
    """Off the miniature world, any object can be added or removed; only a clause that does not parse is refused."""
    rules = RuleDecomposer()
    scene, concepts, _ = rules.plan("a dog with a red scarf, a lighthouse")
    assert [(c.id, c.text, c.object_id) for c in concepts] == [
        ("c1", "a dog", "o1"),
        ("c2", "a scarf", "o2"),
        ("c3", "a red scarf", "o2"),
        ("c4", "a lighthouse", "o3"),
    ]
    removed = revise_turn(rules, scene, concepts, "remove the lighthouse").applied
    assert removed is not None and removed.prompt == "a dog and a red scarf"
    assert [(c.id, c.text, c.kind) for c in removed.concepts][-1] == ("c5", "no lighthouse", "absent")
    green = revise_turn(rules, scene, concepts, "make the scarf green").applied
    assert green is not None and green.prompt == "a dog, a green scarf and a lighthouse"
    assert [(c.id, c.text) for c in green.concepts] == [
        ("c1", "a dog"),
        ("c2", "a scarf"),
        ("c5", "a green scarf"),
        ("c4", "a lighthouse"),
    ]
    kite = revise_turn(rules, scene, concepts, "add a kite above the lighthouse").applied
    assert kite is not None and kite.prompt.endswith("a kite above a lighthouse")
    assert [c.text for c in kite.concepts][-2:] == ["a kite", "a kite above a lighthouse"]
    assert not revise_turn(rules, scene, concepts, "sing a song").understanding.understood
