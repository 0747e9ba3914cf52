"""Index image folders into a reference collection: content-hash ids, batched atomic writes, resumable."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from tools.backends.store import ReferenceStore

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class IndexSummary(BaseModel):
    added: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0


def sidecar_caption(path: Path) -> str:
    """Caption from NAME.txt or NAME.json ('caption' or 'text'), else the file name in words."""
    txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8").strip()
    if meta.exists():
        data = json.loads(meta.read_text(encoding="utf-8"))
        for key in ("caption", "text"):
            if isinstance(data.get(key), str):
                return data[key].strip()
    return path.stem.replace("_", " ").replace("-", " ")


def iter_images(folder: Path) -> Iterator[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}: pass an existing folder of images")
    yield from sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def index_folders(
    store: ReferenceStore,
    folders: list[Path],
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> IndexSummary:
    """Embed and add every image below `folders` that the collection lacks. Safe to re-run after a crash."""
    started, summary = time.time(), IndexSummary()
    paths = (p for folder in folders for p in iter_images(Path(folder)))
    while batch := list(islice(paths, batch_size)):
        ids = [hashlib.sha256(p.read_bytes()).hexdigest()[:32] for p in batch]
        present = store.existing(ids)
        fresh: dict[str, tuple[Path, Image.Image]] = {}
        for image_id, path in zip(ids, batch):
            if image_id in present or image_id in fresh:
                summary.skipped += 1
                continue
            try:
                with Image.open(path) as image:
                    fresh[image_id] = (path, image.convert("RGB"))
            except (UnidentifiedImageError, OSError) as error:
                summary.failed += 1
                log.warning("skipping %s: not a readable image (%s)", path, error)
        if fresh:
            embeddings = store.embedder.embed_images([image for _, image in fresh.values()], batch_size=batch_size)
            store.add(
                list(fresh),
                embeddings,
                [sidecar_caption(path) for path, _ in fresh.values()],
                [str(path.resolve()) for path, _ in fresh.values()],
            )
            summary.added += len(fresh)
        if on_batch:
            on_batch(len(batch))
    summary.seconds = time.time() - started
    return summary
