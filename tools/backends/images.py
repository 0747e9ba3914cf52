"""Content-addressed PNG store inside a run folder: graph state holds ids, never pixels."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from imagerag.tools.files import ID_CHARS, atomic_write, content_id

_IMAGE_ID = re.compile(rf"^[0-9a-f]{{{ID_CHARS}}}$")


class ImageStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def put(self, image: Image.Image) -> str:
        """Save `image` once under its content hash and return the id (writes are atomic: no half PNG)."""
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        image_id = content_id(data)
        path = self.path(image_id)
        if not path.exists():
            atomic_write(path, data)
        return image_id

    def path(self, image_id: str) -> Path:
        # An id is a hash, never a path: "../x" or an absolute path cannot reach outside the folder.
        if not _IMAGE_ID.match(image_id):
            raise KeyError(f"{image_id!r} is not an image id: use an image id returned by generate or regenerate")
        return self.folder / f"{image_id}.png"

    def get(self, image_id: str) -> Image.Image:
        path = self.path(image_id)
        if not path.exists():
            raise KeyError(
                f"no image {image_id!r} in {self.folder}: use an image id returned by generate or regenerate"
            )
        with Image.open(path) as image:
            return image.convert("RGB")
