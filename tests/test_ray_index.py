"""`imagerag index --ray` (issue 26): Ray Data over the project's readers into a real Chroma server builds the
collection one process builds, marks every source done in its ledger, and survives a worker killed mid-run.

The cluster is ray.cluster_utils.Cluster on loopback (a head and one worker node, one CPU each); the server is the
chromadb package's own `chroma run`. Both are started once for the module; each test writes its own collection.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scripted import free_port, server_process
from test_indexing import img2dataset_shard, png

from imagerag.tools.backends.indexer import index_sources, open_sources
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.ray_indexer import (
    RayIndexOptions,
    RayIndexSummary,
    ShardLedger,
    index_on_ray,
    source_key,
)
from imagerag.tools.backends.sources import MAX_CAPTION_CHARS, open_source
from imagerag.tools.backends.store import ReferenceStore, chroma_client, server_client

pytestmark = pytest.mark.slow

# Ray turns a loopback address into the machine's own IP before connecting, which this sandbox does not route: on one
# machine its nodes and driver stay on loopback. A loaded CI machine starts a node's agents slowly.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    import shutil
    import sys
    import urllib.request

    folder = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chroma = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1).status == 200
        except OSError:
            return False

    command = [chroma, "run", "--path", str(folder / "db"), "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, folder / "server.log", ready, "the chroma server"):
        yield url


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node on loopback, one CPU each, small object stores, no dashboard."""
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 << 20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    worker = cluster.add_node(**node)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def collection_data(collection) -> dict[str, tuple[np.ndarray, str, dict]]:
    got = collection.get(include=["embeddings", "documents", "metadatas"])
    return {
        i: (np.asarray(e, np.float32), d, m)
        for i, e, d, m in zip(got["ids"], got["embeddings"], got["documents"], got["metadatas"], strict=True)
    }


def assert_same_collection(ray_collection, single_collection) -> None:
    ours, theirs = collection_data(ray_collection), collection_data(single_collection)
    assert sorted(ours) == sorted(theirs)
    for image_id, (vector, caption, meta) in theirs.items():
        np.testing.assert_allclose(ours[image_id][0], vector, atol=1e-5)
        assert ours[image_id][1:] == (caption, meta)


def sources(root: Path) -> tuple[list[Path], int]:
    """Two shards and a folder: captions from txt, json and none, a caption over the limit, a corrupt file in a shard
    and in the folder. Returns the paths and the number of distinct images."""
    root.mkdir()
    long = "a very long caption " * 80
    img2dataset_shard(
        root / "00000.tar",
        [
            ("a0", png("red", fmt="JPEG"), "a red square", None),
            ("a1", png("blue", (20, 12), fmt="JPEG"), None, {"caption": "a blue bar"}),
            ("a2", png("green", fmt="JPEG"), long, None),
            ("a3", b"not an image at all", "broken", None),
            ("a4", png("white", fmt="JPEG"), None, None),
        ],
    )
    img2dataset_shard(
        root / "00001.tar",
        [
            ("b0", png("yellow", fmt="JPEG"), "a yellow square", None),
            ("b1", png((10, 20, 30), fmt="JPEG"), "a dark square", {"caption": "ignored: txt wins"}),
        ],
    )
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "purple.png").write_bytes(png("purple"))
    (folder / "purple.txt").write_text("a purple square")
    (folder / "sub" / "orange.png").write_bytes(png("orange"))
    (folder / "sub" / "orange.json").write_text(json.dumps({"text": "an orange square"}))
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    return [root / "00000.tar", root / "00001.tar", folder], 8


def single_process(tmp_path: Path, paths: list[Path], embedder, cache: Path):
    store = ReferenceStore.open(chroma_client(tmp_path / "single"), "single", embedder, create=True)
    summary = index_sources(store, paths, batch_size=3, cache_dir=cache)
    return store, summary


def test_a_ray_cluster_builds_the_collection_one_process_builds(tmp_path, cluster, chroma_url, tiny_settings):
    paths, distinct = sources(tmp_path / "src")
    cache = tmp_path / "shared-cache"
    embedder = load_embedder(tiny_settings)
    single, expected = single_process(tmp_path, paths, embedder, cache)
    store = ReferenceStore.open(server_client(chroma_url), "ray-equal", embedder, create=True)
    opened = open_sources(paths)
    shards_seen = []
    summary = index_on_ray(
        store, opened, tiny_settings, chroma_url, cache, RayIndexOptions(batch_size=3), on_shard=shards_seen.append
    )

    assert store.count() == distinct == single.count()
    assert_same_collection(store.collection, single.collection)
    assert (summary.added, summary.failed, summary.captions_cut) == (expected.added, 2, 1) == (distinct, 2, 1)
    assert len(summary.failures) == 2 and any("00000.tar#a3" in f for f in summary.failures)
    assert any("corrupt.png" in f and "not a readable image" in f for f in summary.failures)
    assert max(len(doc) for doc in store.collection.get(include=["documents"])["documents"]) <= MAX_CAPTION_CHARS
    ledger = ShardLedger(server_client(chroma_url), "ray-equal")
    keys = [source_key(s) for s in opened]
    assert ledger.done(keys) == set(keys) and summary.shards_done == 3
    reports = ledger.reports()
    assert sorted((r.added, r.failed) for r in reports.values()) == [(2, 0), (2, 1), (4, 1)]
    assert sorted(r.uri for r in shards_seen) == sorted(s.uri for s in opened)
    assert cache.resolve() in store.roots and (tmp_path / "src" / "photos").resolve() in store.roots

    again = index_on_ray(store, open_sources(paths), tiny_settings, chroma_url, cache, RayIndexOptions(batch_size=3))
    # The shards are skipped whole by the ledger; the folder is read again and its images skipped by id.
    assert (again.shards_skipped, again.added, again.skipped, again.failed) == (2, 0, 2, 1)
    assert store.count() == distinct


def test_a_worker_killed_mid_run_leaves_the_same_collection(tmp_path, cluster, chroma_url, tiny_settings):
    root = tmp_path / "src"
    root.mkdir()
    paths = []
    for s in range(4):
        paths.append(root / f"{s:05d}.tar")
        img2dataset_shard(
            paths[-1], [(f"k{i}", png((s * 60, i * 40, 7), fmt="JPEG"), f"image {s} {i}", None) for i in range(5)]
        )
    cache = tmp_path / "shared-cache"
    embedder = load_embedder(tiny_settings)
    single, _ = single_process(tmp_path, paths, embedder, cache)
    pids = tmp_path / "pids"
    pids.mkdir()

    def slow_reader(path: str):
        # Runs in the read tasks: says which process reads, and reads slowly enough to be killed mid-shard.
        (pids / str(os.getpid())).touch()
        for record in open_source(path):
            time.sleep(0.3)
            yield record

    store = ReferenceStore.open(server_client(chroma_url), "ray-killed", embedder, create=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["summary"] = index_on_ray(
                store, open_sources(paths), tiny_settings, chroma_url, cache, RayIndexOptions(batch_size=2),
                reader=slow_reader,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a failed run is rerun below
            outcome["error"] = error

    job = threading.Thread(target=run)
    job.start()
    deadline = time.time() + 120
    while not any(pids.iterdir()):
        assert time.time() < deadline and job.is_alive(), f"no reader started: {outcome}"
        time.sleep(0.05)
    victim = int(next(pids.iterdir()).name)
    assert victim != os.getpid() and job.is_alive()
    os.kill(victim, signal.SIGKILL)
    job.join(300)
    assert not job.is_alive()
    if "error" in outcome:  # the job may fail; a rerun must then finish it
        outcome["summary"] = index_on_ray(
            store, open_sources(paths), tiny_settings, chroma_url, cache, RayIndexOptions(batch_size=2)
        )
    summary = outcome["summary"]
    assert isinstance(summary, RayIndexSummary)
    assert store.count() == single.count() == 20
    assert_same_collection(store.collection, single.collection)
    ledger = ShardLedger(server_client(chroma_url), "ray-killed")
    keys = [source_key(s) for s in open_sources(paths)]
    assert ledger.done(keys) == set(keys)
    assert sum(r.added + r.skipped for r in ledger.reports().values()) >= 20


def test_a_second_copy_in_a_batch_is_skipped_and_the_first_decoded(tmp_path, chroma_url, tiny_settings):
    import pyarrow as pa

    from imagerag.tools.backends.indexer import DecodeAndPreprocess, input_size
    from imagerag.tools.backends.ray_indexer import decode_rows, read_rows

    shard = tmp_path / "dup.tar"
    img2dataset_shard(
        shard, [("a0", png("red", fmt="JPEG"), "red", None), ("a1", png("red", fmt="JPEG"), "again", None)]
    )
    embedder = load_embedder(tiny_settings)
    ReferenceStore.open(server_client(chroma_url), "ray-dup", embedder, create=True)
    rows = list(read_rows({"key": "k", "path": str(shard)}, open_source))
    decode = DecodeAndPreprocess(embedder.preprocess, input_size(embedder))
    out = decode_rows(pa.Table.from_pylist(rows), decode, chroma_url, "ray-dup", str(tmp_path / "cache")).to_pylist()
    assert [(r["status"], r["uri"].rpartition("#")[2]) for r in out[:2]] == [("fresh", "a0"), ("skipped", "a1")]
    assert (out[2]["status"], out[2]["count"]) == ("end", 2)
    assert out[0]["pixels"] and out[0]["source"].startswith(str(tmp_path / "cache")) and out[1]["source"] == ""
