"""Readers for the image collections users bring: folders, webdataset .tar shards, parquet files.

Every reader yields `SourceRecord`s: the image's raw bytes (its id is their content hash), a caption and a
URI that says where it came from. Readers never decode images; a file that is not an image is found out (and
counted) when the indexer decodes it.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagerag.tools.files import content_id

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
CAPTION_KEYS = ("caption", "text", "txt", "prompt", "description")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes")


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unknown format, no image column); the message says why."""


@dataclass(frozen=True)
class SourceRecord:
    data: bytes
    caption: str
    uri: str
    # A folder image already lives on disk at `uri`; a shard or parquet member needs a copy the agent can open.
    on_disk: bool = False

    @property
    def id(self) -> str:
        return content_id(self.data)


def caption_from_json(data: dict) -> str | None:
    for key in CAPTION_KEYS:
        if isinstance(data.get(key), str) and data[key].strip():
            return data[key].strip()
    return None


def sidecar_caption(path: Path) -> str:
    """Caption from NAME.txt or NAME.json ('caption' or 'text'), else the file name in words."""
    txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    if meta.exists():
        try:
            caption = caption_from_json(json.loads(meta.read_text(encoding="utf-8")))
        except (ValueError, AttributeError):  # a broken sidecar costs the caption, not the image
            caption = None
        if caption:
            return caption
    return path.stem.replace("_", " ").replace("-", " ")


class FolderSource:
    """Image files below a folder, recursively, in a stable order; captions from sidecar .txt/.json files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"no image folder at {folder}: pass an existing folder of images")
        self.uri = str(self.folder)

    def paths(self) -> Iterator[Path]:
        # os.walk streams: a folder of millions of images is never held as one sorted list.
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    yield Path(root) / name

    def size_hint(self) -> int | None:
        return sum(1 for _ in self.paths())

    def __iter__(self) -> Iterator[SourceRecord]:
        for path in self.paths():
            try:
                data = path.read_bytes()
            except OSError:  # unreadable file: let the decoder count it as failed
                data = b""
            yield SourceRecord(data, sidecar_caption(path), str(path.resolve()), on_disk=True)


class TarShardSource:
    """A webdataset shard as img2dataset writes it: KEY.jpg (or .png/.webp) next to KEY.txt and KEY.json.

    Members of one sample are adjacent in the archive (webdataset's convention), so the shard is streamed and
    never unpacked. The key is the member path up to the first dot of its file name.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"no tar shard at {path}")
        self.uri = str(self.path.resolve())

    def size_hint(self) -> int | None:
        return None  # counting would read the whole shard twice

    def __iter__(self) -> Iterator[SourceRecord]:
        key: str | None = None
        sample: dict[str, bytes] = {}
        try:
            with tarfile.open(self.path, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if not dot:
                        continue
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        yield from self._sample(key, sample)
                        key, sample = member_key, {}
                    handle = tar.extractfile(member)
                    sample[ext.lower()] = handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as error:
            # A truncated shard (an interrupted download) keeps what was read; the rest counts as one failure.
            yield SourceRecord(
                b"", "", f"{self.uri}#unreadable after {key or 'the start'} ({type(error).__name__}: {error})"
            )
            return
        yield from self._sample(key, sample)

    def _sample(self, key: str | None, sample: dict[str, bytes]) -> Iterator[SourceRecord]:
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "gif") if e in sample), None)
        if key is None or image_ext is None:
            return
        caption = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else ""
        if not caption and "json" in sample:
            try:
                caption = caption_from_json(json.loads(sample["json"])) or ""
            except (ValueError, AttributeError):
                caption = ""
        yield SourceRecord(sample[image_ext], caption or key, f"{self.uri}#{key}")


class ParquetSource:
    """A parquet file with an image-bytes column and a caption column, as Hugging Face datasets export them.

    The image column is either binary or a struct with a `bytes` field (the `datasets` Image feature). Columns
    are found by name unless given.
    """

    def __init__(
        self, path: Path, image_column: str | None = None, caption_column: str | None = None, rows_per_read: int = 256
    ):
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"no parquet file at {path}")
        self.uri = str(self.path.resolve())
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError and more for a bad file
            raise SourceError(f"cannot read {path} as parquet: {error}") from None
        schema = self.file.schema_arrow
        self.image_column = image_column or self._find_image_column(schema)
        self.caption_column = caption_column or next((c for c in CAPTION_KEYS if c in schema.names), None)
        for column in (self.image_column, self.caption_column):
            if column is not None and column not in schema.names:
                raise SourceError(f"{path} has no column {column!r}; its columns are {', '.join(schema.names)}")
        self.rows_per_read = rows_per_read

    def _find_image_column(self, schema: pa.Schema) -> str:
        import pyarrow as pa

        def holds_bytes(field: pa.Field) -> bool:
            t = field.type
            if pa.types.is_struct(t):
                return any(t.field(i).name == "bytes" for i in range(t.num_fields))
            return pa.types.is_binary(t) or pa.types.is_large_binary(t)

        candidates = [f.name for f in schema if holds_bytes(f)]
        for name in IMAGE_COLUMNS:
            if name in candidates:
                return name
        if candidates:
            return candidates[0]
        raise SourceError(
            f"{self.path} has no image-bytes column (binary, or a struct with 'bytes'): pass --image-column"
        )

    def size_hint(self) -> int | None:
        return self.file.metadata.num_rows

    def __iter__(self) -> Iterator[SourceRecord]:
        columns = [c for c in (self.image_column, self.caption_column) if c]
        row = 0
        for batch in self.file.iter_batches(batch_size=self.rows_per_read, columns=columns):
            images = batch.column(self.image_column).to_pylist()
            captions = batch.column(self.caption_column).to_pylist() if self.caption_column else [None] * len(images)
            for image, caption in zip(images, captions, strict=True):
                data = image.get("bytes") if isinstance(image, dict) else image
                yield SourceRecord(
                    data or b"", str(caption).strip() if caption is not None else "", f"{self.uri}#row={row}"
                )
                row += 1


Source = FolderSource | TarShardSource | ParquetSource


def open_source(path: Path | str, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """The reader for `path`: a folder, a .tar/.tar.gz/.tgz shard or a .parquet file."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return FolderSource(path)
    if name.endswith(TAR_SUFFIXES):
        return TarShardSource(path)
    if name.endswith(PARQUET_SUFFIXES):
        return ParquetSource(path, image_column, caption_column)
    if not path.exists():
        raise SourceError(f"no image folder at {path} (nor a .tar shard or .parquet file): pass existing sources")
    raise SourceError(f"cannot index {path}: pass an image folder, a webdataset .tar shard or a .parquet file")
