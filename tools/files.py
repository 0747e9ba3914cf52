"""Files written safely and named by content (one atomic writer and one hash scheme for the whole project), and the
layout of a run folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

ID_CHARS = 32  # 128 bits of sha256: collisions are out of reach for any collection a person will index


def content_id(data: bytes) -> str:
    """Identical bytes, identical id: an image or a file is stored once and re-indexing skips it."""
    return hashlib.sha256(data).hexdigest()[:ID_CHARS]


def file_id(path: Path) -> str:
    """content_id of a file, read in chunks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:ID_CHARS]


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder: readers see the old file or the new
    one, never half of one, and a crash leaves no partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class RunFolder:
    """The layout of a run folder, for every module that writes or reads one: the recipe a run was started with,
    its result and report, and its images by content id. A thread keeps one folder and adds to it."""

    SETTINGS = "settings.json"

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def settings(self) -> Path:
        return self.root / self.SETTINGS

    @property
    def result(self) -> Path:
        return self.root / "run.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def image(self, image_id: str) -> Path:
        return self.images / f"{image_id}.png"
