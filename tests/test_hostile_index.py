"""Hostile collections: huge captions, link loops and links out of the folder, huge images, reference paths.

Each test reproduces one case of issue 14 (bug 2, bug 3, risks 13 and 14, confined reference paths) on a few
small files; a 144-megapixel PNG is written by hand (one bit per pixel, all zero) so it stays 20 KB on disk.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.tools.backends.indexer import index_folders, index_sources
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.sources import MAX_CAPTION_CHARS, FolderSource, bound_caption
from imagerag.tools.backends.store import (
    MAX_IMAGE_PIXELS,
    ROOTS_KEY,
    ImageTooLarge,
    ReferenceRefused,
    ReferenceStore,
    StoreError,
    chroma_client,
    model_metadata,
    reference_cache,
)
from imagerag.tools.files import content_id
from imagerag.tools.types import RetrievalHit

runner = CliRunner()


def png(colour: str | tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(path: Path, width: int = 12_000, height: int = 12_000) -> Path:
    """A valid, fully decodable black PNG of width x height pixels, one bit each: compressed, about 20 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def store(tmp_path, tiny_settings) -> ReferenceStore:
    return ReferenceStore.open(chroma_client(tmp_path / "db"), "hostile", load_embedder(tiny_settings), create=True)


def rows(store: ReferenceStore) -> dict[str, tuple[str, dict]]:
    got = store.collection.get(include=["documents", "metadatas"])
    return {i: (doc, meta) for i, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return " ".join(r.getMessage() for r in caplog.records)


def hit_for(path: Path) -> RetrievalHit:
    return RetrievalHit(id="x", caption="", similarity=1.0, source=str(path))


# Bug 2: caption files stored whole.


def test_a_caption_is_cut_at_a_word_boundary_and_a_short_one_left_alone():
    assert bound_caption("a red square") == "a red square"
    cut = bound_caption("word " * 1000)
    assert len(cut) <= MAX_CAPTION_CHARS and cut.endswith("word…")
    assert len(bound_caption("x" * 5000)) == MAX_CAPTION_CHARS  # no space to cut at: cut mid-word, not lost
    exact = "a" * 99 + " " + "b" * 900  # the word before the cut is whole: kept
    assert bound_caption(exact + " tail", 101) == "a" * 99 + "…"


def test_a_huge_caption_sidecar_is_read_bounded_and_indexed_cut_counted_and_logged(tmp_path, store, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "big.png").write_bytes(png("red"))
    words = "a red square on a white ground " * 700_000  # 22 MB, as in the issue
    (folder / "big.txt").write_text(words)
    (folder / "meta.png").write_bytes(png("blue"))
    (folder / "meta.json").write_text(json.dumps({"caption": "a blue square " * 400_000}))  # 5.6 MB of JSON
    (folder / "fine.png").write_bytes(png("green"))
    (folder / "fine.txt").write_text("a green square")

    tracemalloc.start()
    try:
        list(FolderSource(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_500_000, f"reading three sidecars took {peak:,} bytes: a caption file was read whole"

    with caplog.at_level(logging.WARNING):
        summary = index_sources(store, [folder])
    assert (summary.added, summary.failed, summary.captions_cut) == (3, 0, 1)
    assert f"1 caption(s) cut to {MAX_CAPTION_CHARS} characters" in summary.line()
    captions = {meta["source"]: doc for doc, meta in rows(store).values()}
    big = captions[str((folder / "big.png").resolve())]
    assert len(big) <= MAX_CAPTION_CHARS and big.endswith("…") and words.startswith(big[:-1]) and big[-2] != " "
    assert words[len(big) - 1] == " "  # cut where a word ended
    assert captions[str((folder / "meta.png").resolve())] == "meta"  # JSON too large to parse: the file name
    assert captions[str((folder / "fine.png").resolve())] == "a green square"
    assert f"big.png is over {MAX_CAPTION_CHARS} characters: cut at a word boundary" in logged(caplog)
    assert "meta.json: over" in logged(caplog)


def test_a_huge_caption_in_a_webdataset_shard_is_cut_too(tmp_path, store):
    shard = tmp_path / "00000.tar"
    caption = ("a red photo " * 500_000).encode()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("0.jpg", png("red")), ("0.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = index_sources(store, [shard], cache_dir=tmp_path / "cache")
    assert (summary.added, summary.captions_cut) == (1, 1)
    assert all(len(doc) <= MAX_CAPTION_CHARS for doc, _ in rows(store).values())


def test_a_huge_caption_already_in_a_collection_comes_back_bounded(tmp_path, store):
    # As a collection indexed before captions were limited holds it (add itself does not cut).
    store.add(["old"], np.ones((1, store.embedder.info.dim)), ["a red square " * 100_000], [str(tmp_path / "x.png")])
    (hit,) = store.search("a red square", k=1)
    assert len(hit.caption) <= MAX_CAPTION_CHARS and hit.caption.startswith("a red square a red")


# Bug 3: a link loop aborted the whole folder.


def test_a_looping_or_broken_link_is_skipped_counted_as_failed_and_logged_through_the_cli(tmp_path, data_dir, caplog):
    folder = tmp_path / "fifteen"
    folder.mkdir()
    for i in range(13):
        (folder / f"img{i:02d}.png").write_bytes(png((i * 19, 40, 200 - i * 9)))
    (folder / "self.png").symlink_to(folder / "self.png")  # points to itself
    (folder / "ping.png").symlink_to(folder / "pong.png")  # a loop of two
    (folder / "pong.png").symlink_to(folder / "ping.png")
    (folder / "gone.png").symlink_to(folder / "deleted.png")  # broken
    args = ["index", str(folder), "--profile", "tiny", "--data-dir", str(data_dir), "--collection", "hostile-loop"]
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "added 13, skipped 0, failed 4" in result.stderr
    for name in ("self.png", "ping.png", "pong.png", "gone.png"):
        assert f"{name}: a broken link or a link loop" in logged(caplog)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_with_an_image_name_is_refused_not_read_for_ever(tmp_path, store):
    folder = tmp_path / "pipes"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "pipe.txt")
    (folder / "ok.png").write_bytes(png("red"))
    (folder / "ok.txt").symlink_to(folder / "pipe.txt")  # a caption that is a pipe: ignored, not waited on
    summary = index_sources(store, [folder])
    assert (summary.added, summary.failed) == (1, 1)
    assert [doc for doc, _ in rows(store).values()] == ["ok"]


# Risk 13: a 144-megapixel image decoded in full.


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images PIL decodes (ImageFile.load), to show that a refused one never is."""
    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's warning at 89 MP, before ours
def test_an_image_over_the_pixel_limit_fails_from_its_header_without_being_decoded(
    tmp_path, store, caplog, decoded_sizes
):
    folder = tmp_path / "huge"
    folder.mkdir()
    huge = huge_png(folder / "panorama.png")
    assert huge.stat().st_size < 100_000
    (folder / "small.png").write_bytes(png("red"))
    pil_limit = Image.MAX_IMAGE_PIXELS

    with caplog.at_level(logging.WARNING):
        summary = index_sources(store, [folder])

    assert (summary.added, summary.failed) == (1, 1)
    assert (12_000, 12_000) not in decoded_sizes
    assert f"panorama.png: the image is 12000x12000 = 144,000,000 pixels, over the limit of {MAX_IMAGE_PIXELS:,}" in (
        logged(caplog)
    )
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # PIL's global limit is left alone

    # A reference image the agent opens later is held to the same limit (the folder is an indexed one).
    with pytest.raises(ImageTooLarge, match=r"12000x12000 = 144,000,000 pixels, over the limit of 40,000,000"):
        ReferenceStore.load_image(hit_for(huge))
    assert (12_000, 12_000) not in decoded_sizes
    assert ReferenceStore.load_image(hit_for(folder / "small.png")).size == (16, 16)


# Risk 14: a link out of the indexed folder was indexed.


def test_links_are_followed_inside_the_folder_only_unless_asked(tmp_path, store, caplog):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png("purple"))
    (outside / "secret.txt").write_text("the contents of a private file")
    folder = tmp_path / "photos"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "kept.bin").write_bytes(png("red"))
    (folder / "inside.png").symlink_to(folder / "blobs" / "kept.bin")  # a link that stays inside: followed
    (folder / "inside.txt").write_text("a red square")
    (folder / "leak.png").symlink_to(outside / "secret.png")
    (folder / "plain.png").write_bytes(png("blue"))
    (folder / "plain.txt").symlink_to(outside / "secret.txt")  # a caption that leaks: not read

    with caplog.at_level(logging.WARNING):
        summary = index_folders(store, [folder])

    assert (summary.added, summary.failed) == (2, 1)  # a refused link counts as failed
    stored = {meta["source"]: doc for doc, meta in rows(store).values()}
    assert stored == {
        str((folder / "blobs" / "kept.bin").resolve()): "a red square",
        str((folder / "plain.png").resolve()): "plain",
    }
    text = logged(caplog)
    assert "leak.png: a link to" in text and "outside the indexed folder" in text
    assert "follow_external_links" in text and "secret.txt" in text

    asked = index_folders(store, [folder], follow_external_links=True)
    assert (asked.added, asked.skipped, asked.failed) == (1, 2, 0)
    secret = str((outside / "secret.png").resolve())
    assert secret in {meta["source"] for _, meta in rows(store).values()}
    assert ReferenceStore.load_image(hit_for(outside / "secret.png")).size == (16, 16)  # its folder was recorded
    assert json.loads(store.collection.metadata[ROOTS_KEY]) == sorted([str(folder.resolve()), str(outside.resolve())])


# Reference paths confined to the indexed folders and the reference cache.


def test_a_reference_outside_the_indexed_folders_is_refused(tmp_path, store):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "red.png").write_bytes(png("red"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "passwd.png").write_bytes(png("purple"))
    index_sources(store, [folder])
    assert json.loads(store.collection.metadata[ROOTS_KEY]) == [str(folder.resolve())]

    # A row naming another file, as a tampered database or an older indexer could hold.
    store.add(["tampered"], np.ones((1, store.embedder.info.dim)), ["a red square"], [str(elsewhere / "passwd.png")])
    hits = {h.id: h for h in store.search("a red square", k=2)}
    with pytest.raises(ReferenceRefused, match="lies outside the folders its collection was indexed from"):
        ReferenceStore.load_image(hits["tampered"])
    (folder / "way-out.png").symlink_to(elsewhere / "passwd.png")
    with pytest.raises(ReferenceRefused):  # a link inside the folder does not open the way out
        ReferenceStore.load_image(hit_for(folder / "way-out.png"))
    assert ReferenceStore.load_image(hits[content_id(png("red"))]).size == (16, 16)

    cached = reference_cache(tmp_path / "db") / "ab" / "upload.png"  # the data folder's reference cache
    cached.parent.mkdir(parents=True)
    cached.write_bytes(png("green"))
    assert ReferenceStore.load_image(hit_for(cached)).size == (16, 16)


def test_a_collection_that_records_no_folders_refuses_its_references_until_indexed_again(
    tmp_path, tiny_settings, caplog
):
    embedder = load_embedder(tiny_settings)
    folder = tmp_path / "legacy-photos"
    folder.mkdir()
    (folder / "red.png").write_bytes(png("red"))
    client = chroma_client(tmp_path / "db")
    # As an older imagerag built it: the model recorded, the folders not.
    old = client.create_collection(
        "legacy", embedding_function=None, metadata={"hnsw:space": "cosine", **model_metadata(embedder.info)}
    )
    source = str((folder / "red.png").resolve())
    old.add(ids=[content_id(png("red"))], embeddings=[[1.0] * embedder.info.dim], documents=["red"],
            metadatas=[{"source": source}])  # fmt: skip

    with caplog.at_level(logging.WARNING):
        store = ReferenceStore.open(client, "legacy", embedder)
    assert store.roots is None and "records no indexed folders" in logged(caplog)
    (hit,) = store.search("red", k=1)
    with pytest.raises(ReferenceRefused, match="run `imagerag index` on its folders again"):
        ReferenceStore.load_image(hit)

    again = index_sources(store, [folder])  # skips what is indexed, records the folder
    assert (again.added, again.skipped) == (0, 1)
    reopened = ReferenceStore.open(chroma_client(tmp_path / "db"), "legacy", embedder)
    assert reopened.roots == [folder.resolve()]
    assert reopened.collection.configuration_json["hnsw"]["space"] == "cosine"  # still a cosine index
    assert ReferenceStore.load_image(hit).size == (16, 16)


def test_folders_recorded_in_a_form_that_cannot_be_read_are_a_clear_error(tmp_path, tiny_settings):
    embedder = load_embedder(tiny_settings)
    client = chroma_client(tmp_path / "db")
    client.create_collection(
        "odd", embedding_function=None, metadata={**model_metadata(embedder.info), ROOTS_KEY: '["relative/path"]'}
    )
    with pytest.raises(StoreError, match="not a JSON list of absolute paths: re-index"):
        ReferenceStore.open(client, "odd", embedder)
