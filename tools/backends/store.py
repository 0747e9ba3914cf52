"""Reference images in a chromadb collection embedded with open_clip.

The collection records its embedding model (name, pretrained tag, dimension); opening it with another model is
refused, because similarities across embedding spaces are meaningless.

Minimum similarity (`min_similarity`) is a cosine between a caption's text embedding and an image embedding, so
its meaning depends on the embedding model; each profile carries its own (tools/profiles.py):
- tiny (random open_clip): -1.0, i.e. no threshold; a random model's similarities mean nothing.
- mini (the miniature world's CLIP): measured by evals/miniworld/train_clip.py on the world's corpus and read
  from mini:clip/calibration.json: the cosine that best separates queries whose concept the corpus holds from
  queries whose concept it lacks (the figures are in the README).
- ViT-B-32/openai: 0.22, a starting point from the usual ranges (matching photo 0.25-0.32, unrelated
  0.12-0.20). It could not be measured here (no weights offline); calibrate it on your own collection.

The collection also records the folders it was indexed from (ROOTS_KEY). A reference image is opened only inside
those folders or a data folder's reference cache, and only below MAX_IMAGE_PIXELS, so a row that names another
file (a collection built before links were confined, a tampered database) cannot make the agent read it, show it
in a report or send it as a thumbnail. A collection that records no folders (built before they were recorded) can
still be searched, but its references outside the reference cache are refused until `imagerag index` runs on its
folders once more: that run skips every indexed image and records the folders.

Writers of an embedded database (a data folder's chroma/) take `writer_lock`, an flock on DATA_DIR/chroma.lock: two
processes writing one collection at once can leave its HNSW index unreadable, so a second writer waits (saying so)
or, given a timeout, stops naming the first. The kernel drops the lock with its process, so a killed indexer never
leaves the folder locked. A Chroma server takes concurrent writers itself and is not locked. A collection damaged
before the lock existed is reported with the command that rebuilds it (`imagerag index --repair`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

import chromadb
import numpy as np
from chromadb import Collection
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import InternalError as ChromaInternalError
from PIL import Image, ImageOps

from imagerag.tools.backends.clip import ClipEmbedder, EmbeddingModelInfo
from imagerag.tools.backends.sources import bound_caption
from imagerag.tools.config import check_collection_name
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.types import REFERENCE_ID, RetrievalHit

log = logging.getLogger(__name__)

# 40 megapixels: more than an 8K frame (33 MP) and most cameras' photos, far below PIL's own limits (a warning at
# 89 MP, an error at 179 MP). Every use shrinks the image (CLIP to 224 px, a reference to at most 1024 px), so more
# pixels add only memory: 40 MP is 120 MB as RGB, and decoding plus conversion hold a few copies at once, in each
# worker. Checked from the header, before anything is decoded; PIL's global limit is left alone.
MAX_IMAGE_PIXELS = 40_000_000
ROOTS_KEY = "imagerag_roots"  # collection metadata: a JSON list of the absolute folders it was indexed from
REFERENCE_CACHE_DIR = "references"  # below a data folder: copies of shard and parquet images, references uploaded
WRITER_LOCK_FILE = "chroma.lock"  # below a data folder: held by the process writing its embedded database
# chromadb's own rule (3-63 characters, which a Chroma server before 1.0 enforces; 1.x allows 512), checked before
# chromadb sees the name, so a bad one is a usage error wherever it comes from.
WHITE = (255, 255, 255)
# Below this much free space, a chromadb InternalError is taken for a full disk (its compaction error hides ENOSPC).
LOW_SPACE_BYTES = 16 << 20
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Folders whose files load_image may open. It is called on the class (a run holds hits, not the store), so the
# folders of every collection opened in this process and the reference caches of the data folders in use are
# gathered here.
_REFERENCE_ROOTS: set[Path] = set()


class StoreError(ImageRAGError):
    """A collection that cannot be used; the message says why and what to run."""


class ReferenceRefused(StoreError):
    """A reference image that may not be opened: outside the indexed folders, or not a regular file."""


class ImageTooLarge(ImageRAGError):
    """An image over MAX_IMAGE_PIXELS; refused before it is decoded."""


class StoreBusy(StoreError):
    """Another process is writing the data folder's embedded database and the wait for it ran out."""


class CollectionDamaged(StoreError):
    """chromadb cannot read a collection's index (two writers at once, before the writer lock existed)."""


class DiskFull(StoreError):
    """The disk holding the data folder is full; the message says what was kept and how to go on, `detail` what the
    failing write said."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) says the disk is full: ENOSPC, or SQLite's and chromadb's words."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if "disk is full" in text or "no space left" in text or "quota exceeded" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(data_dir: Path | str, error: BaseException, kept: str) -> str:
    """What to tell a user whose data folder's disk filled: what happened, `kept` (what is safe), how to go on."""
    return (
        f"the disk holding the data folder {data_dir} is full ({str(error)[:200]}). {kept} Free space on that disk "
        "(or pass another --data-dir), then run the same command again: it skips what is indexed and goes on"
    )


# Writer lock: one RLock per lock file makes it re-entrant inside a process (the mini profile's first use renders and
# indexes under one hold) and orders the threads of a process; the flock orders processes.
_writer_locks: dict[Path, tuple[threading.RLock, list[IO[bytes]]]] = {}
_writer_locks_guard = threading.Lock()


def _lock_holder(path: Path) -> str:
    """Who holds the writer lock, as the holder wrote it down (best effort: it may be between writes)."""
    try:
        holder = json.loads(path.read_text()[:2000])
        return f"process {int(holder['pid'])} (`{str(holder['command'])[:200]}`, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _flock(handle: IO[bytes], path: Path, data_dir: Path, timeout: float | None, poll: float) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = _lock_holder(path)
    if timeout is not None and timeout <= 0:
        raise StoreBusy(_busy_message(holder, data_dir, path, timeout))
    log.warning(
        "waiting for %s to finish writing to %s (%s is locked)%s",
        holder,
        data_dir,
        path,
        "" if timeout is None else f"; giving up after {timeout:g} s",
    )
    if timeout is None:
        fcntl.flock(handle, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue
    raise StoreBusy(_busy_message(_lock_holder(path), data_dir, path, timeout))


def _busy_message(holder: str, data_dir: Path, path: Path, timeout: float) -> str:
    return (
        f"{holder} is writing to the database in {data_dir} ({path} is locked; waited {timeout:g} s): two writers at "
        "once can damage a collection. Run this again when it has finished, or wait longer (--lock-timeout; "
        "without it the command waits as long as it takes)"
    )


@contextmanager
def writer_lock(
    data_dir: Path | str, chroma_url: str | None = None, timeout: float | None = None, poll: float = 0.2
) -> Iterator[None]:
    """Hold the data folder's writer lock: the only writer of its embedded database (and its local corpora).

    Waits for another holder, with a warning that names it; with `timeout` (seconds), stops after it with StoreBusy
    naming the holder. Re-entrant in a thread; released when the block ends or the process dies. With `chroma_url`
    (a Chroma server) nothing is locked.
    """
    if chroma_url:
        yield
        return
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / WRITER_LOCK_FILE).resolve()
    with _writer_locks_guard:
        rlock, handles = _writer_locks.setdefault(path, (threading.RLock(), []))
    if not rlock.acquire(timeout=-1 if timeout is None else timeout):
        raise StoreBusy(_busy_message("another thread of this process", data_dir, path, timeout or 0.0))
    try:
        if handles:  # this thread holds it already
            yield
            return
        with open(path, "a+b") as handle:  # never truncated on open: the holder's note stays readable
            _flock(handle, path, data_dir, timeout, poll)
            handles.append(handle)
            try:
                _note_holder(handle)
                yield
            finally:
                handles.pop()
                fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        rlock.release()


def _note_holder(handle: IO[bytes]) -> None:
    """Write who holds the lock into it, for a waiter's message; on a full disk the note is left out."""
    note = {"pid": os.getpid(), "command": " ".join(sys.argv)[:200], "since": datetime.now().isoformat("T", "seconds")}
    try:
        handle.truncate(0)
        handle.write(json.dumps(note).encode())
        handle.flush()
    except OSError:
        pass


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`image` as it is meant to be seen, in RGB: turned as its EXIF orientation says, 16-bit greys scaled to 8 bits
    (PIL's own conversion clips them, so most come out white), transparency composited over `background`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0.0) > 255:
            values = values / 257.0  # 0..65535 onto 0..255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        layer = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", layer.size, (*background, 255)), layer).convert("RGB")
    return image.convert("RGB")


def check_pixels(size: tuple[int, int], what: str) -> None:
    """Refuse an image of `size` (width, height, as PIL reads them from the header) over MAX_IMAGE_PIXELS."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: "
            "scale it down (e.g. to 4096 pixels on its longer side) and use the smaller copy"
        )


def reference_cache(data_dir: Path) -> Path:
    return Path(data_dir) / REFERENCE_CACHE_DIR


def chroma_client(data_dir: Path, url: str | None = None) -> chromadb.ClientAPI:
    """The data folder's database (or the Chroma server at `url`); the data folder's reference cache becomes a
    folder whose images load_image may open."""
    _REFERENCE_ROOTS.add(reference_cache(data_dir).resolve())
    if url:
        return server_client(url)
    try:
        return chromadb.PersistentClient(
            path=str(Path(data_dir) / "chroma"), settings=ChromaSettings(anonymized_telemetry=False)
        )
    except Exception as error:
        if disk_full(error):
            raise DiskFull(disk_full_message(data_dir, error, "Nothing was written.")) from None
        raise


def server_client(url: str) -> chromadb.ClientAPI:
    """A client of the Chroma server at `url` (http://host:8000), telemetry off."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return chromadb.HttpClient(
        host=parsed.hostname,
        port=parsed.port or 8000,
        ssl=parsed.scheme == "https",
        settings=ChromaSettings(anonymized_telemetry=False),
    )


Reranker = Callable[[str, list[RetrievalHit]], list[RetrievalHit]]
"""Reorders (and may drop) the candidate hits for a caption; its order is final."""


def model_metadata(info: EmbeddingModelInfo) -> dict:
    return {f"embed_{k}": v for k, v in info.model_dump().items()}


def mmr_order(query: np.ndarray, candidates: np.ndarray, lam: float, k: int) -> list[int]:
    """Maximal marginal relevance: greedily pick the candidate with the best
    lam * sim(query, d) - (1 - lam) * max sim(d, picked). lam=1 is plain ranking, lam=0 pure diversity."""
    relevance = candidates @ query
    redundancy = np.full(len(candidates), -np.inf)
    picked: list[int] = []
    left = np.ones(len(candidates), bool)
    for _ in range(min(k, len(candidates))):
        score = lam * relevance - (1.0 - lam) * np.where(np.isfinite(redundancy), redundancy, 0.0)
        best = int(np.argmax(np.where(left, score, -np.inf)))
        picked.append(best)
        left[best] = False
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    return picked


def check_model(collection: Collection, info: EmbeddingModelInfo) -> None:
    """StoreError unless `collection` records the embedding model `info` (as `imagerag index` does)."""
    meta, name = collection.metadata or {}, collection.name
    if any(f"embed_{k}" not in meta for k in ("name", "pretrained", "dim")):
        raise StoreError(
            f"collection {name!r} records no embedding model (it was not built by `imagerag index`): "
            "index your images into a new collection"
        )
    recorded = EmbeddingModelInfo(**{k: meta[f"embed_{k}"] for k in ("name", "pretrained", "dim")})
    if recorded != info:
        raise StoreError(
            f"collection {name!r} was embedded with {recorded.name} ({recorded.pretrained}, dim {recorded.dim}) "
            f"but the current model is {info.name} ({info.pretrained}, dim {info.dim}): search it with the same "
            "CLIP model, or re-index into a new collection"
        )


def _recorded_roots(collection: Collection) -> list[Path] | None:
    raw = (collection.metadata or {}).get(ROOTS_KEY)
    if raw is None:
        return None
    try:
        roots = json.loads(raw)
    except (TypeError, ValueError):
        roots = None
    if not (isinstance(roots, list) and all(isinstance(r, str) and Path(r).is_absolute() for r in roots)):
        raise StoreError(
            f"collection {collection.name!r} records its folders ({ROOTS_KEY}) as {str(raw)[:200]!r}, not a JSON "
            "list of absolute paths: re-index its images into a new collection"
        )
    return [Path(r) for r in roots]


def upsert_rows(
    collection: Collection,
    ids: list[str],
    embeddings: np.ndarray,
    captions: list[str],
    sources: list[str],
    origins: list[str | None] | None = None,
) -> None:
    """One upsert of indexed images, as every indexer writes them (ReferenceStore.add, the Ray indexer's writers):
    the caption as the document, the file the agent opens as `source`, where an extracted copy came from as `origin`."""
    origins = origins or [None] * len(ids)
    collection.upsert(
        ids=ids,
        embeddings=embeddings.astype(np.float32),
        documents=captions,
        metadatas=[
            {"source": s, **({"origin": o} if o and o != s else {})} for s, o in zip(sources, origins, strict=True)
        ],
    )


class ReferenceStore:
    def __init__(self, collection: Collection, embedder: ClipEmbedder):
        self.collection, self.embedder = collection, embedder
        self.roots = _recorded_roots(collection)
        _REFERENCE_ROOTS.update(self.roots or ())

    @classmethod
    def open(
        cls, client: chromadb.ClientAPI, name: str, embedder: ClipEmbedder, create: bool = False
    ) -> ReferenceStore:
        """Open collection `name`, checking it was embedded with `embedder`'s model; `create` makes it when absent."""
        check_collection_name(name)
        info = embedder.info
        try:
            collection = client.get_collection(name, embedding_function=None)
        except Exception:  # noqa: BLE001 - chromadb raises NotFoundError or ValueError depending on its version
            if not create:
                raise StoreError(
                    f"no reference collection {name!r}: build it with `imagerag index IMAGE_FOLDER --collection {name}`"
                ) from None
            # get_or_create: another indexer may have created it meanwhile; its metadata is checked below.
            try:
                collection = client.get_or_create_collection(
                    name, embedding_function=None, metadata={"hnsw:space": "cosine", **model_metadata(info)}
                )
            except ValueError as error:  # chromadb's InvalidArgumentError: a bad name
                raise StoreError(f"cannot create collection {name!r}: {error}") from None
        check_model(collection, info)
        store = cls(collection, embedder)
        if store.roots is None and store.count():
            log.warning(
                "collection %r records no indexed folders (it was built by an older imagerag): its reference images "
                "cannot be opened until `imagerag index` runs again on its folders, which records them",
                name,
            )
        return store

    def record_roots(self, folders: Iterable[Path]) -> None:
        """Add `folders` to those the collection was indexed from (its metadata) and to those load_image opens.

        Two indexers recording at once may lose one's folders (chromadb replaces metadata whole); the next
        `imagerag index` run over those folders records them again.
        """
        known = self.roots or []

        def covered(folder: Path) -> bool:
            return any(folder.is_relative_to(root) for root in known)

        # Resolving costs system calls: only a folder no recorded one holds is resolved (the indexer passes every
        # image's folder).
        new: set[Path] = set()
        for folder in map(Path, folders):
            if not covered(folder) and not covered(resolved := folder.resolve()):
                new.add(resolved)
        if not new and self.roots is not None:
            return
        self.roots = sorted({*known, *new})
        # chromadb refuses hnsw:* keys in a modify (the distance is fixed at creation and kept in its configuration).
        kept = {k: v for k, v in (self.collection.metadata or {}).items() if not k.startswith("hnsw:")}
        with self.readable():
            self.collection.modify(metadata={**kept, ROOTS_KEY: json.dumps([str(r) for r in self.roots])})
        _REFERENCE_ROOTS.update(self.roots)

    @contextmanager
    def readable(self) -> Iterator[None]:
        """Turn chromadb's InternalError on a damaged collection into CollectionDamaged, which names the repair."""
        try:
            yield
        except ChromaInternalError as error:
            if disk_full(error) or self._low_on_space():
                # chromadb's compaction error on a full disk does not say ENOSPC: the free space does.
                message = disk_full_message(self._folder(), error, "Batches written before it are kept.")
                raise DiskFull(message, str(error)[:200]) from None
            name = self.collection.name
            raise CollectionDamaged(
                f"collection {name!r} cannot be read: chromadb says {str(error)[:300]!r}. Two indexers writing it at "
                "once (before imagerag locked the data folder) can leave it so: rebuild it with `imagerag index "
                f"--repair --collection {name}` (the same --data-dir and --profile), which re-indexes the folders it "
                "was indexed from into a fresh collection and replaces this one once that is complete"
            ) from None

    def _folder(self) -> str:
        """The embedded database's folder ('' for a Chroma server)."""
        try:
            settings = self.collection._client.get_settings()
            return str(settings.persist_directory) if settings.is_persistent else ""
        except Exception:  # noqa: BLE001 - only a hint for a message; chromadb's internals may change
            return ""

    def _low_on_space(self) -> bool:
        folder = self._folder()
        try:
            return bool(folder) and shutil.disk_usage(folder).free < LOW_SPACE_BYTES
        except OSError:
            return False

    def count(self) -> int:
        with self.readable():
            return self.collection.count()

    def existing(self, ids: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(ids))  # chromadb rejects repeated ids; identical files share one
        if not unique:
            return set()
        with self.readable():
            return set(self.collection.get(ids=unique, include=[])["ids"])

    def add(
        self,
        ids: list[str],
        embeddings: np.ndarray,
        captions: list[str],
        sources: list[str],
        origins: list[str | None] | None = None,
    ) -> None:
        """One batch, one write: chromadb commits an upsert in one transaction, so a crash leaves all or none.

        `sources` are files the agent can open; `origins`, where given, say where an extracted copy came from
        (a shard member, a parquet row).
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedder.info.dim:
            raise StoreError(f"embeddings of shape {embeddings.shape} do not fit dimension {self.embedder.info.dim}")
        with self.readable():
            upsert_rows(self.collection, ids, embeddings, captions, sources, origins)

    def search(
        self,
        caption: str,
        k: int = 1,
        min_similarity: float = -1.0,
        exclude: AbstractSet[str] = frozenset(),
        *,
        mmr_lambda: float | None = None,
        reranker: Reranker | None = None,
        fetch_k: int | None = None,
    ) -> list[RetrievalHit]:
        """Top-k hits at or above `min_similarity`; an empty list beats an unrelated reference.

        `mmr_lambda` (0..1) orders the candidates by maximal marginal relevance, trading similarity to the
        caption for difference from hits already picked (1.0: plain ranking). `reranker` then reorders or drops
        the candidates, and has the last word. Either one widens the candidate pool to `fetch_k` (default
        max(4k, 20)); without them the pool is k.
        """
        if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must lie in [0, 1], got {mmr_lambda}")
        query = self.embedder.embed_texts([caption])[0]
        pool = k if mmr_lambda is None and reranker is None else max(fetch_k or 0, 4 * k, 20)
        # chromadb answers fewer when the collection holds fewer: no count first, which on a Chroma server holding a
        # million vectors costs more than the query itself (README: Indexing on a cluster).
        n = pool + len(exclude)
        if n == 0:
            return []
        include = ["documents", "metadatas", "distances"] + (["embeddings"] if mmr_lambda is not None else [])
        with self.readable():
            found = self.collection.query(query_embeddings=[query], n_results=n, include=include)
        vectors = found["embeddings"][0] if mmr_lambda is not None else [None] * len(found["ids"][0])
        kept = [
            (
                # Bounded again here: a collection indexed before captions were limited may hold huge ones.
                RetrievalHit(
                    id=i, caption=bound_caption(doc or ""), similarity=1.0 - dist, source=meta["source"], query=caption
                ),
                vec,
            )
            for i, doc, meta, dist, vec in zip(
                found["ids"][0],
                found["documents"][0],
                found["metadatas"][0],
                found["distances"][0],
                vectors,
                strict=True,
            )
            if i not in exclude and 1.0 - dist >= min_similarity
        ][:pool]
        hits = [hit for hit, _ in kept]
        if mmr_lambda is not None and hits:
            matrix = np.asarray([vec for _, vec in kept], np.float32)
            hits = [hits[i] for i in mmr_order(query, matrix, mmr_lambda, len(hits))]
        if reranker is not None:
            hits = reranker(caption, hits)
        return hits[:k]

    def search_many(
        self,
        captions: list[str],
        k: int = 1,
        min_similarity: float = -1.0,
        exclude: AbstractSet[str] = frozenset(),
        *,
        mmr_lambda: float | None = None,
        reranker: Reranker | None = None,
        fetch_k: int | None = None,
    ) -> list[RetrievalHit]:
        """Hits for several captions with no image used twice across them; the keyword options go to `search`."""
        seen: set[str] = set(exclude)
        hits: list[RetrievalHit] = []
        for caption in captions:
            for hit in self.search(
                caption, k, min_similarity, exclude=seen, mmr_lambda=mmr_lambda, reranker=reranker, fetch_k=fetch_k
            ):
                seen.add(hit.id)
                hits.append(hit)
        return hits

    @staticmethod
    def load_image(hit: RetrievalHit) -> Image.Image:
        """The hit's image as RGB: a regular file inside a folder an open collection was indexed from or a data
        folder's reference cache, of at most MAX_IMAGE_PIXELS (read from its header before decoding)."""
        try:
            path = Path(hit.source).resolve(strict=True)  # a moved file: FileNotFoundError, an OSError
        except RuntimeError as error:  # a link loop, before Python 3.13 (which raises OSError)
            raise OSError(f"reference image {hit.source}: {error}") from None
        if not any(path.is_relative_to(root) for root in _REFERENCE_ROOTS):
            raise ReferenceRefused(
                f"reference image {hit.source} lies outside the folders its collection was indexed from and the data "
                "folder's reference cache: not opened. If the collection was indexed by an older imagerag, run "
                "`imagerag index` on its folders again (it skips what is indexed and records the folders)"
            )
        if not path.is_file():
            raise ReferenceRefused(f"reference image {hit.source} is not a regular file: not opened")
        try:
            with Image.open(path) as image:
                check_pixels(image.size, f"reference image {hit.source}")
                rgb = to_rgb(image)  # as it was indexed: turned upright, 16-bit scaled, transparency on white
        except Image.DecompressionBombError as error:  # PIL's own limit, raised by open before ours is checked
            raise ImageTooLarge(f"reference image {hit.source}: {error}") from None
        rgb.info[REFERENCE_ID] = hit.id  # what is computed from a collection image can be kept under its id
        return rgb


def default_sheet_path(caption: str, folder: Path = Path(".")) -> Path:
    """./<caption in words>.png, or -2, -3, ... after it: an existing file is never overwritten."""

    stem = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:60] or "search"
    path, n = Path(folder) / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = Path(folder) / f"{stem}-{n}.png"
    return path


def contact_sheet(hits: list[RetrievalHit], path: Path, thumb: int = 160, columns: int = 5) -> Path:
    """A PNG grid of the hits, each labelled with its similarity and caption; returns the path written."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_h = 30
    cols = max(1, min(columns, len(hits)))
    rows = max(1, -(-len(hits) // cols))
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, hit in enumerate(hits):
        x, y = (n % cols) * thumb, (n // cols) * (thumb + label_h)
        try:
            image = ReferenceStore.load_image(hit)
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except (OSError, ValueError) as error:  # the sheet still shows the hit, and why its image is not there
            draw.rectangle((x + 4, y + 4, x + thumb - 4, y + thumb - 4), outline="red")
            # ValueError: refused (outside the indexed folders, over the pixel limit); OSError: moved or deleted.
            reason = "refused" if isinstance(error, ValueError) else "missing file"
            draw.text((x + 8, y + thumb // 2), reason, fill="red", font=font)
        caption = hit.caption if len(hit.caption) <= 26 else hit.caption[:23] + "..."
        draw.text((x + 4, y + thumb + 2), f"{n + 1}. sim {hit.similarity:.3f}", fill="black", font=font)
        draw.text((x + 4, y + thumb + 15), caption, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
