"""Every registered generator family and critic, and every kind of profile (tiny random models in the real
layouts, the miniature world's trained models, the tests' stand-ins), passes the contracts of tests/contracts.py."""

from __future__ import annotations

import itertools

import pytest
from contracts import CriticContract, DiffusersContract, GeneratorContract, MakeGenerator, RegionReferencesContract
from scripted import FakeGenerator, ScriptedChatModel, ScriptedCritic

from imagerag.agent.config import Settings
from imagerag.prompts import render
from imagerag.tools.backends.judges import ClipJudge, Critic, VLMJudge
from imagerag.tools.backends.loading import load_backends, load_embedder
from imagerag.tools.backends.registries import CRITICS, GENERATORS
from imagerag.tools.config import PROFILES
from imagerag.tools.types import ConceptVerdict, RetrievalHit


def test_the_built_in_backends_are_registered_through_entry_points():
    """The built-ins come from the `imagerag.*` entry-point groups, as a third party's would (tests/test_plugins.py)."""
    assert {"sd", "sdxl", "omnigen"} <= set(GENERATORS.entries())
    assert {"clip", "vlm"} <= set(CRITICS.entries())
    for name in ("sd", "sdxl", "omnigen"):
        assert GENERATORS[name].__module__ == f"imagerag.tools.backends.{name}"  # one module per family


def loaded(profile: str, data_dir) -> MakeGenerator:
    settings = Settings(profile=profile, data_dir=data_dir, device="cpu")
    generator = load_backends(settings).generator
    assert type(generator) is GENERATORS[settings.resolved_profile().generator.family]  # built through the registry
    return lambda: generator


class TestTinySD(DiffusersContract, RegionReferencesContract):
    @pytest.fixture
    def make_generator(self, data_dir) -> MakeGenerator:
        return loaded("tiny", data_dir)


class TestTinySDXL(DiffusersContract, RegionReferencesContract):
    @pytest.fixture
    def make_generator(self, data_dir) -> MakeGenerator:
        return loaded("tiny-sdxl", data_dir)


class TestTinyOmniGen(DiffusersContract):
    @pytest.fixture
    def make_generator(self, data_dir) -> MakeGenerator:
        return loaded("tiny-omnigen", data_dir)

    def prompt_for(self, text: str, references: int, edit: bool = False) -> str:
        spec = PROFILES["tiny-omnigen"].generator
        hits = [
            RetrievalHit(id=f"r{i}", caption="x", similarity=1.0, source="x.png", query="x") for i in range(references)
        ]
        return render(spec.edit_template if edit else spec.regenerate_template, prompt=text, references=hits)

    def test_it_takes_its_references_in_context_not_by_region(self, make_generator: MakeGenerator) -> None:
        generator = make_generator()
        assert generator.max_region_references == generator.max_references == 3


class TestMiniWorld(DiffusersContract, RegionReferencesContract):
    @pytest.fixture
    def make_generator(self, data_dir) -> MakeGenerator:
        return loaded("mini", data_dir)


class TestFakeGenerator(GeneratorContract):
    @pytest.fixture
    def make_generator(self) -> MakeGenerator:
        return FakeGenerator  # it counts its calls into its colours: a fresh one for each draw


class TestTinyClipCritic(CriticContract):
    @pytest.fixture
    def critic(self, tiny_settings) -> Critic:
        return ClipJudge(load_embedder(tiny_settings), tiny_settings.resolved_profile().clip.judge_threshold)


class TestMiniClipCritic(CriticContract):
    @pytest.fixture
    def critic(self, data_dir) -> Critic:
        critic = load_backends(Settings(profile="mini", data_dir=data_dir, device="cpu")).critic
        assert isinstance(critic, ClipJudge)
        return critic


class TestVLMCritic(CriticContract):
    @pytest.fixture
    def critic(self) -> Critic:
        answer = {
            "verdicts": [
                ConceptVerdict(concept_id=cid, satisfied=cid in {"c1", "c2"}, score=0.9 if cid < "c3" else 0.1)
                for cid in ("c1", "c2", "c3", "c4")
            ]
        }
        return VLMJudge(ScriptedChatModel(messages=iter(()), structured=itertools.repeat(answer)))


class TestScriptedCritic(CriticContract):
    @pytest.fixture
    def critic(self) -> Critic:
        return ScriptedCritic([{"c1", "c3"}])
