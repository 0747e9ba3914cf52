"""One short run of the loop on the mini profile: the shipped models, the project's own indexer, the oracle."""

import pytest

from agent.config import Settings
from agent.run import run
from agent.state import Budget
from evals.miniworld.oracle import Oracle
from evals.miniworld.world import ObjectSpec, Scene, caption, write_corpus
from tools.backends.indexer import index_folders
from tools.backends.loading import MINI_MODELS, load_backends, load_embedder
from tools.backends.store import ReferenceStore, chroma_client


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
    result = run(caption(scene), mini_settings.model_copy(update={"budget": Budget(max_rounds=4)}), tmp_path, backends=load_backends(mini_settings))
    oracle = Oracle.from_pretrained(MINI_MODELS / "oracle")
    images = {c.image_id: _open(tmp_path / result.run_id / "images" / f"{c.image_id}.png") for c in result.candidates}
    first = result.candidates[0]
    assert not first.references and not oracle.judge(images[first.image_id], scene)[0].shape  # text alone: no heart
    assert all("heart" in h.caption for c in result.candidates for h in c.references)  # retrieval found hearts
    assert oracle.judge(images[result.best.image_id], scene)[0].shape  # the loop's answer has the heart
    assert result.best.references


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")
