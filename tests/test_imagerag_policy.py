"""The deterministic policy's loop: stop rule, budgets, best-of, retries and clean failure."""

import json
from pathlib import Path

import pytest
from scripted import FakeGenerator, ScriptedCritic, fake_backends

from imagerag.agent.run import run
from imagerag.graphs.state import Budget

PROMPT = "a heart and a square"  # concepts c1 (a heart), c2 (a square)


def go(tiny_settings, tiny_store, tmp_path, critic, budget=None, generator=None, min_similarity=-1.0, **settings):
    settings = tiny_settings.model_copy(update={"budget": budget or Budget(), **settings})
    backends = fake_backends(tiny_store, critic, generator=generator, min_similarity=min_similarity)
    return run(PROMPT, settings, tmp_path / "runs", backends=backends)


def test_stops_as_soon_as_every_concept_is_satisfied(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    result = go(
        tiny_settings, tiny_store, tmp_path, ScriptedCritic([{"c2"}, {"c1", "c2"}, {"c1"}]), generator=generator
    )
    assert result.status == "satisfied"
    assert result.rounds == 2 and result.generations == 2
    assert [c.verdict for c in result.concepts] == ["satisfied", "satisfied"]
    # The second image edits the first (it holds the square), conditioned on a reference for the missing heart only.
    assert generator.calls[0]["references"] == 0 and generator.calls[1]["references"] == 1
    assert generator.calls[1].get("edit") and result.candidates[1].edit is not None
    assert result.candidates[1].references[0].query == "a photo of a heart"  # the critic's own query
    assert [s.node for s in result.steps] == ["plan", "generate", "critique", "retrieve", "edit", "critique", "finish"]


class DoubtingCritic(ScriptedCritic):
    """A scripted critic with a second look (a Verifier) that confirms nothing on its first `doubts` calls."""

    def __init__(self, script, doubts: int):
        super().__init__(script)
        self.doubts, self.verified = doubts, 0

    def verify(self, image, concepts, verdicts):
        self.verified += 1
        if self.verified > self.doubts:
            return verdicts
        return [v.model_copy(update={"satisfied": False, "evidence": "not confirmed"}) for v in verdicts]


def test_the_checked_stop_goes_on_past_an_image_the_second_look_does_not_confirm(tiny_settings, tiny_store, tmp_path):
    # Both images pass every concept; the second look doubts the first, so the run goes on and stops on the second.
    critic = DoubtingCritic([{"c1", "c2"}], doubts=1)
    checked = go(tiny_settings, tiny_store, tmp_path, critic)
    assert checked.status == "satisfied" and checked.generations == 2 and critic.verified == 2
    assert [v.evidence for v in checked.candidates[0].verdicts] == ["not confirmed"] * 2
    # Turned off, the critic's own verdicts stop the run on the first image, and no second look is taken.
    unchecked_critic = DoubtingCritic([{"c1", "c2"}], doubts=1)
    unchecked = go(tiny_settings, tiny_store, tmp_path, unchecked_critic, check_stop=False)
    assert unchecked.status == "satisfied" and unchecked.generations == 1 and unchecked_critic.verified == 0


@pytest.mark.parametrize(
    ("budget", "reason", "generations"),
    [
        (Budget(max_rounds=3), "rounds", 3),
        (Budget(max_generations=2), "generations", 2),
        (Budget(max_seconds=1e-6), "seconds", 1),
    ],
)
def test_stops_on_each_budget(tiny_settings, tiny_store, tmp_path, budget, reason, generations):
    result = go(tiny_settings, tiny_store, tmp_path, ScriptedCritic([{"c2"}]), budget=budget)
    assert result.status == "budget_exhausted"
    assert result.stop_reason == f"budget_exhausted:{reason}"
    assert result.generations == generations


def test_the_clock_counts_the_whole_run(tiny_settings, tiny_store, tmp_path):
    import time

    class SlowGenerator(FakeGenerator):
        def generate(self, *args, **kwargs):
            time.sleep(0.05)
            return super().generate(*args, **kwargs)

    result = go(
        tiny_settings,
        tiny_store,
        tmp_path,
        ScriptedCritic([set()]),
        budget=Budget(max_rounds=3),
        generator=SlowGenerator(),
    )
    assert result.generations == 3 and result.usage.seconds >= 0.15  # three sleeps at least, whatever the machine


def test_stops_on_the_token_budget(tiny_settings, tiny_store, tmp_path):
    # Each VLM-style critique costs tokens; the budget counts them.
    class CostlyCritic(ScriptedCritic):
        def critique(self, image, concepts, prompt):
            return super().critique(image, concepts, prompt).model_copy(update={"tokens": 400})

    result = go(tiny_settings, tiny_store, tmp_path, CostlyCritic([{"c2"}]), budget=Budget(max_tokens=1000))
    assert result.stop_reason == "budget_exhausted:tokens"
    assert result.usage.llm_tokens == 1200 and result.generations == 3


def test_returns_the_best_image_not_the_last(tiny_settings, tiny_store, tmp_path):
    critic = ScriptedCritic([set(), {"c1"}, set(), set()], score_bonus=[0, 0, 0.1, 0.1])
    result = go(tiny_settings, tiny_store, tmp_path, critic, budget=Budget(max_rounds=4))
    assert result.generations == 4
    assert result.best.image_id == result.candidates[1].image_id != result.candidates[-1].image_id
    assert result.best_image == str(Path(result.run_dir) / "images" / f"{result.best.image_id}.png")
    assert [c.verdict for c in result.concepts] == ["satisfied", "missing"]


def test_an_image_with_every_object_ranks_above_one_missing_an_object(tiny_settings, tiny_store, tmp_path):
    # c1 a heart, c2 a red heart (needs c1), c3 a square, c4 a blue square (needs c3). Both images satisfy two
    # concepts; the second has both objects, the first a whole heart and no square.
    settings = tiny_settings.model_copy(update={"budget": Budget(max_rounds=2)})
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}, {"c1", "c3"}]))
    result = run("a red heart and a blue square", settings, tmp_path / "runs", backends=backends)
    assert [c.depends_on for c in result.concepts] == [[], ["c1"], [], ["c3"]]
    assert result.best.image_id == result.candidates[1].image_id
    assert [c.verdict for c in result.concepts] == ["satisfied", "missing", "satisfied", "missing"]


def test_between_images_with_as_many_objects_the_one_text_could_not_draw_ranks_first(
    tiny_settings, tiny_store, tmp_path
):
    # Round 1 (text) draws a blue square: two concepts. Round 2 (heart reference) draws a heart and loses the square:
    # one concept. Each has one object; the heart is the one no image from text showed, so round 2 is the answer.
    settings = tiny_settings.model_copy(update={"budget": Budget(max_rounds=2)})
    backends = fake_backends(tiny_store, ScriptedCritic([{"c3", "c4"}, {"c1"}]))
    result = run("a red heart and a blue square", settings, tmp_path / "runs", backends=backends)
    assert result.candidates[1].references and result.best.image_id == result.candidates[1].image_id


def test_rounds_rotate_through_missing_concepts_and_never_reuse_a_reference(tiny_settings, tiny_store, tmp_path):
    result = go(tiny_settings, tiny_store, tmp_path, ScriptedCritic([set()]), budget=Budget(max_rounds=5))
    queries = [c.references[0].query for c in result.candidates[1:]]
    assert queries == ["a photo of a heart", "a photo of a square"] * 2
    ids = [c.references[0].id for c in result.candidates[1:]]
    assert len(set(ids)) == len(ids)


def test_references_go_to_what_text_alone_could_not_draw(tiny_settings, tiny_store, tmp_path):
    # Round 1 (text) draws the square, round 2 (heart reference) draws the heart and loses the square, and ranks
    # first. The square needs another sample, not the one reference slot: round 3 keeps a heart reference.
    critic = ScriptedCritic([{"c2"}, {"c1"}, set()], score_bonus=[0.0, 0.1, 0.0])
    result = go(tiny_settings, tiny_store, tmp_path, critic, budget=Budget(max_rounds=3))
    assert result.best.round == 2
    # The heart has no caption of the critic's once satisfied on the best image: its object's whole phrase.
    assert [c.references[0].query for c in result.candidates[1:]] == ["a photo of a heart", "a heart"]
    assert result.candidates[1].references[0].id != result.candidates[2].references[0].id


def test_no_reference_below_the_threshold_means_a_fresh_text_sample(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    result = go(
        tiny_settings,
        tiny_store,
        tmp_path,
        ScriptedCritic([set()]),
        budget=Budget(max_rounds=3),
        generator=generator,
        min_similarity=0.99,
    )
    assert all(not c.references for c in result.candidates)
    assert [c["seed"] for c in generator.calls] == [0, 1, 2]
    assert "nothing above the threshold" in next(s.summary for s in result.steps if s.node == "retrieve")


def test_a_failing_critic_is_retried(tiny_settings, tiny_store, tmp_path):
    critic = ScriptedCritic([RuntimeError("VLM timeout"), {"c1", "c2"}])
    result = go(tiny_settings, tiny_store, tmp_path, critic)
    assert result.status == "satisfied" and critic.calls == 2


def test_a_critic_that_keeps_failing_fails_the_run_cleanly_and_keeps_its_work(tiny_settings, tiny_store, tmp_path):
    critic = ScriptedCritic([{"c2"}, RuntimeError("VLM down")])
    result = go(tiny_settings, tiny_store, tmp_path, critic)
    assert result.status == "failed" and "VLM down" in result.error
    assert critic.calls == 4  # one success, then three attempts at the second image
    assert len(result.candidates) == 2 and result.best.image_id == result.candidates[0].image_id
    run_dir = Path(result.run_dir)
    for candidate in result.candidates:
        assert (run_dir / "images" / f"{candidate.image_id}.png").exists()
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["status"] == "failed" and len(saved["candidates"]) == 2
    assert (run_dir / "report.html").exists()


def test_runs_never_share_a_folder(tiny_settings, tiny_store, tmp_path):
    first = go(tiny_settings, tiny_store, tmp_path, ScriptedCritic([{"c1", "c2"}]))
    second = go(tiny_settings, tiny_store, tmp_path, ScriptedCritic([{"c1", "c2"}]))
    assert first.run_dir != second.run_dir
    assert json.loads((Path(first.run_dir) / "run.json").read_text())["thread"] == first.thread


def test_samples_draw_a_batch_per_round_each_judged_and_counted(tiny_settings, tiny_store, tmp_path):
    generator, critic = FakeGenerator(), ScriptedCritic([set()])
    budget = Budget(max_rounds=4, max_generations=7)
    result = go(tiny_settings, tiny_store, tmp_path, critic, budget, generator=generator, samples=3)
    assert [c["n"] for c in generator.calls] == [3, 3, 1]  # the last batch stops at the generation budget
    assert [c["references"] for c in generator.calls] == [0, 1, 1]
    assert result.generations == 7 and result.rounds == 3 and result.stop_reason == "budget_exhausted:generations"
    assert critic.calls == 7 and all(c.judged for c in result.candidates)
    assert [c.round for c in result.candidates] == [1, 1, 1, 2, 2, 2, 3]
    assert len({c.seed for c in result.candidates}) == 7  # no two images share a seed
