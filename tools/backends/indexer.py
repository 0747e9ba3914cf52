"""Index image collections into a reference collection: content-hash ids, batched atomic writes, resumable.

The pipeline, per batch of `batch_size` records:
1. read (main process): a source reader yields raw bytes, caption and origin; the id is the bytes' hash.
   Records the collection already holds (or that an earlier batch of this run is writing) are skipped here,
   before any decoding, so a re-run over a finished collection costs one hash and one lookup per image. A file
   the reader refused (a broken or looping link, a link out of its folder, a file over MAX_IMAGE_FILE_BYTES) is
   counted as failed and logged; a caption over MAX_CAPTION_CHARS is cut at a word boundary, and a caption file
   that cannot be used (broken or too deeply nested JSON) is replaced by the file name; both are counted and
   logged, and the image is still indexed. A batch holds at most MAX_BATCH_BYTES of image bytes.
2. decode + preprocess: a torch DataLoader's collate turns the fresh records into one pixel tensor; a
   corrupt or non-image file, or one over MAX_IMAGE_PIXELS (read from its header, before decoding), is counted
   and logged there, never fatal. Each image is turned upright (EXIF orientation), 16-bit greys are scaled to 8
   bits and transparency is composited over a background (white unless asked) before the CLIP sees it. With
   num_workers=1 this runs in a worker process while the main process embeds the previous batch.
3. embed + write (main process): one open_clip forward, then one upsert for the whole batch. Shard and
   parquet members are first copied to a content-addressed cache (`cache_dir/ab/abcd....jpg`) so the stored
   source is a file the agent can open; the copy is written before the row, never the other way round.

The collection records the folders it was indexed from (the cache folder for shards and parquet files) before
any row is written, so the agent can later refuse a reference from anywhere else (store.ReferenceStore.load_image).

Resume: a killed run left whole batches in the collection (an upsert commits all or nothing) and at most
orphan cache files, which the next run reuses by name; re-running skips every finished batch by id. A full disk
stops the run the same way, with DiskFull saying so.

Writers of an embedded database hold store.writer_lock around opening and indexing (the CLI and the local profiles'
first use do); `repair_collection` rebuilds a collection chromadb can no longer read from the folders it records.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset, Sampler

from imagerag.tools.backends.clip import ClipEmbedder
from imagerag.tools.backends.sources import (
    MAX_CAPTION_CHARS,
    FolderSource,
    Source,
    SourceError,
    SourceRecord,
    bound_caption,
    open_source,
)
from imagerag.tools.backends.store import (
    WHITE,
    DiskFull,
    ImageTooLarge,
    ReferenceStore,
    StoreError,
    check_model,
    check_pixels,
    disk_full,
    model_metadata,
    reference_cache,
    to_rgb,
)
from imagerag.tools.config import check_collection_name
from imagerag.tools.files import atomic_write

if TYPE_CHECKING:
    import chromadb

log = logging.getLogger(__name__)

# Image bytes one batch holds at most (a batch is also cut at batch_size records): 64 large files must not sit in
# memory at once, in the main process and again in a worker.
MAX_BATCH_BYTES = 256 << 20
REPAIR_OF_KEY = "imagerag_repair_of"  # metadata of a collection being built by `index --repair`: the one it replaces


class IndexSummary(BaseModel):
    added: int = 0
    skipped: int = 0
    failed: int = 0
    captions_cut: int = 0  # captions over MAX_CAPTION_CHARS, indexed cut at a word boundary
    captions_lost: int = 0  # caption files that could not be used (broken JSON, ...): the file name stands in
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        return self.added + self.skipped + self.failed

    def line(self) -> str:
        rate = self.seen / self.seconds if self.seconds > 0 else 0.0
        cut = f", {self.captions_cut} caption(s) cut to {MAX_CAPTION_CHARS} characters" if self.captions_cut else ""
        lost = f", {self.captions_lost} unusable caption file(s) (named by file instead)" if self.captions_lost else ""
        return (
            f"added {self.added}, skipped {self.skipped}, failed {self.failed}{cut}{lost} in {self.seconds:.1f} s "
            f"({rate:.1f} images/s)"
        )


@dataclass(frozen=True)
class _Fresh:
    id: str
    record: SourceRecord


@dataclass
class _Batch:
    fresh: list[_Fresh]
    pixels: torch.Tensor | None
    formats: list[str]
    failed: list[tuple[_Fresh, str]] = field(default_factory=list)  # with why, in words


class _Passthrough(Dataset):
    """The sampler already hands over the records themselves; decoding happens in the collate."""

    def __getitem__(self, item: _Fresh) -> _Fresh:
        return item


class _FreshBatches(Sampler):
    """Walks the sources in the main process and yields batches of records the collection lacks.

    DataLoader sends what a batch sampler yields to its workers as-is, so the records travel with the "indices".
    """

    def __init__(
        self,
        sources: Sequence[Source],
        store: ReferenceStore,
        batch_size: int,
        summary: IndexSummary,
        pending: set[str],
        on_done: Callable[[int], None],
    ):
        self.sources, self.store, self.batch_size = sources, store, batch_size
        self.summary, self.pending, self.on_done = summary, pending, on_done

    def _bounded(self, record: SourceRecord) -> SourceRecord:
        if record.caption_error:
            self.summary.captions_lost += 1
            log.warning("%s", record.caption_error)
        # Cut here, in the main process, so a huge caption never travels to a worker nor into the database.
        bounded, cut = bound_record(record)
        if cut:
            self.summary.captions_cut += 1
            log.warning("caption of %s is over %d characters: cut at a word boundary", record.uri, MAX_CAPTION_CHARS)
        return bounded

    def _chunks(self) -> Iterator[list[SourceRecord]]:
        chunk: list[SourceRecord] = []
        held = 0
        for source in self.sources:
            for record in source:
                chunk.append(record)
                held += len(record.data)
                if len(chunk) == self.batch_size or held >= MAX_BATCH_BYTES:
                    yield chunk
                    chunk, held = [], 0
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[list[_Fresh]]:
        ready: list[_Fresh] = []
        for chunk in self._chunks():
            ids = [record.id for record in chunk]
            present = self.store.existing(ids) | self.pending
            skipped = failed = 0
            for image_id, record in zip(ids, chunk, strict=True):
                if record.error is not None:
                    failed += 1
                    log.warning("skipping %s: %s", record.uri, record.error)
                    continue
                if image_id in present:
                    skipped += 1
                    continue
                present.add(image_id)  # a second copy in the same chunk
                self.pending.add(image_id)
                ready.append(_Fresh(image_id, self._bounded(record)))
            self.summary.skipped += skipped
            self.summary.failed += failed
            if skipped or failed:
                self.on_done(skipped + failed)
            while ready and (len(ready) >= self.batch_size or _bytes(ready) >= MAX_BATCH_BYTES):
                cut = _cut(ready, self.batch_size)
                yield ready[:cut]
                ready = ready[cut:]
        if ready:
            yield ready


def bound_record(record: SourceRecord) -> tuple[SourceRecord, bool]:
    """`record` with its caption cut to MAX_CAPTION_CHARS at a word boundary, and whether it was cut."""
    caption = bound_caption(record.caption)
    return (record, False) if caption == record.caption else (replace(record, caption=caption), True)


def _bytes(items: Sequence[_Fresh]) -> int:
    return sum(len(item.record.data) for item in items)


def _cut(items: Sequence[_Fresh], batch_size: int) -> int:
    """How many of `items` make the next batch: batch_size, or fewer that reach MAX_BATCH_BYTES (at least one)."""
    held = 0
    for n, item in enumerate(items[:batch_size], 1):
        held += len(item.record.data)
        if held >= MAX_BATCH_BYTES:
            return n
    return min(batch_size, len(items))


class DecodeAndPreprocess:
    """Collate: decode each record's bytes and preprocess it for the CLIP; unreadable or oversized ones are set aside
    with the reason. `background` shows through transparent pixels."""

    def __init__(
        self,
        preprocess: Callable[[Image.Image], torch.Tensor],
        draft_size: int | None = None,
        background: tuple[int, int, int] = WHITE,
    ):
        self.preprocess, self.draft_size, self.background = preprocess, draft_size, background

    def __call__(self, items: list[_Fresh]) -> _Batch:
        good, tensors, formats, failed = [], [], [], []
        for item in items:
            try:
                with Image.open(io.BytesIO(item.record.data)) as image:
                    check_pixels(image.size, "the image")  # from the header: nothing is decoded yet
                    fmt = image.format or "PNG"
                    if self.draft_size and fmt == "JPEG":
                        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the model's input size: the
                        # resize that follows sees the same detail for a fraction of the decoding.
                        image.draft("RGB", (self.draft_size, self.draft_size))
                    tensors.append(self.preprocess(to_rgb(image, self.background)))
            except ImageTooLarge as error:
                failed.append((item, str(error)))
                continue
            except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files; none may stop a long run
                failed.append((item, f"not a readable image ({type(error).__name__}: {error})"))
                continue
            good.append(item)
            formats.append({"JPEG": "jpg"}.get(fmt, fmt.lower()))
        return _Batch(good, torch.stack(tensors) if tensors else None, formats, failed)


def input_size(embedder: object) -> int | None:
    size = getattr(getattr(getattr(embedder, "model", None), "visual", None), "image_size", None)
    return max(size) if isinstance(size, (tuple, list)) else size


def cache_copy(cache_dir: Path, image_id: str, data: bytes, suffix: str) -> Path:
    """A content-addressed copy, written atomically so a crash never leaves half a file."""
    path = Path(cache_dir) / image_id[:2] / f"{image_id}.{suffix}"
    if not path.exists():
        atomic_write(path, data)
    return path.resolve()


def stored_source(item: _Fresh, fmt: str, cache_dir: Path | None) -> str:
    """The file the store records for `item`: a folder image itself, else its copy in the cache."""
    if item.record.on_disk:
        return item.record.uri
    assert cache_dir is not None, "index_sources requires a cache folder for shard and parquet sources"
    return str(cache_copy(cache_dir, item.id, item.record.data, fmt))


def open_sources(
    paths: Sequence[Path | str | Source],
    image_column: str | None = None,
    caption_column: str | None = None,
    follow_external_links: bool = False,
) -> list[Source]:
    """Readers for `paths`; `follow_external_links` lets folders follow links that leave them (see FolderSource)."""
    return [
        p if not isinstance(p, (str, Path)) else open_source(p, image_column, caption_column, follow_external_links)
        for p in paths
    ]


def size_hint(sources: Sequence[Source]) -> int | None:
    """Total records when every source can tell cheaply (folders, parquet); None when a shard is among them."""
    sizes = [source.size_hint() for source in sources]
    known = [s for s in sizes if s is not None]
    return None if len(known) < len(sizes) else sum(known)


def index_sources(
    store: ReferenceStore,
    sources: Sequence[Path | str | Source],
    batch_size: int = 64,
    cache_dir: Path | None = None,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    summary: IndexSummary | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    follow_external_links: bool = False,
    background: tuple[int, int, int] = WHITE,
) -> IndexSummary:
    """Embed and add every image of `sources` (folders, .tar shards, .parquet files) that the collection lacks.

    Safe to re-run after a crash or Ctrl-C. `cache_dir` receives copies of shard and parquet images (required
    when there are any). `on_batch(n)` is told how many records were dealt with. Pass `summary` to keep the
    counts when the run is interrupted. A link in a folder that resolves outside it is counted as failed and
    logged, unless `follow_external_links` (for sources given as paths; an opened FolderSource keeps its own).
    Transparent pixels are composited over `background` (RGB). A full disk raises DiskFull, which says what was
    kept and how to resume. The caller holds store.writer_lock for an embedded database (the CLI does).
    """
    started, summary = time.time(), summary if summary is not None else IndexSummary()
    opened = open_sources(sources, image_column, caption_column, follow_external_links)
    if cache_dir is None and any(not isinstance(s, FolderSource) for s in opened):
        raise SourceError(
            "indexing .tar shards or .parquet files needs a cache folder for the extracted images (cache_dir)"
        )
    # Recorded before any row: a row is never written without the folder that lets the agent open its image.
    store.record_roots([s.root for s in opened if isinstance(s, FolderSource)] + ([cache_dir] if cache_dir else []))
    progress = on_batch or (lambda n: None)
    pending: set[str] = set()
    sampler = _FreshBatches(opened, store, batch_size, summary, pending, progress)
    loader = DataLoader(
        _Passthrough(),
        batch_sampler=sampler,
        collate_fn=DecodeAndPreprocess(store.embedder.preprocess, input_size(store.embedder), background),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,  # DataLoader refuses any value without workers
    )
    try:
        for batch in loader:
            for item, error in batch.failed:
                summary.failed += 1
                pending.discard(item.id)
                log.warning("skipping %s: %s", item.record.uri, error)
            if batch.fresh:
                _write(store, batch, cache_dir, summary, pending)
            progress(len(batch.fresh) + len(batch.failed))
    finally:
        summary.seconds = time.time() - started
    return summary


def _write(store: ReferenceStore, batch: _Batch, cache_dir: Path | None, summary: IndexSummary, pending: set) -> None:
    """Embed one batch and write it: cache copies first, then one upsert. A full disk becomes DiskFull."""
    assert batch.pixels is not None, "a batch with fresh records has their pixels"
    try:
        embeddings = store.embedder.embed_images(batch.pixels)
        sources_ = [stored_source(item, fmt, cache_dir) for item, fmt in zip(batch.fresh, batch.formats, strict=True)]
        # Only a link followed out of its folder on request lies outside the recorded folders: its own
        # folder is recorded, so the agent may open what the user chose to index.
        store.record_roots(Path(s).parent for s in sources_)
        ids = [item.id for item in batch.fresh]
        store.add(
            ids,
            embeddings,
            [item.record.caption for item in batch.fresh],
            sources_,
            [item.record.uri for item in batch.fresh],
        )
    except Exception as error:
        if not (isinstance(error, DiskFull) or disk_full(error)):
            raise
        where = cache_dir.parent if cache_dir is not None else "the collection's data folder"
        detail = error.detail if isinstance(error, DiskFull) else str(error)[:200]
        raise DiskFull(
            f"the disk is full: writing to {where} failed ({detail}). Kept: every batch written before it (this run "
            f"added {summary.added} image(s) to collection {store.collection.name!r}; a batch is written whole or not "
            "at all, and a half-written cache file is removed). Free space on that disk (or pass another "
            "--data-dir), then run the same command again: it skips what is indexed and goes on from there",
            detail,
        ) from None
    summary.added += len(ids)
    pending.difference_update(ids)


def repair_name(name: str) -> str:
    """The name a collection's repair is built under before it replaces `name` (a valid name: at most 63 characters)."""
    return f"{name[:55]}-repair"


def repair_collection(
    client: chromadb.ClientAPI,
    name: str,
    embedder: ClipEmbedder,
    data_dir: Path,
    batch_size: int = 64,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    summary: IndexSummary | None = None,
    background: tuple[int, int, int] = WHITE,
) -> tuple[ReferenceStore, list[str]]:
    """Rebuild collection `name` (one chromadb can no longer read) from the folders it records, and the notes to
    show (what could not be rebuilt).

    The folders are indexed into a fresh collection (repair_name), which replaces the damaged one only once it is
    complete; an interrupted repair leaves the damaged collection as it was and starts over when run again. The
    collection's metadata (its model and folders) is read from chromadb's catalogue, which stays readable when its
    index does not. Images that came from shards or parquet files live in the data folder's reference cache, named
    by hash with no caption: they are not re-read (index those files again). The caller holds store.writer_lock.
    """
    check_collection_name(name)
    fresh_name = repair_name(name)
    existing = {getattr(c, "name", c) for c in client.list_collections()}
    if name not in existing:
        if fresh_name in existing and _repair_of(client, fresh_name) == name:
            # Interrupted after the damaged collection was dropped: the fresh one was complete (it is dropped only
            # then), so finishing means giving it its name.
            client.get_collection(fresh_name, embedding_function=None).modify(name=name)
            return ReferenceStore(client.get_collection(name, embedding_function=None), embedder), []
        raise StoreError(f"no collection {name!r} to repair in this data folder: check --collection and --data-dir")
    damaged = client.get_collection(name, embedding_function=None)
    check_model(damaged, embedder.info)
    store_roots = ReferenceStore(damaged, embedder).roots
    if not store_roots:
        raise StoreError(
            f"collection {name!r} records no folders it was indexed from, so it cannot be rebuilt from them: index "
            "your images again into a new collection (--collection NEW)"
        )
    cache = reference_cache(data_dir).resolve()
    notes, folders = [], []
    for root in store_roots:
        if root.is_relative_to(cache):
            notes.append(
                f"images it took from .tar shards or .parquet files (copied to {cache}) are not rebuilt: index "
                f"those files again with `imagerag index SHARD ... --collection {name}`"
            )
        elif not root.is_dir():
            notes.append(f"folder {root} is gone: its images are not in the repaired collection")
        elif not any(root.is_relative_to(other) for other in store_roots if other != root):
            folders.append(root)
    if not folders:
        raise StoreError(f"collection {name!r} records no folder that still exists to rebuild it from: {notes}")
    if fresh_name in existing:
        if _repair_of(client, fresh_name) != name:
            raise StoreError(f"collection {fresh_name!r} exists and is not a repair of {name!r}: rename or delete it")
        client.delete_collection(fresh_name)  # left by an interrupted repair: started over
    fresh = client.create_collection(
        fresh_name,
        embedding_function=None,
        metadata={"hnsw:space": "cosine", **model_metadata(embedder.info), REPAIR_OF_KEY: name},
    )
    store = ReferenceStore(fresh, embedder)
    index_sources(
        store,
        [FolderSource(folder) for folder in folders],
        batch_size,
        cache_dir=reference_cache(data_dir),
        num_workers=num_workers,
        on_batch=on_batch,
        summary=summary,
        background=background,
    )
    client.delete_collection(name)  # only now: until here the damaged collection stays as it was
    fresh.modify(name=name)
    return ReferenceStore(client.get_collection(name, embedding_function=None), embedder), list(dict.fromkeys(notes))


def _repair_of(client: chromadb.ClientAPI, name: str) -> str | None:
    return (client.get_collection(name, embedding_function=None).metadata or {}).get(REPAIR_OF_KEY)


def index_folders(
    store: ReferenceStore,
    folders: list[Path],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    follow_external_links: bool = False,
) -> IndexSummary:
    """Image folders only (recursive; sidecar captions): `index_sources` without a cache."""
    return index_sources(
        store, [FolderSource(Path(f), follow_external_links) for f in folders], batch_size, on_batch=on_batch
    )
