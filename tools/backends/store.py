"""Reference images in a chromadb collection embedded with open_clip.

The collection records its embedding model; opening it with another model is refused, because similarities
across embedding spaces are meaningless.
"""

from __future__ import annotations

from pathlib import Path

import chromadb
import numpy as np
from chromadb.config import Settings as ChromaSettings
from PIL import Image

from agent.state import RetrievalHit
from tools.backends.clip import ClipEmbedder, EmbeddingModelInfo


class StoreError(ValueError):
    """A collection that cannot be used; the message says why and what to run."""


def chroma_client(data_dir: Path, url: str | None = None) -> chromadb.ClientAPI:
    settings = ChromaSettings(anonymized_telemetry=False)
    if url:
        from urllib.parse import urlparse

        parsed = urlparse(url)
        return chromadb.HttpClient(host=parsed.hostname, port=parsed.port or 8000, ssl=parsed.scheme == "https", settings=settings)
    return chromadb.PersistentClient(path=str(Path(data_dir) / "chroma"), settings=settings)


class ReferenceStore:
    def __init__(self, collection, embedder: ClipEmbedder):
        self.collection, self.embedder = collection, embedder

    @classmethod
    def open(cls, client: chromadb.ClientAPI, name: str, embedder: ClipEmbedder, create: bool = False) -> ReferenceStore:
        info = embedder.info
        if create:
            collection = client.get_or_create_collection(
                name,
                embedding_function=None,
                metadata={"hnsw:space": "cosine", **{f"embed_{k}": v for k, v in info.model_dump().items()}},
            )
        else:
            try:
                collection = client.get_collection(name, embedding_function=None)
            except Exception:  # chromadb raises NotFoundError or ValueError depending on version
                raise StoreError(
                    f"no reference collection {name!r}: build it with `imagerag index IMAGE_FOLDER --collection {name}`"
                ) from None
        recorded = EmbeddingModelInfo(**{k: collection.metadata.get(f"embed_{k}") for k in ("name", "pretrained", "dim")})
        if recorded != info:
            raise StoreError(
                f"collection {name!r} was embedded with {recorded.name} ({recorded.pretrained}, dim {recorded.dim}) "
                f"but the current model is {info.name} ({info.pretrained}, dim {info.dim}): search it with the same "
                "CLIP model, or re-index into a new collection"
            )
        return cls(collection, embedder)

    def count(self) -> int:
        return self.collection.count()

    def existing(self, ids: list[str]) -> set[str]:
        unique = list(dict.fromkeys(ids))  # chromadb rejects repeated ids; identical files share one
        return set(self.collection.get(ids=unique, include=[])["ids"]) if unique else set()

    def add(self, ids: list[str], embeddings: np.ndarray, captions: list[str], sources: list[str]) -> None:
        """One batch, one write: chromadb applies it whole or not at all."""
        self.collection.upsert(
            ids=ids,
            embeddings=embeddings.astype(np.float32),
            documents=captions,
            metadatas=[{"source": s} for s in sources],
        )

    def search(
        self, caption: str, k: int = 1, min_similarity: float = -1.0, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[RetrievalHit]:
        """Top-k hits at or above `min_similarity`; an empty list beats an unrelated reference."""
        query = self.embedder.embed_texts([caption])[0]
        n = min(k + len(exclude), self.count())
        if n == 0:
            return []
        found = self.collection.query(query_embeddings=[query], n_results=n, include=["documents", "metadatas", "distances"])
        hits = [
            RetrievalHit(id=i, caption=doc or "", similarity=1.0 - dist, source=meta["source"], query=caption)
            for i, doc, meta, dist in zip(found["ids"][0], found["documents"][0], found["metadatas"][0], found["distances"][0])
            if i not in exclude and 1.0 - dist >= min_similarity
        ]
        return hits[:k]

    def search_many(self, captions: list[str], k: int = 1, min_similarity: float = -1.0, exclude: set[str] = frozenset()) -> list[RetrievalHit]:
        """Hits for several captions with no image used twice across them."""
        seen, hits = set(exclude), []
        for caption in captions:
            for hit in self.search(caption, k, min_similarity, exclude=seen):
                seen.add(hit.id)
                hits.append(hit)
        return hits

    @staticmethod
    def load_image(hit: RetrievalHit) -> Image.Image:
        with Image.open(hit.source) as image:
            return image.convert("RGB")
