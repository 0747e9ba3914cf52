"""Readers for the image collections users bring: folders, webdataset .tar shards, parquet files.

Every reader yields `SourceRecord`s: the image's raw bytes (its id is their content hash), a caption and a
URI that says where it came from. Readers never decode images; a file that is not an image is found out (and
counted) when the indexer decodes it. A file a reader refuses (a broken or looping link, a link out of the indexed
folder, a device or pipe) comes as a record with an `error`, which the indexer counts as failed.

Captions are read bounded: a text sidecar or member is read up to a little more than MAX_CAPTION_CHARS characters
(the indexer cuts it to the limit and counts it), a JSON one up to MAX_JSON_SIDECAR_BYTES (larger ones are ignored),
so a huge caption file costs neither memory nor database space. A text caption starting with a byte order mark is
decoded as the mark says (UTF-16 and UTF-32 from Windows editors), anything else as UTF-8. A caption file that
cannot be used (too large, broken or too deeply nested JSON, unreadable) costs the caption, never the image: the
record carries why (`caption_error`) and the indexer counts it.

Images are read bounded too: a file's size (stat) or a tar member's header size is checked against
MAX_IMAGE_FILE_BYTES before a byte is read, and the read itself stops past the limit (a file that grew meanwhile),
hashing as it streams; a parquet cell over the limit is refused before it travels further. Members of a shard that
are neither images nor captions are never read.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from imagerag.tools.errors import ImageRAGError
from imagerag.tools.files import ID_CHARS, content_id

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # in the order a shard sample's image is picked
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
CAPTION_KEYS = ("caption", "text", "txt", "prompt", "description")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes")
# Long enough for a dense multi-sentence caption (CLIP reads only 77 tokens of one anyway); short enough that a
# caption cannot swell the database, a run's state, its checkpoints or its report.
MAX_CAPTION_CHARS = 1000
# UTF-8 takes at most 4 bytes a character: this many bytes always hold more than MAX_CAPTION_CHARS characters of a
# longer caption, so the cut (and its count) happens in one place, bound_caption.
CAPTION_READ_BYTES = 4 * (MAX_CAPTION_CHARS + 1)
# img2dataset's JSON holds the caption next to EXIF and URL fields (a few KB); JSON cannot be parsed from a prefix.
MAX_JSON_SIDECAR_BYTES = 1 << 20
# An image file over this is refused unread. A 40-megapixel photo (store.MAX_IMAGE_PIXELS) is 10-30 MB as a JPEG and
# up to 120 MB as an incompressible 8-bit RGB PNG; a larger file is padded, not a picture the pixel limit admits.
MAX_IMAGE_FILE_BYTES = 128 << 20
_READ_CHUNK = 1 << 20
# Byte order marks, longest first (UTF-32 LE's starts with UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

log = logging.getLogger(__name__)


class SourceError(ImageRAGError):
    """A source that cannot be read at all (missing, unknown format, no image column); the message says why."""


@dataclass(frozen=True)
class SourceRecord:
    data: bytes
    caption: str
    uri: str
    # A folder image already lives on disk at `uri`; a shard or parquet member needs a copy the agent can open.
    on_disk: bool = False
    # Why the reader could not or would not read this file: the indexer counts it as failed and logs this.
    error: str | None = None
    # Why a caption file was there but could not be used (the caption falls back): counted and logged, not fatal.
    caption_error: str | None = None
    # The content id, when the reader hashed the bytes as it read them.
    digest: str | None = None

    @property
    def id(self) -> str:
        return self.digest or content_id(self.data)


class CaptionUnusable(ValueError):
    """A caption file that is there but cannot be used: the message says which and why."""


def caption_from_json(data: dict) -> str | None:
    for key in CAPTION_KEYS:
        if isinstance(data.get(key), str) and data[key].strip():
            return data[key].strip()
    return None


def bound_caption(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    """`text` when it fits in `limit` characters, else its start cut at a word boundary and ended with '…'."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if not text[limit - 1].isspace():  # the cut fell inside a word: drop that word's start
        words = head.rsplit(maxsplit=1)
        # Text without spaces (a URL, Chinese or Japanese) is cut mid-word rather than lost.
        if len(words) == 2 and len(words[0]) > limit // 2:
            head = words[0]
    return head.rstrip() + "…"


def _read_head(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


def too_large(size: int, what: str) -> str | None:
    """Why an image file of `size` bytes is refused unread, or None when it fits."""
    if size <= MAX_IMAGE_FILE_BYTES:
        return None
    return f"{what} is {size:,} bytes, over the limit of {MAX_IMAGE_FILE_BYTES:,} for an image file: not read"


def read_bounded(handle: IO[bytes], what: str, limit: int | None = None) -> tuple[bytes, str]:
    """All of `handle` and its content id, hashed as it streams; SourceError past `limit` bytes (default
    MAX_IMAGE_FILE_BYTES: a file that grew after its size was checked, a device that never ends)."""
    limit = MAX_IMAGE_FILE_BYTES if limit is None else limit
    digest, buffer = hashlib.sha256(), io.BytesIO()
    while chunk := handle.read(_READ_CHUNK):
        if buffer.tell() + len(chunk) > limit:
            raise SourceError(f"{what} is over the limit of {limit:,} bytes for an image file: not read further")
        digest.update(chunk)
        buffer.write(chunk)
    return buffer.getvalue(), digest.hexdigest()[:ID_CHARS]  # getvalue hands over the buffer, no copy


def decode_text(data: bytes) -> str:
    """A caption file's text: as its byte order mark says (UTF-8, UTF-16, UTF-32), else UTF-8; the mark is dropped
    and undecodable bytes (a cut at the read limit) become U+FFFD."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace").strip()
    return data.decode("utf-8", errors="replace").strip()


def _json_caption(data: bytes, where: str) -> str | None:
    """The caption in a JSON sidecar, or None when it names none; CaptionUnusable when the file cannot be used."""
    if len(data) > MAX_JSON_SIDECAR_BYTES:
        raise CaptionUnusable(f"ignoring the caption in {where}: over {MAX_JSON_SIDECAR_BYTES} bytes of JSON")
    try:
        parsed = json.loads(data)  # bytes: json detects UTF-8, UTF-16 or UTF-32 itself
    except RecursionError:  # nested deeper than the parser's stack: hostile, or not a sidecar
        raise CaptionUnusable(f"ignoring the caption in {where}: JSON nested too deeply to parse") from None
    except ValueError as error:
        raise CaptionUnusable(f"ignoring the caption in {where}: not valid JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise CaptionUnusable(f"ignoring the caption in {where}: a JSON {type(parsed).__name__}, not an object")
    return caption_from_json(parsed)


class FolderSource:
    """Image files below a folder, recursively, in a stable order; captions from sidecar .txt/.json files.

    Links to files are followed only when they resolve inside the folder, unless `follow_external_links`; links to
    folders are never descended (os.walk's default), so no link can make the walk loop.
    """

    def __init__(self, folder: Path, follow_external_links: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"no image folder at {folder}: pass an existing folder of images")
        self.uri = str(self.folder)
        self.root = self.folder.resolve()
        self.follow_external_links = follow_external_links

    def paths(self) -> Iterator[Path]:
        # os.walk streams: a folder of millions of images is never held as one sorted list.
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    yield Path(root) / name

    def size_hint(self) -> int | None:
        return sum(1 for _ in self.paths())

    def _target(self, path: Path) -> Path:
        """The regular file `path` names, links resolved; SourceError when it must not or cannot be read."""
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:  # RuntimeError: a link loop, before Python 3.13
            what = "a broken link or a link loop" if path.is_symlink() else "cannot be read"
            raise SourceError(f"{what} ({error}): fix or remove it") from None
        if not (self.follow_external_links or target.is_relative_to(self.root)):
            raise SourceError(
                f"a link to {target}, outside the indexed folder {self.root}: not followed; index that folder "
                "too, or pass follow_external_links=True (imagerag index --follow-external-links)"
            )
        if not target.is_file():  # a pipe would block the read for ever, a device never end
            raise SourceError(f"{target} is not a regular file: remove it from the folder")
        return target

    def _caption(self, path: Path) -> tuple[str, str | None]:
        """Caption from NAME.txt or NAME.json ('caption' or 'text'), else the file name in words; with why a
        sidecar that is there could not be used, when the caption fell back because of it.

        A sidecar is read under the same link rules as the images, and only its head.
        """
        problems = []
        for sidecar in (path.with_suffix(".txt"), path.with_suffix(".json")):
            if not sidecar.exists() and not sidecar.is_symlink():
                continue
            try:
                if sidecar.suffix == ".txt":
                    return decode_text(_read_head(self._target(sidecar), CAPTION_READ_BYTES)), None
                caption = _json_caption(_read_head(self._target(sidecar), MAX_JSON_SIDECAR_BYTES + 1), str(sidecar))
            except (SourceError, OSError) as error:
                problems.append(f"ignoring the caption file {sidecar}: {error}")
                continue
            except CaptionUnusable as error:
                problems.append(str(error))
                continue
            if caption:
                return caption, None
        return path.stem.replace("_", " ").replace("-", " "), "; ".join(problems) or None

    def _read(self, path: Path) -> tuple[Path, bytes, str]:
        target = self._target(path)
        refused = too_large(target.stat().st_size, str(path))  # before a byte is read
        if refused:
            raise SourceError(refused)
        with open(target, "rb") as handle:
            data, digest = read_bounded(handle, str(path))
        return target, data, digest

    def __iter__(self) -> Iterator[SourceRecord]:
        for path in self.paths():
            try:
                target, data, digest = self._read(path)
            except (SourceError, OSError) as error:
                yield SourceRecord(b"", "", str(path), error=str(error))
                continue
            caption, caption_error = self._caption(path)
            yield SourceRecord(data, caption, str(target), on_disk=True, caption_error=caption_error, digest=digest)


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
                    ext = ext.lower()
                    if not dot or not (ext in SHARD_IMAGE_EXTS or ext in ("txt", "json")):
                        continue  # never read: the stream skips its blocks without holding them
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        yield from self._sample(key, sample)
                        key, sample = member_key, {}
                    where = f"{self.uri}#{member.name}"
                    if ext in SHARD_IMAGE_EXTS and (refused := too_large(member.size, where)):
                        yield SourceRecord(b"", "", where, error=refused)  # from the member's header, unread
                        continue
                    handle = tar.extractfile(member)
                    # Caption members are read only as far as bound_caption and _json_caption look.
                    limit = {"txt": CAPTION_READ_BYTES, "json": MAX_JSON_SIDECAR_BYTES + 1}.get(ext)
                    sample[ext] = handle.read(limit or MAX_IMAGE_FILE_BYTES) if handle else b""
        except (tarfile.TarError, OSError, EOFError) as error:
            # A truncated shard (an interrupted download) keeps what was read; the rest counts as one failure.
            yield SourceRecord(
                b"", "", f"{self.uri}#unreadable after {key or 'the start'} ({type(error).__name__}: {error})"
            )
            return
        yield from self._sample(key, sample)

    def _sample(self, key: str | None, sample: dict[str, bytes]) -> Iterator[SourceRecord]:
        image_ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
        if key is None or image_ext is None:
            return
        caption, caption_error = decode_text(sample["txt"]) if "txt" in sample else "", None
        if not caption and "json" in sample:
            try:
                caption = _json_caption(sample["json"], f"{self.uri}#{key}.json") or ""
            except CaptionUnusable as error:
                caption_error = str(error)
        yield SourceRecord(sample[image_ext], caption or key, f"{self.uri}#{key}", caption_error=caption_error)


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
                data = (image.get("bytes") if isinstance(image, dict) else image) or b""
                uri = f"{self.uri}#row={row}"
                row += 1
                if refused := too_large(len(data), uri):  # pyarrow has read it; it travels no further
                    yield SourceRecord(b"", "", uri, error=refused)
                    continue
                yield SourceRecord(data, str(caption).strip() if caption is not None else "", uri)


class RecordsSource:
    """Records gathered elsewhere (the rows of a damaged collection being repaired), yielded as they come."""

    def __init__(self, records: Iterable[SourceRecord], uri: str, size: int | None = None):
        self.records, self.uri, self.size = records, uri, size

    def size_hint(self) -> int | None:
        return self.size

    def __iter__(self) -> Iterator[SourceRecord]:
        yield from self.records


Source = FolderSource | TarShardSource | ParquetSource | RecordsSource


def open_source(
    path: Path | str,
    image_column: str | None = None,
    caption_column: str | None = None,
    follow_external_links: bool = False,
) -> Source:
    """The reader for `path`: a folder, a .tar/.tar.gz/.tgz shard or a .parquet file."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return FolderSource(path, follow_external_links)
    if name.endswith(TAR_SUFFIXES):
        return TarShardSource(path)
    if name.endswith(PARQUET_SUFFIXES):
        return ParquetSource(path, image_column, caption_column)
    if not path.exists():
        raise SourceError(f"no image folder at {path} (nor a .tar shard or .parquet file): pass existing sources")
    raise SourceError(f"cannot index {path}: pass an image folder, a webdataset .tar shard or a .parquet file")
