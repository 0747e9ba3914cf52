"""Indexing real collections: every source format, resume after a crash, corrupt files, model mismatch."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.tools.backends.clip import ClipEmbedder, EmbeddingModelInfo
from imagerag.tools.backends.indexer import IndexSummary, index_folders, index_sources
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.sources import SourceError
from imagerag.tools.backends.store import ReferenceStore, StoreError, chroma_client, model_metadata
from imagerag.tools.files import content_id

runner = CliRunner()


def png(colour, size=(16, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def embedder(tiny_settings):
    return load_embedder(tiny_settings)


@pytest.fixture
def store(tmp_path, embedder) -> ReferenceStore:
    return ReferenceStore.open(chroma_client(tmp_path / "db"), "refs", embedder, create=True)


def everything(store: ReferenceStore) -> dict[str, tuple[str, dict]]:
    got = store.collection.get(include=["documents", "metadatas"])
    return {i: (doc, meta) for i, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}


def test_a_folder_is_indexed_recursively_with_sidecar_captions(tmp_path, store):
    root = tmp_path / "photos"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "a.png").write_bytes(png("red"))
    (root / "a.txt").write_text("a red thing\n")
    (root / "deep" / "b.jpg").write_bytes(png("blue", fmt="JPEG"))
    (root / "deep" / "b.json").write_text(json.dumps({"caption": "a blue thing", "width": 16}))
    (root / "deep" / "er" / "green_square.png").write_bytes(png("green"))
    (root / "deep" / "er" / "notes.md").write_text("not an image, not even looked at")

    summary = index_sources(store, [root], batch_size=2)

    assert (summary.added, summary.skipped, summary.failed) == (3, 0, 0)
    rows = everything(store)
    assert {doc for doc, _ in rows.values()} == {"a red thing", "a blue thing", "green square"}
    assert rows[content_id(png("red"))][1]["source"] == str((root / "a.png").resolve())  # the file itself, no copy


def img2dataset_shard(path: Path, samples: list[tuple[str, bytes, str | None, dict | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta in samples:
            members = [(f"{key}.jpg", image)]
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            if meta is not None:
                members.append((f"{key}.json", json.dumps(meta).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_webdataset_shard_is_indexed_and_its_images_cached_for_the_agent(tmp_path, store, workers):
    shard = tmp_path / "00000.tar"
    img2dataset_shard(
        shard,
        [
            (
                "000000000",
                png("red", fmt="JPEG"),
                "a red photo",
                {"url": "http://x/0.jpg", "caption": "ignored: txt wins"},
            ),
            ("000000001", png("blue", fmt="JPEG"), None, {"caption": "a blue photo"}),
            ("000000002", b"\xff\xd8 truncated jpeg", "broken", {}),
            ("000000003", png((0, 200, 0), fmt="JPEG"), "a green photo", None),
        ],
    )
    cache = tmp_path / "refs-cache"

    summary = index_sources(store, [shard], batch_size=2, cache_dir=cache, num_workers=workers)

    assert (summary.added, summary.skipped, summary.failed) == (3, 0, 1)
    rows = everything(store)
    assert sorted(doc for doc, _ in rows.values()) == ["a blue photo", "a green photo", "a red photo"]
    for image_id, (_, meta) in rows.items():
        assert Path(meta["source"]).is_relative_to(cache.resolve()) and Path(meta["source"]).suffix == ".jpg"
        assert meta["origin"].startswith(f"{shard.resolve()}#0000000")
        assert content_id(Path(meta["source"]).read_bytes()) == image_id  # the cached copy is the very image
    hit = store.search("a red photo", k=1)[0]
    assert ReferenceStore.load_image(hit).size == (16, 16)
    assert not list(cache.rglob(".part-*"))  # no half-written copies


def test_a_parquet_file_as_hugging_face_datasets_exports_it(tmp_path, store):
    table = pa.table(
        {
            "image": [
                {"bytes": png("red"), "path": "r.png"},
                {"bytes": png("blue"), "path": "b.png"},
                {"bytes": None, "path": "gone.png"},
            ],
            "text": ["a red square", "a blue square", "nothing"],
            "id": [1, 2, 3],
        }
    )
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    summary = index_sources(store, [tmp_path / "train-00000-of-00001.parquet"], cache_dir=tmp_path / "cache")
    assert (summary.added, summary.failed) == (2, 1)
    rows = everything(store)
    assert {doc for doc, _ in rows.values()} == {"a red square", "a blue square"}
    assert all(meta["source"].endswith(".png") and Path(meta["source"]).exists() for _, meta in rows.values())


def test_a_parquet_file_with_named_binary_columns_through_the_cli(tmp_path, data_dir):
    pq.write_table(
        pa.table({"jpg_bytes": [png("red"), png("blue")], "alt": ["red one", "blue one"]}), tmp_path / "x.parquet"
    )
    args = [
        "index",
        str(tmp_path / "x.parquet"),
        "--profile",
        "tiny",
        "--data-dir",
        str(data_dir),
        "--collection",
        "parquet-cli",
    ]
    first = runner.invoke(app, args + ["--caption-column", "alt"])
    assert first.exit_code == 0, first.output
    assert "added 2, skipped 0, failed 0" in first.stderr and "images/s" in first.stderr
    second = runner.invoke(app, args + ["--caption-column", "alt"])
    assert "added 0, skipped 2, failed 0" in second.stderr
    missing = runner.invoke(app, args + ["--caption-column", "nope"])
    assert missing.exit_code == 2 and "has no column 'nope'" in " ".join(missing.stderr.split())


def test_an_interrupted_run_resumes_where_it_stopped_without_duplicates(tmp_path, store, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        (folder / f"img{i:02d}.png").write_bytes(png((i * 25, 255 - i * 25, 7)))
    real_add, writes = store.add, []

    def crash_on_third_write(*args, **kwargs):
        if len(writes) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C (or the machine died) mid-run
        writes.append(args[0])
        real_add(*args, **kwargs)

    monkeypatch.setattr(store, "add", crash_on_third_write)
    summary = IndexSummary()
    with pytest.raises(KeyboardInterrupt):
        index_sources(store, [folder], batch_size=3, summary=summary)
    assert summary.added == 6 and store.count() == 6  # two whole batches, nothing of the third

    monkeypatch.setattr(store, "add", real_add)
    resumed = index_sources(store, [folder], batch_size=3)
    assert (resumed.added, resumed.skipped, resumed.failed) == (4, 6, 0)
    ids = store.collection.get(include=[])["ids"]
    assert len(ids) == len(set(ids)) == 10
    assert set(ids) == {content_id((folder / f"img{i:02d}.png").read_bytes()) for i in range(10)}


def test_corrupt_and_non_image_files_are_skipped_counted_and_logged(tmp_path, store, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = png("red", size=(64, 64))
    (folder / "good.png").write_bytes(good)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("I am a text file with an image's name")
    (folder / "empty.webp").write_bytes(b"")
    (folder / "also-good.png").write_bytes(png("blue"))
    with caplog.at_level(logging.WARNING, logger="tools.backends.indexer"):
        summary = index_folders(store, [folder], batch_size=2)
    assert (summary.added, summary.skipped, summary.failed) == (2, 0, 3)
    assert store.count() == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in logged for name in ("truncated.png", "text.jpg", "empty.webp"))


def test_a_collection_refuses_another_embedding_model(tmp_path, store, embedder):
    index_sources(store, [tmp_path], batch_size=2)  # an empty folder is fine: nothing to add
    other = ClipEmbedder(
        embedder.model,
        embedder.preprocess,
        embedder.tokenizer,
        EmbeddingModelInfo(name="ViT-B-32", pretrained="openai", dim=512),
        "cpu",
    )
    client = chroma_client(tmp_path / "db")
    for create in (False, True):  # searching it, or indexing more into it
        with pytest.raises(
            StoreError, match=r"was embedded with local-dir .* but the current model is ViT-B-32 \(openai, dim 512\)"
        ):
            ReferenceStore.open(client, "refs", other, create=create)
    client.create_collection("foreign", embedding_function=None)
    with pytest.raises(StoreError, match="records no embedding model"):
        ReferenceStore.open(client, "foreign", embedder)


def test_unknown_sources_are_refused_before_any_work(tmp_path, store):
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(SourceError, match="cannot index"):
        index_sources(store, [tmp_path / "notes.csv"])
    with pytest.raises(SourceError, match="no image folder at"):
        index_sources(store, [tmp_path / "absent"])
    img2dataset_shard(tmp_path / "s.tar", [("0", png("red"), "x", None)])
    with pytest.raises(SourceError, match="needs a cache folder"):
        index_sources(store, [tmp_path / "s.tar"])
    assert store.count() == 0


@pytest.fixture
def chroma_server(tmp_path):
    """A real Chroma server on loopback, for the --chroma-url path (HttpClient)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chroma = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
    server = subprocess.Popen(
        [chroma, "run", "--path", str(tmp_path / "server-db"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the chroma server did not start")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_index_and_search_against_a_chroma_server(tmp_path, data_dir, chroma_server, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for colour in ("red", "blue"):
        (folder / f"{colour}.png").write_bytes(png(colour))
    common = ["--profile", "tiny", "--data-dir", str(data_dir), "--collection", "served", "--chroma-url", chroma_server]
    indexed = runner.invoke(app, ["index", str(folder), *common])
    assert indexed.exit_code == 0, indexed.output
    assert "added 2, skipped 0, failed 0" in indexed.stderr
    assert "served" not in [
        c.name for c in chroma_client(data_dir).list_collections()
    ]  # nothing went to the local folder
    monkeypatch.chdir(tmp_path)
    found = runner.invoke(app, ["search", "red", "-k", "2", *common])
    assert found.exit_code == 0 and "2 hit(s)" in found.stdout


def test_a_truncated_shard_keeps_what_was_read_and_counts_the_rest_as_failed(tmp_path, store):
    shard = tmp_path / "cut.tar"
    img2dataset_shard(shard, [(f"{i:04d}", png((i * 60, 0, 0), size=(64, 64)), f"image {i}", None) for i in range(4)])
    with tarfile.open(shard) as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    shard.write_bytes(
        shard.read_bytes()[: last_image.offset_data + 100]
    )  # a download that stopped inside the last image
    summary = index_sources(store, [shard], cache_dir=tmp_path / "cache")
    assert (summary.added, summary.failed) == (3, 1)


def test_a_local_profile_rebuilds_its_own_collection_embedded_by_another_version_of_its_clip(tmp_path, caplog):
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.loading import open_store

    settings = Settings(profile="tiny", data_dir=tmp_path)
    count = open_store(settings).count()
    collection = chroma_client(tmp_path).get_collection("tiny")
    stale = {k: v for k, v in (collection.metadata or {}).items() if not k.startswith("hnsw:")}
    collection.modify(
        metadata={**stale, **model_metadata(EmbeddingModelInfo(name="local-dir", pretrained="sha256:0", dim=64))}
    )
    with pytest.raises(StoreError, match="was embedded with"):
        ReferenceStore.open(chroma_client(tmp_path), "tiny", load_embedder(settings))
    rebuilt = open_store(settings)  # derived data of the profile's own corpus: indexed again, not refused
    assert rebuilt.count() == count and "re-indexing tiny" in caplog.text
