"""One short run of the loop on the mini profile: the shipped models, the project's own indexer, the oracle."""

from pathlib import Path

import pytest

from imagerag.agent.config import Settings
from imagerag.agent.run import run
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.graphs.state import Budget
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.loading import load_backends, load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.miniworld.world import ObjectSpec, Scene, caption, write_corpus


@pytest.fixture(scope="module")
def mini_settings(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("mini")
    write_corpus(root / "corpus", n=600, seed=1)  # every single-object shape x colour x position x size once
    settings = Settings(profile="mini", data_dir=root)
    store = ReferenceStore.open(chroma_client(root), "miniworld", load_embedder(settings), create=True)
    summary = index_folders(store, [root / "corpus"])
    assert summary.added == 600 and summary.failed == 0
    return settings


def test_the_loop_adds_a_rare_shape_that_text_alone_misses(mini_settings, tmp_path):
    scene = Scene((ObjectSpec("heart", "red", "left", "large"),))
    result = run(
        caption(scene),
        mini_settings.model_copy(update={"budget": Budget(max_rounds=4)}),
        tmp_path,
        backends=load_backends(mini_settings),
    )
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    images = {c.image_id: _open(Path(result.run_dir) / "images" / f"{c.image_id}.png") for c in result.candidates}
    first = result.candidates[0]
    assert not first.references and not oracle.judge(images[first.image_id], scene)[0].shape  # text alone: no heart
    assert all("heart" in h.caption for c in result.candidates for h in c.references)  # retrieval found hearts
    assert oracle.judge(images[result.best.image_id], scene)[0].shape  # the loop's answer has the heart
    assert result.best.references


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.mark.slow
def test_the_benchmark_records_the_oracle_on_every_image_and_which_one_each_condition_returns(mini_settings, tmp_path):
    from imagerag.evals.miniworld.benchmark import conditions, run_condition, summarise
    from imagerag.tools.miniworld.world import heldout_prompts

    prompts = [p for p in heldout_prompts() if p.group == "rare"][:2]
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    for condition in conditions(loop_rounds=3)[1:]:  # the one pass returns its last image, the loop its best
        done = run_condition(prompts, condition, mini_settings, load_backends(mini_settings), oracle, tmp_path)
        for outcome in done:
            assert [i.round for i in outcome.images] == list(range(1, outcome.generations + 1))
            [chosen] = [i for i in outcome.images if i.chosen]
            assert (outcome.shape, outcome.colour, outcome.position) == (chosen.shape, chosen.colour, chosen.position)
            assert chosen is outcome.images[-1] or condition.pick == "best"
        summary = summarise(done)
        assert summary["prompts"] == 2 and summary["shape_rare_any_image_pct"] >= summary["shape_rare_pct"]
