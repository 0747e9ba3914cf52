"""Content-addressed PNG store inside a run folder: graph state holds ids, never pixels."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image


class ImageStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def put(self, image: Image.Image) -> str:
        """Save `image` once under its content hash and return the id (writes are atomic: no half PNG)."""
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        image_id = hashlib.sha256(data).hexdigest()[:16]
        path = self.path(image_id)
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return image_id

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"

    def get(self, image_id: str) -> Image.Image:
        path = self.path(image_id)
        if not path.exists():
            raise KeyError(f"no image {image_id!r} in {self.folder}: use an image id returned by generate or regenerate")
        with Image.open(path) as image:
            return image.convert("RGB")
