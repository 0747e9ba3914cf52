"""Index image collections into a reference collection: content-hash ids, batched atomic writes, resumable.

The pipeline, per batch of `batch_size` records:
1. read (main process): a source reader yields raw bytes, caption and origin; the id is the bytes' hash.
   Records the collection already holds (or that an earlier batch of this run is writing) are skipped here,
   before any decoding, so a re-run over a finished collection costs one hash and one lookup per image. A file
   the reader refused (a broken or looping link, a link out of its folder) is counted as failed and logged, and
   a caption over MAX_CAPTION_CHARS is cut at a word boundary, counted and logged; the image is still indexed.
2. decode + preprocess: a torch DataLoader's collate turns the fresh records into one pixel tensor; a
   corrupt or non-image file, or one over MAX_IMAGE_PIXELS (read from its header, before decoding), is counted
   and logged there, never fatal. With num_workers=1 this runs in a worker process while the main process embeds
   the previous batch.
3. embed + write (main process): one open_clip forward, then one upsert for the whole batch. Shard and
   parquet members are first copied to a content-addressed cache (`cache_dir/ab/abcd....jpg`) so the stored
   source is a file the agent can open; the copy is written before the row, never the other way round.

The collection records the folders it was indexed from (the cache folder for shards and parquet files) before
any row is written, so the agent can later refuse a reference from anywhere else (store.ReferenceStore.load_image).

Resume: a killed run left whole batches in the collection (an upsert commits all or nothing) and at most
orphan cache files, which the next run reuses by name; re-running skips every finished batch by id.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset, Sampler

from imagerag.tools.backends.sources import (
    MAX_CAPTION_CHARS,
    FolderSource,
    Source,
    SourceError,
    SourceRecord,
    bound_caption,
    open_source,
)
from imagerag.tools.backends.store import ImageTooLarge, ReferenceStore, check_pixels
from imagerag.tools.files import atomic_write

log = logging.getLogger(__name__)


class IndexSummary(BaseModel):
    added: int = 0
    skipped: int = 0
    failed: int = 0
    captions_cut: int = 0  # captions over MAX_CAPTION_CHARS, indexed cut at a word boundary
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        return self.added + self.skipped + self.failed

    def line(self) -> str:
        rate = self.seen / self.seconds if self.seconds > 0 else 0.0
        cut = f", {self.captions_cut} caption(s) cut to {MAX_CAPTION_CHARS} characters" if self.captions_cut else ""
        return (
            f"added {self.added}, skipped {self.skipped}, failed {self.failed}{cut} in {self.seconds:.1f} s "
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
        # Cut here, in the main process, so a huge caption never travels to a worker nor into the database.
        caption = bound_caption(record.caption)
        if caption == record.caption:
            return record
        self.summary.captions_cut += 1
        log.warning("caption of %s is over %d characters: cut at a word boundary", record.uri, MAX_CAPTION_CHARS)
        return replace(record, caption=caption)

    def _chunks(self) -> Iterator[list[SourceRecord]]:
        chunk: list[SourceRecord] = []
        for source in self.sources:
            for record in source:
                chunk.append(record)
                if len(chunk) == self.batch_size:
                    yield chunk
                    chunk = []
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
            while len(ready) >= self.batch_size:
                yield ready[: self.batch_size]
                ready = ready[self.batch_size :]
        if ready:
            yield ready


class DecodeAndPreprocess:
    """Collate: decode each record's bytes and preprocess it for the CLIP; unreadable or oversized ones are set aside
    with the reason."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], draft_size: int | None = None):
        self.preprocess, self.draft_size = preprocess, draft_size

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
                    tensors.append(self.preprocess(image.convert("RGB")))
            except ImageTooLarge as error:
                failed.append((item, str(error)))
                continue
            except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files; none may stop a long run
                failed.append((item, f"not a readable image ({type(error).__name__}: {error})"))
                continue
            good.append(item)
            formats.append({"JPEG": "jpg"}.get(fmt, fmt.lower()))
        return _Batch(good, torch.stack(tensors) if tensors else None, formats, failed)


def _input_size(embedder: object) -> int | None:
    size = getattr(getattr(getattr(embedder, "model", None), "visual", None), "image_size", None)
    return max(size) if isinstance(size, (tuple, list)) else size


def cache_copy(cache_dir: Path, image_id: str, data: bytes, suffix: str) -> Path:
    """A content-addressed copy, written atomically so a crash never leaves half a file."""
    path = Path(cache_dir) / image_id[:2] / f"{image_id}.{suffix}"
    if not path.exists():
        atomic_write(path, data)
    return path.resolve()


def _stored_source(item: _Fresh, fmt: str, cache_dir: Path | None) -> str:
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
) -> IndexSummary:
    """Embed and add every image of `sources` (folders, .tar shards, .parquet files) that the collection lacks.

    Safe to re-run after a crash or Ctrl-C. `cache_dir` receives copies of shard and parquet images (required
    when there are any). `on_batch(n)` is told how many records were dealt with. Pass `summary` to keep the
    counts when the run is interrupted. A link in a folder that resolves outside it is counted as failed and
    logged, unless `follow_external_links` (for sources given as paths; an opened FolderSource keeps its own).
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
        collate_fn=DecodeAndPreprocess(store.embedder.preprocess, _input_size(store.embedder)),
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
                embeddings = store.embedder.embed_images(batch.pixels)
                sources_ = [
                    _stored_source(item, fmt, cache_dir) for item, fmt in zip(batch.fresh, batch.formats, strict=True)
                ]
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
                summary.added += len(ids)
                pending.difference_update(ids)
            progress(len(batch.fresh) + len(batch.failed))
    finally:
        summary.seconds = time.time() - started
    return summary


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
