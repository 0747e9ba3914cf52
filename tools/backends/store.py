"""Reference images in a chromadb collection embedded with open_clip.

The collection records its embedding model (name, pretrained tag, dimension); opening it with another model is
refused, because similarities across embedding spaces are meaningless.

Minimum similarity (`min_similarity`) is a cosine between a caption's text embedding and an image embedding, so
its meaning depends on the embedding model; each profile carries its own (agent/config.py):
- tiny (random open_clip): -1.0, i.e. no threshold; a random model's similarities mean nothing.
- mini (the miniature world's CLIP): measured by evals/miniworld/train_clip.py on the world's corpus and read
  from mini:clip/calibration.json: the cosine that best separates queries whose concept the corpus holds from
  queries whose concept it lacks (0.6141 for the current model, balanced accuracy 0.967 on 60 + 60 queries).
- ViT-B-32/openai: 0.22, a starting point from the usual ranges (matching photo 0.25-0.32, unrelated
  0.12-0.20). It could not be measured here (no weights offline); calibrate it on your own collection.

The collection also records the folders it was indexed from (ROOTS_KEY). A reference image is opened only inside
those folders or a data folder's reference cache, and only below MAX_IMAGE_PIXELS, so a row that names another
file (a collection built before links were confined, a tampered database) cannot make the agent read it, show it
in a report or send it as a thumbnail. A collection that records no folders (built before they were recorded) can
still be searched, but its references outside the reference cache are refused until `imagerag index` runs on its
folders once more: that run skips every indexed image and records the folders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import chromadb
import numpy as np
from chromadb import Collection
from chromadb.config import Settings as ChromaSettings
from PIL import Image

from imagerag.tools.backends.clip import ClipEmbedder, EmbeddingModelInfo
from imagerag.tools.backends.sources import bound_caption
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.types import RetrievalHit

log = logging.getLogger(__name__)

# 40 megapixels: more than an 8K frame (33 MP) and most cameras' photos, far below PIL's own limits (a warning at
# 89 MP, an error at 179 MP). Every use shrinks the image (CLIP to 224 px, a reference to at most 1024 px), so more
# pixels add only memory: 40 MP is 120 MB as RGB, and decoding plus conversion hold a few copies at once, in each
# worker. Checked from the header, before anything is decoded; PIL's global limit is left alone.
MAX_IMAGE_PIXELS = 40_000_000
ROOTS_KEY = "imagerag_roots"  # collection metadata: a JSON list of the absolute folders it was indexed from
REFERENCE_CACHE_DIR = "references"  # below a data folder: copies of shard and parquet images, references uploaded

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
    settings = ChromaSettings(anonymized_telemetry=False)
    if url:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        return chromadb.HttpClient(
            host=parsed.hostname, port=parsed.port or 8000, ssl=parsed.scheme == "https", settings=settings
        )
    return chromadb.PersistentClient(path=str(Path(data_dir) / "chroma"), settings=settings)


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
        meta = collection.metadata or {}
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
        self.collection.modify(metadata={**kept, ROOTS_KEY: json.dumps([str(r) for r in self.roots])})
        _REFERENCE_ROOTS.update(self.roots)

    def count(self) -> int:
        return self.collection.count()

    def existing(self, ids: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(ids))  # chromadb rejects repeated ids; identical files share one
        return set(self.collection.get(ids=unique, include=[])["ids"]) if unique else set()

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
        origins = origins or [None] * len(ids)
        self.collection.upsert(
            ids=ids,
            embeddings=embeddings.astype(np.float32),
            documents=captions,
            metadatas=[
                {"source": s, **({"origin": o} if o and o != s else {})} for s, o in zip(sources, origins, strict=True)
            ],
        )

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
        n = min(pool + len(exclude), self.count())
        if n == 0:
            return []
        include = ["documents", "metadatas", "distances"] + (["embeddings"] if mmr_lambda is not None else [])
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
                return image.convert("RGB")
        except Image.DecompressionBombError as error:  # PIL's own limit, raised by open before ours is checked
            raise ImageTooLarge(f"reference image {hit.source}: {error}") from None


def default_sheet_path(caption: str, folder: Path = Path(".")) -> Path:
    """./<caption in words>.png, or -2, -3, ... after it: an existing file is never overwritten."""
    import re

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
