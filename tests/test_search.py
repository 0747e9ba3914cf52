"""Searching: typed hits, the relevance threshold, MMR diversity, the re-ranker hook, the CLI's contact sheet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.tools.backends.clip import EmbeddingModelInfo
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.store import ReferenceStore, StoreError, chroma_client, mmr_order
from imagerag.tools.types import ConceptVerdict, Critique, RetrievalHit

runner = CliRunner()


class ColourEmbedder:
    """A CLIP stand-in whose space has a known meaning: an image is its mean colour, a caption the first colour
    word in it (no colour word: grey). Cosines are then predictable, so a threshold test can fail for real."""

    info = EmbeddingModelInfo(name="colour", pretrained="test", dim=3)

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0))

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(pixels.float() + 1e-3, dim=-1).numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        def rgb(text: str) -> list[float]:
            for word in text.lower().split():
                try:
                    return list(ImageColor.getrgb(word))
                except ValueError:
                    continue
            return [128.0, 128.0, 128.0]

        return torch.nn.functional.normalize(
            torch.tensor([rgb(t) for t in texts], dtype=torch.float32) + 1e-3, dim=-1
        ).numpy()


COLOURS = {
    "red": (255, 0, 0),
    "pinkish-red": (255, 60, 60),
    "blue": (0, 0, 255),
    "green": (60, 255, 0),
}  # green leans to red: no ties


@pytest.fixture
def colour_store(tmp_path) -> ReferenceStore:
    folder = tmp_path / "colours"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    store = ReferenceStore.open(chroma_client(tmp_path / "db"), "colours", ColourEmbedder(), create=True)
    index_folders(store, [folder])
    return store


def test_hits_are_typed_and_ranked_by_similarity(colour_store):
    hits = colour_store.search("something red", k=3)
    assert all(isinstance(h, RetrievalHit) for h in hits)
    assert [h.caption for h in hits] == ["a red square", "a pinkish-red square", "a green square"]
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-3) and hits[0].query == "something red"
    assert hits[0].similarity > hits[1].similarity > hits[2].similarity


def test_a_query_for_something_absent_returns_nothing_above_the_threshold(colour_store):
    assert colour_store.search("a purple square", k=5, min_similarity=0.9) == []  # purple is not in the collection
    assert [h.caption for h in colour_store.search("a red square", k=5, min_similarity=0.9)] == [
        "a red square",
        "a pinkish-red square",
    ]
    assert len(colour_store.search("a purple square", k=5, min_similarity=-1.0)) == 4  # no threshold: nonsense returned


def test_mmr_trades_a_near_duplicate_for_a_different_image(colour_store):
    plain = colour_store.search("red", k=2)
    assert [h.caption for h in plain] == ["a red square", "a pinkish-red square"]
    assert [h.caption for h in colour_store.search("red", k=2, mmr_lambda=1.0)] == [h.caption for h in plain]
    diverse = colour_store.search("red", k=2, mmr_lambda=0.3)
    assert diverse[0].caption == "a red square" and diverse[1].caption != "a pinkish-red square"
    assert (
        colour_store.search("red", k=2, mmr_lambda=0.3, min_similarity=0.9)[1].caption == "a pinkish-red square"
    )  # threshold first
    with pytest.raises(ValueError, match="mmr_lambda"):
        colour_store.search("red", mmr_lambda=1.5)


def test_mmr_order_by_hand():
    query = np.array([1.0, 0.0])
    candidates = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])
    assert mmr_order(query, candidates, 1.0, 3) == [0, 1, 2]
    assert mmr_order(query, candidates, 0.3, 2) == [0, 2]


def test_the_reranker_sees_the_candidate_pool_and_has_the_last_word(colour_store):
    seen = {}

    def cheapest_last(query: str, hits: list[RetrievalHit]) -> list[RetrievalHit]:
        seen["query"], seen["pool"] = query, [h.caption for h in hits]
        return [h for h in reversed(hits) if "green" not in h.caption]

    hits = colour_store.search("red", k=2, reranker=cheapest_last)
    assert seen["query"] == "red" and len(seen["pool"]) == 4  # the pool is wider than k
    assert [h.caption for h in hits] == ["a blue square", "a pinkish-red square"]
    many = colour_store.search_many(["red", "red"], k=1, reranker=cheapest_last)
    assert [h.caption for h in many] == ["a blue square", "a pinkish-red square"]  # no image twice


def test_the_critic_reranker_puts_first_the_image_showing_most_of_the_captions_concepts(colour_store):
    """'red' is nearest by cosine, but the critic sees every concept of 'a large red square' only in the blue image
    (a stand-in verdict: the point is the order), and one of them in the pinkish-red one."""
    from imagerag.tools.backends.loading import critic_reranker
    from imagerag.tools.backends.planner import RuleDecomposer

    sees = {"blue": {"c1", "c2", "c3"}, "pinkish-red": {"c1"}}

    class ByColourCritic:
        def critique(self, image, concepts, prompt):
            name = next(n for n, rgb in COLOURS.items() if rgb == image.getpixel((0, 0)))
            return Critique(
                verdicts=[
                    ConceptVerdict(concept_id=c.id, satisfied=c.id in sees.get(name, ()), score=0.5) for c in concepts
                ]
            )

    concepts, _ = RuleDecomposer().decompose("a large red square")
    assert [c.id for c in concepts] == ["c1", "c2", "c3"]  # the square, large, red
    plain = colour_store.search("a large red square", k=4)
    reranked = colour_store.search(
        "a large red square", k=4, reranker=critic_reranker(ByColourCritic(), RuleDecomposer())
    )
    assert plain[0].caption == "a red square"
    assert [h.caption for h in reranked] == [
        "a blue square",
        "a pinkish-red square",
        *(h.caption for h in plain if h.caption not in ("a blue square", "a pinkish-red square")),
    ]


def test_search_with_another_model_fails_clearly(colour_store, tmp_path, tiny_settings):
    from imagerag.tools.backends.loading import load_embedder

    with pytest.raises(
        StoreError, match=r"was embedded with colour \(test, dim 3\) but the current model is local-dir"
    ):
        ReferenceStore.open(chroma_client(tmp_path / "db"), "colours", load_embedder(tiny_settings))


def search_cli(data_dir, *args):
    return runner.invoke(
        app, ["search", *args, "--profile", "tiny", "--data-dir", str(data_dir), "--collection", "tiny"]
    )


def test_cli_search_prints_hits_and_writes_a_contact_sheet_only_when_asked_never_overwriting(
    data_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    plain = search_cli(data_dir, "a red square", "-k", "3")
    assert plain.exit_code == 0 and "contact sheet" not in plain.stderr and not list(tmp_path.glob("*.png"))
    first = search_cli(data_dir, "a red square", "-k", "3", "--sheet")
    assert first.exit_code == 0, first.output
    assert "3 hit(s) for 'a red square'" in first.stdout and "a red square" in first.stdout
    sheet = tmp_path / "a-red-square.png"
    assert f"contact sheet: {sheet.name}" in " ".join(first.stderr.split())
    with Image.open(sheet) as image:
        assert image.size == (3 * 160, 160 + 30)
        assert image.getpixel((80, 80)) != (255, 255, 255)  # a thumbnail, not a blank cell
    second = search_cli(data_dir, "a red square", "-k", "3", "--sheet")
    assert second.exit_code == 0 and (tmp_path / "a-red-square-2.png").exists()
    chosen = search_cli(
        data_dir, "a red square", "-k", "2", "--sheet-to", str(tmp_path / "out" / "mine.png"), "--mmr", "0.5"
    )
    assert chosen.exit_code == 0 and (tmp_path / "out" / "mine.png").exists()
    none = search_cli(data_dir, "a red square", "--min-similarity", "1.01", "--sheet")
    assert none.exit_code == 0 and "0 hit(s)" in none.stdout and "contact sheet" not in none.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a-red-square-2.png", "a-red-square.png"]


def test_cli_search_refuses_a_collection_of_another_model(data_dir, tmp_path):
    ReferenceStore.open(chroma_client(data_dir), "colour-only", ColourEmbedder(), create=True)
    result = runner.invoke(
        app,
        [
            "search",
            "a red square",
            "--profile",
            "tiny",
            "--data-dir",
            str(data_dir),
            "--collection",
            "colour-only",
        ],
    )
    assert result.exit_code == 2
    assert "was embedded with colour (test, dim 3)" in " ".join(result.stderr.split())
