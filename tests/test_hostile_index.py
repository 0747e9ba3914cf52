"""Hostile collections: huge captions, link loops and links out of the folder, huge images, reference paths.

Each test reproduces one case of issue 14 (bug 2, bug 3, risks 13 and 14, confined reference paths) or issue 23
(items 3, 5 and 7: nested JSON, files read whole, collection names, orientation, 16-bit images, transparency,
UTF-16 captions) on a few small files; a 144-megapixel PNG is written by hand (one bit per pixel, all zero) so it
stays 20 KB on disk, a 2 GB file is sparse.
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
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.tools.backends.indexer import DecodeAndPreprocess, _Fresh, index_folders, index_sources
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.sources import (
    MAX_CAPTION_CHARS,
    MAX_IMAGE_FILE_BYTES,
    FolderSource,
    SourceRecord,
    bound_caption,
)
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


# Issue 23 item 3: a deeply nested JSON sidecar aborted the whole index with a RecursionError.


def test_a_deeply_nested_json_sidecar_or_member_costs_the_caption_not_the_image(tmp_path, store, caplog):
    nested = b"[" * 200_000 + b"]" * 200_000  # deeper than json's parser can go: RecursionError
    folder = tmp_path / "nested"
    folder.mkdir()
    (folder / "deep.png").write_bytes(png("red"))
    (folder / "deep.json").write_bytes(nested)
    (folder / "fine.png").write_bytes(png("green"))
    (folder / "fine.json").write_text(json.dumps({"caption": "a green square"}))
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("0.png", png("blue")), ("0.json", nested)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with caplog.at_level(logging.WARNING):
        summary = index_sources(store, [folder, shard], cache_dir=tmp_path / "cache")

    assert (summary.added, summary.failed, summary.captions_lost) == (3, 0, 2)
    assert "2 unusable caption file(s)" in summary.line()
    assert sorted(doc for doc, _ in rows(store).values()) == ["0", "a green square", "deep"]
    assert "deep.json: JSON nested too deeply to parse" in logged(caplog)
    assert "0.json: JSON nested too deeply to parse" in logged(caplog)


# Issue 23 item 5: files were read whole before their size was checked.


def test_an_image_file_over_the_size_limit_is_refused_from_its_size_without_being_read(tmp_path, store, caplog):
    folder = tmp_path / "sparse"
    folder.mkdir()
    with open(folder / "huge.png", "wb") as handle:
        handle.truncate(2 << 30)  # 2 GB of holes: no disk used, 2 GB of memory if read
    (folder / "small.png").write_bytes(png("red"))

    tracemalloc.start()
    try:
        records = list(FolderSource(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"listing the folder took {peak:,} bytes: the huge file was read"
    huge = next(r for r in records if r.uri.endswith("huge.png"))
    assert huge.data == b"" and f"over the limit of {MAX_IMAGE_FILE_BYTES:,} for an image file" in huge.error
    small = next(r for r in records if r.uri.endswith("small.png"))
    assert small.id == content_id(png("red"))  # hashed as it streamed, the same id as hashing the whole

    with caplog.at_level(logging.WARNING):
        summary = index_sources(store, [folder])
    assert (summary.added, summary.failed) == (1, 1)
    assert "huge.png is 2,147,483,648 bytes, over the limit" in logged(caplog)


def test_tar_members_and_parquet_cells_over_the_size_limit_are_refused_unread(tmp_path, store, monkeypatch):
    from imagerag.tools.backends import sources

    monkeypatch.setattr(sources, "MAX_IMAGE_FILE_BYTES", 2_000)
    big, small = png("red", (200, 200)), png("blue")
    big = big + b"\0" * max(0, 2_001 - len(big))  # PNG ignores what follows its end chunk
    assert len(big) > 2_000 > len(small)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("0.png", big), ("0.txt", b"big"), ("0.npy", b"\0" * 50_000), ("1.png", small)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reads: list[int] = []
    real_extract = tarfile.TarFile.extractfile

    def extractfile(self, member):
        reads.append(member.size)
        return real_extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    records = list(sources.TarShardSource(shard))
    assert sorted(reads) == sorted([len(b"big"), len(small)])  # neither the big image nor the .npy was read
    assert [r.error is not None for r in records] == [True, False]
    assert "over the limit of 2,000 for an image file: not read" in records[0].error

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [big, small], "caption": ["big", "small"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    summary = index_sources(store, [tmp_path / "rows.parquet", shard], cache_dir=tmp_path / "cache")
    assert (summary.added, summary.failed) == (1, 2)  # the small image once (both copies share an id)

    # A file that grows past the limit after its size was checked is cut off while it is read.
    with pytest.raises(sources.SourceError, match="over the limit of 2,000 bytes"):
        sources.read_bounded(io.BytesIO(b"\0" * 5_000), "grown.png")


MEMORY_PROBE = """
import resource, sys
from imagerag.agent.config import Settings
from imagerag.tools.backends.indexer import index_sources
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
settings = Settings(profile="tiny", data_dir=sys.argv[2])
store = ReferenceStore.open(chroma_client(sys.argv[3]), "memory", load_embedder(settings), create=True)
summary = index_sources(store, [sys.argv[1]], num_workers=0)
print(summary.added, summary.failed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_indexing_a_folder_with_a_2_gb_sparse_file_costs_no_more_memory_than_without_it(tmp_path, data_dir):
    import subprocess
    import sys

    def peak_kb(folder: Path, db: Path) -> tuple[int, int, int]:
        args = [sys.executable, "-c", MEMORY_PROBE, str(folder), str(data_dir), str(db)]
        done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
        added, failed, peak = map(int, done.stdout.split()[-3:])
        return added, failed, peak

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.png").write_bytes(png((i * 12, 40, 90), (64, 64)))
    without = peak_kb(folder, tmp_path / "db1")
    with open(folder / "huge.png", "wb") as handle:
        handle.truncate(2 << 30)
    with_huge = peak_kb(folder, tmp_path / "db2")
    assert without[:2] == (20, 0) and with_huge[:2] == (20, 1)
    extra_mb = (with_huge[2] - without[2]) / 1024
    print(f"peak RSS without huge.png {without[2] / 1024:.0f} MB, with it {with_huge[2] / 1024:.0f} MB")
    assert extra_mb < 200, f"the 2 GB file cost {extra_mb:.0f} MB of memory"


# Issue 23 item 7: collection names, EXIF orientation, 16-bit images, transparency, UTF-16 captions.


@pytest.mark.parametrize("name", ["../../x", "a" * 10_000, "x", "ab..cd", "192.168.0.1", "-leading", "sp ace"])
def test_a_collection_name_chromadb_would_refuse_is_a_usage_error(tmp_path, data_dir, name):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "red.png").write_bytes(png("red"))
    for command in (["index", str(folder)], ["search", "red"]):
        result = runner.invoke(app, [*command, "--profile", "tiny", "--data-dir", str(data_dir), "--collection", name])
        assert result.exit_code == 2, result.output
        said = " ".join(result.stderr.split())
        assert "is not allowed: use 3 to 63 characters" in said and "Traceback" not in result.output
        assert len(result.stderr) < 1_000  # a 10,000-character name is shown cut
    assert not (tmp_path / "x").exists()


def captured_images(records: list[SourceRecord], background=(255, 255, 255)) -> list[Image.Image]:
    """The images the indexer's collate hands to the CLIP's preprocessing, decoded from `records`."""
    seen: list[Image.Image] = []

    def preprocess(image: Image.Image) -> torch.Tensor:
        seen.append(image.copy())
        return torch.zeros(3, 4, 4)

    batch = DecodeAndPreprocess(preprocess, background=background)([_Fresh(record.id, record) for record in records])
    assert not batch.failed, batch.failed
    return seen


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> SourceRecord:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return SourceRecord(buffer.getvalue(), "", "memory")


def test_images_are_indexed_upright_16_bit_scaled_and_transparency_on_a_background():
    # EXIF orientation 6: the camera was turned, the viewer turns the 20x10 frame clockwise to 10x20.
    frame = Image.new("RGB", (20, 10), "blue")
    frame.paste((255, 0, 0), (0, 0, 10, 10))  # red on the left: at the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6
    grey = Image.fromarray(np.full((8, 8), 32_896, np.uint16))  # mid-grey in 16 bits
    assert grey.mode == "I;16"
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 128))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0] * 256)
    records = [
        encoded(frame, "JPEG", exif=exif.tobytes(), quality=95),
        encoded(grey),
        encoded(clear),
        encoded(half),
        encoded(palette, "GIF", transparency=0),
    ]
    assert Image.open(io.BytesIO(records[1].data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL's own

    upright, grey_seen, clear_seen, half_seen, gif_seen = captured_images(records)
    assert upright.size == (10, 20)
    top, bottom = upright.getpixel((5, 2)), upright.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert grey_seen.mode == "RGB" and grey_seen.getpixel((3, 3)) == (128, 128, 128)
    assert clear_seen.getpixel((0, 0)) == (255, 255, 255)  # white by default, not the hidden red
    assert half_seen.getpixel((0, 0)) == (127, 127, 255)
    assert gif_seen.getpixel((0, 0)) == (255, 255, 255)

    (on_black,) = captured_images([records[2]], background=(0, 0, 0))
    assert on_black.getpixel((0, 0)) == (0, 0, 0)


def test_background_is_a_colour_checked_on_the_command_line(tmp_path, data_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "clear.png").write_bytes(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0))).data)
    base = ["index", str(folder), "--profile", "tiny", "--data-dir", str(data_dir), "--collection", "backgrounds"]
    refused = runner.invoke(app, [*base, "--background", "not-a-colour"])
    assert refused.exit_code == 2 and "is not a colour" in refused.stderr
    assert runner.invoke(app, [*base, "--background", "#102030"]).exit_code == 0


def test_utf16_and_utf8_bom_caption_files_are_decoded(tmp_path, store):
    folder = tmp_path / "captions"
    folder.mkdir()
    texts = {"utf-16": "ein rotes Quadrat ☂", "utf-32": "un carré bleu", "utf-8-sig": "a green square"}
    for n, (encoding, text) in enumerate(texts.items()):
        (folder / f"{n}.png").write_bytes(png((n * 80, 20, 20)))
        (folder / f"{n}.txt").write_bytes(text.encode(encoding))  # each writes its byte order mark
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k.png", png("purple")), ("k.txt", "une image violette".encode("utf-16"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index_sources(store, [folder, shard], cache_dir=tmp_path / "cache")
    assert sorted(doc for doc, _ in rows(store).values()) == sorted([*texts.values(), "une image violette"])
