"""`imagerag calibrate`: thresholds chosen on half of a collection, checked on the other half and, in the miniature
world, against the oracle on generated images."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from imagerag.tools.backends.calibration import (
    Calibration,
    CalibrationError,
    balanced_accuracy,
    best_threshold,
    calibrate,
    calibration_path,
    read_calibration,
    write_calibration,
)
from imagerag.tools.backends.clip import EmbeddingModelInfo
from imagerag.tools.backends.store import ReferenceStore, chroma_client

# ----------------------------------------------------------------------------- the threshold sweep


def test_separable_scores_get_the_midpoint_of_the_gap():
    assert best_threshold(np.array([6.0, 7.0, 8.0]), np.array([1.0, 2.0, 4.0])) == (5.0, 1.0)


def test_equally_good_gaps_far_apart_take_the_widest_then_the_lowest():
    # Accepting >= 3 and accepting >= 7 both reach 5/6; (5, 7] is wider than (2, 3].
    assert best_threshold(np.array([3.0, 7.0, 8.0]), np.array([1.0, 2.0, 5.0])) == (6.0, pytest.approx(5 / 6))
    # (2, 3] and (5, 6] are as wide: the lower one.
    assert best_threshold(np.array([3.0, 6.0, 7.0]), np.array([1.0, 2.0, 5.0])) == (2.5, pytest.approx(5 / 6))


def test_a_plateau_of_neighbouring_gaps_takes_its_midpoint():
    # A positive and a negative both at 3 (as many of each): accepting >= 3 or >= 5 is as good, so the best run
    # spans 1 .. 5 and its midpoint is 3.
    threshold, accuracy = best_threshold(np.array([3.0, 5.0, 6.0]), np.array([0.0, 1.0, 3.0]))
    assert (threshold, accuracy) == (3.0, pytest.approx(5 / 6))
    assert balanced_accuracy(np.array([3.0, 5.0, 6.0]), np.array([0.0, 1.0, 3.0]), threshold)[0] == pytest.approx(
        accuracy
    )


def test_the_sweep_finds_the_best_threshold_a_brute_force_finds():
    rng = np.random.default_rng(7)
    for _ in range(50):
        pos = np.round(rng.normal(0.6, 0.1, rng.integers(1, 40)), 2)  # rounded: ties and repeated scores
        neg = np.round(rng.normal(0.4, 0.1, rng.integers(1, 40)), 2)
        scores = np.unique(np.concatenate([pos, neg]))
        brute = max(balanced_accuracy(pos, neg, t)[0] for t in scores)
        threshold, accuracy = best_threshold(pos, neg)
        assert accuracy == pytest.approx(brute)
        assert balanced_accuracy(pos, neg, threshold)[0] == pytest.approx(brute)


def test_no_positives_or_no_negatives_is_refused():
    with pytest.raises(CalibrationError):
        best_threshold(np.array([]), np.array([0.1]))
    with pytest.raises(CalibrationError):
        best_threshold(np.array([0.1]), np.array([]))


# ----------------------------------------------------------------------------- calibrate on a synthetic collection


class _StubEmbedder:
    """Each caption word picks a direction; an image embeds near its caption's direction. No model, no images."""

    info = EmbeddingModelInfo(name="stub", pretrained="none", dim=16)
    preprocess = None

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), 16), np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                vectors[row, sum(map(ord, word)) % 16] += 1.0
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def stub_store(tmp_path) -> ReferenceStore:
    embedder = _StubEmbedder()
    store = ReferenceStore.open(chroma_client(tmp_path), "stub", embedder, create=True)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "boat", "tree", "house"]
    captions = [f"a {words[i % 3]} {words[3 + i % 5]}" for i in range(200)] + [""] * 5  # 5 without caption
    clean = embedder.embed_texts([c or "x" for c in captions])
    noisy = clean + rng.normal(0, 0.15, clean.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    ids = [f"{i:04d}" for i in range(len(captions))]
    store.add(ids, noisy, captions, [str(tmp_path / f"{i}.png") for i in ids])
    return store


def test_calibrate_chooses_on_one_half_checks_on_the_other_and_is_deterministic(stub_store):
    calibration = calibrate(stub_store, seed=3, max_images=None)
    assert calibration.images_without_caption == 5
    assert calibration.images_choosing + calibration.images_held_out == 200
    assert calibration.pairs_choosing == (100, 400) and calibration.pairs_held_out == (100, 400)
    assert calibration.judge.balanced_accuracy_held_out >= 0.9
    assert calibration.judge_threshold == calibration.judge.threshold == calibration.retrieval_min_similarity
    assert calibration.collection == "stub" and calibration.embedding_model == _StubEmbedder.info
    assert calibrate(stub_store, seed=3, max_images=None) == calibration
    assert calibrate(stub_store, seed=4, max_images=None).judge != calibration.judge  # another split
    assert calibrate(stub_store, seed=3, max_images=50).images_choosing <= 25


def test_a_collection_with_one_caption_cannot_be_calibrated(tmp_path):
    embedder = _StubEmbedder()
    store = ReferenceStore.open(chroma_client(tmp_path), "same", embedder, create=True)  # type: ignore[arg-type]
    store.add([f"{i}" for i in range(10)], embedder.embed_texts(["a cat"] * 10), ["a cat"] * 10, ["x.png"] * 10)
    with pytest.raises(CalibrationError, match="2 different captions"):
        calibrate(store)


def test_the_file_holds_what_the_profile_reads_and_is_refused_for_another_model(stub_store, tmp_path):
    calibration = calibrate(stub_store, max_images=None)
    path = write_calibration(calibration, calibration_path(tmp_path, "stub"))
    assert path == tmp_path / "calibration" / "stub.json"
    raw = json.loads(path.read_text())
    assert raw["judge_threshold"] == calibration.judge_threshold
    assert raw["retrieval_min_similarity"] == calibration.retrieval_min_similarity
    assert read_calibration(path, _StubEmbedder.info) == calibration
    other = EmbeddingModelInfo(name="stub", pretrained="other", dim=16)
    assert read_calibration(path, other) is None
    assert read_calibration(tmp_path / "calibration" / "absent.json", _StubEmbedder.info) is None
    path.write_text("{not json")
    assert read_calibration(path, _StubEmbedder.info) is None
    assert isinstance(calibration, Calibration)


# ----------------------------------------------------------------------------- the miniature world


@pytest.fixture(scope="module")
def mini_calibration(tmp_path_factory) -> tuple[Calibration, object]:
    """1,200 rendered scenes of the retrieval corpus indexed with the mini CLIP into the mini profile's collection
    (every single-object scene of the corpus half once, then random scenes of one to four objects), and their
    calibration."""
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.indexer import index_folders
    from imagerag.tools.backends.loading import load_embedder
    from imagerag.tools.miniworld.world import write_corpus
    from imagerag.tools.profiles import MINI_COLLECTION

    root = tmp_path_factory.mktemp("mini-calibration")
    write_corpus(root / "corpus", n=1200, seed=1)
    embedder = load_embedder(Settings(profile="mini", data_dir=root))
    store = ReferenceStore.open(chroma_client(root), MINI_COLLECTION, embedder, create=True)
    assert index_folders(store, [root / "corpus"]).failed == 0
    return calibrate(store, seed=0, max_images=None), embedder


@pytest.mark.slow
def test_mini_world_thresholds_chosen_on_one_half_hold_on_the_other(mini_calibration):
    calibration, _ = mini_calibration
    assert calibration.images_choosing + calibration.images_held_out >= 1150  # identical renders are stored once
    for check in (calibration.judge, calibration.retrieval):
        assert check.balanced_accuracy_choosing >= 0.9
        assert check.balanced_accuracy_held_out >= 0.9, check


def _read_prompt(reading: list) -> object | None:
    """A prompt naming every attribute of each object read whose shape is read once (at most four): concepts that
    the image satisfies, by construction."""
    from collections import Counter

    from imagerag.evals.miniworld.grammar import Group, PromptSpec

    shapes = Counter(d.shape for d in reading)
    groups = [Group(shape=d.shape, colour=d.colour, size=d.size, cell=d.cell) for d in reading if shapes[d.shape] == 1][
        :4
    ]
    return PromptSpec(id="read", prompt="", groups=groups) if groups else None


@pytest.mark.slow
def test_mini_world_judge_threshold_agrees_with_the_oracle_on_generated_images(mini_calibration, tmp_path):
    """Images generated from prompts of the benchmark's dev split (scenes the corpus never holds); per (image,
    concept) the oracle's reading judged by grammar.judge decides whether the concept holds, and the CLIP judge at
    the calibrated threshold decides on the concept's text as the offline planner words it (grammar.concept_text).

    The concepts asked about are the image's own prompt's, those of a prompt naming the objects the oracle reads in
    the image (so that satisfied concepts are not rare: the text-to-image model alone seldom draws every concept of
    a prompt) and those of another dev prompt (mostly unsatisfied). Each concept is judged within its prompt, as the
    benchmark's critic agreement judges it.
    """
    from imagerag.evals.miniworld.benchmark import PROMPTS_DIR, load_prompts
    from imagerag.evals.miniworld.common import ORACLE_DIR
    from imagerag.evals.miniworld.grammar import concept_text, judge
    from imagerag.evals.miniworld.oracle import Oracle
    from imagerag.tools.backends.judges import ClipJudge
    from imagerag.tools.backends.loading import resolve
    from imagerag.tools.backends.registries import GENERATORS
    from imagerag.tools.config import PROFILES
    from imagerag.tools.miniworld import MODELS_DIR
    from imagerag.tools.types import Concept

    calibration, embedder = mini_calibration
    spec = PROFILES["mini"].generator
    assert spec.ip_adapter is not None
    generator = GENERATORS[spec.family].from_pretrained(
        spec, resolve(spec.model_id, tmp_path), resolve(spec.ip_adapter.repo, tmp_path), "cpu"
    )
    prompts = load_prompts(PROMPTS_DIR / "dev.jsonl")
    rng = random.Random(0)
    chosen = rng.sample(prompts, 40)
    images = [generator.generate(p.prompt, seed=i)[0] for i, p in enumerate(chosen)]
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    judge_ = ClipJudge(embedder, calibration.judge_threshold)  # type: ignore[arg-type]
    shown: list[bool] = []
    accepted: list[bool] = []
    similarities: list[float] = []
    for prompt, image, reading in zip(chosen, images, oracle.read(images), strict=True):
        other = rng.choice([p for p in prompts if p.id != prompt.id])
        asked: dict[str, bool] = {}
        for asked_about in (prompt, _read_prompt(reading), other):
            if asked_about is None:
                continue
            for concept, holds in judge(asked_about, reading).concepts:
                asked.setdefault(concept_text(asked_about, concept), holds)
        texts = list(asked)
        shown += asked.values()
        accepted += [v.satisfied for v in judge_.critique(image, [Concept(id=t, text=t) for t in texts]).verdicts]
        similarities += (embedder.embed_texts(texts) @ embedder.embed_images([image])[0]).tolist()
    truth, said, scores = np.array(shown), np.array(accepted), np.array(similarities)
    agreement = 0.5 * (said[truth].mean() + (~said[~truth]).mean())
    shipped = json.loads((MODELS_DIR / "clip" / "calibration.json").read_text())["judge_threshold"]
    best, ceiling = best_threshold(scores[truth], scores[~truth])
    print(
        f"oracle agreement on {len(images)} generated images ({truth.sum()} concepts shown, {(~truth).sum()} not "
        f"shown): {agreement:.3f} at the calibrated {calibration.judge_threshold}, "
        f"{balanced_accuracy(scores[truth], scores[~truth], shipped)[0]:.3f} at the shipped {shipped}, "
        f"{ceiling:.3f} at {best:.4f}, the best threshold for these pairs"
    )
    assert truth.sum() >= 20 and (~truth).sum() >= 20
    # A floor under the agreement of a good model: generated images are blurrier than corpus ones, so their
    # similarities run lower than the calibration pairs', and the CLIP judge reads a concept's text alone while the
    # oracle judges it within its prompt.
    assert agreement >= 0.8


def test_the_calibrate_command_writes_the_file_the_profile_then_reads(data_dir, tmp_path):
    """Through the CLI on the tiny collection: the thresholds land where loading.calibrated() looks for them."""
    from typer.testing import CliRunner

    from imagerag.agent.cli import app
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.calibration import calibration_path
    from imagerag.tools.backends.loading import calibrated

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    result = CliRunner().invoke(app, ["calibrate", "--profile", "tiny", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    written = json.loads(calibration_path(data, "tiny").read_text())
    spec = calibrated(Settings(profile="tiny", data_dir=data))
    assert (spec.judge_threshold, spec.retrieval_min_similarity) == (
        written["judge_threshold"],
        written["retrieval_min_similarity"],
    )
