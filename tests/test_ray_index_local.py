"""`imagerag index --ray` from the command line, without an address: it starts a local Ray runtime of its own
(loopback, no dashboard), indexes into a real Chroma server, prints each finished source and stops the runtime."""

from __future__ import annotations

import os

import pytest
from test_indexing import img2dataset_shard, png
from test_ray_index import chroma_url  # noqa: F401 - the module's Chroma server fixture
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.tools.backends.ray_indexer import ShardLedger
from imagerag.tools.backends.store import server_client

runner = CliRunner()


def said(result) -> str:
    """What the command wrote to stderr, with the terminal's line wrapping undone."""
    return " ".join(result.stderr.split())


os.environ.update(RAY_USAGE_STATS_ENABLED="0")


def test_ray_without_a_chroma_server_is_refused(tmp_path, data_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    result = runner.invoke(app, ["index", str(folder), "--ray", "--profile", "tiny", "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "--chroma-url" in said(result)


def test_shards_on_a_cluster_need_a_shared_reference_cache(tmp_path, data_dir):
    img2dataset_shard(tmp_path / "s.tar", [("0", png("red", fmt="JPEG"), "red", None)])
    common = ["--profile", "tiny", "--data-dir", str(data_dir), "--chroma-url", "http://127.0.0.1:9"]
    result = runner.invoke(app, ["index", str(tmp_path / "s.tar"), "--ray-address", "127.0.0.1:6379", *common])
    assert result.exit_code == 2 and "--reference-cache on a shared filesystem" in said(result)


@pytest.mark.slow
def test_the_index_command_runs_on_a_local_ray_runtime(tmp_path, data_dir, chroma_url):  # noqa: F811
    import ray

    shard = tmp_path / "00000.tar"
    img2dataset_shard(shard, [(f"{i}", png((i * 80, 10, 10), fmt="JPEG"), f"square {i}", None) for i in range(3)])
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "blue.png").write_bytes(png("blue"))
    (folder / "blue.txt").write_text("a blue square")
    common = ["--profile", "tiny", "--data-dir", str(data_dir), "--chroma-url", chroma_url, "--collection", "cli-ray"]
    cache = ["--reference-cache", str(tmp_path / "cache")]
    result = runner.invoke(app, ["index", str(shard), str(folder), "--ray", *cache, *common])
    assert result.exit_code == 0, result.output
    assert f"done: {shard.resolve()}: added 3, skipped 0, failed 0" in said(result)
    assert "2 source(s) done, 0 already done before; added 4, skipped 0, failed 0" in said(result)
    assert "collection 'cli-ray' holds 4" in said(result)
    assert not ray.is_initialized()  # the runtime it started is stopped
    assert len(ShardLedger(server_client(chroma_url), "cli-ray").reports()) == 2
    again = runner.invoke(app, ["index", str(shard), str(folder), "--ray", *cache, *common])
    assert "0 source(s) done" not in said(again) and "1 already done before; added 0, skipped 1" in said(again)
