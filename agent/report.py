"""report.html: one self-contained page per run (images inlined), readable offline and shareable."""

from __future__ import annotations

import base64
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from imagerag.agent.result import RunResult
from imagerag.tools.backends.layout import object_view
from imagerag.tools.backends.llm import image_data_url
from imagerag.tools.backends.store import ReferenceStore
from imagerag.tools.files import RunFolder
from imagerag.tools.types import RetrievalHit

REFERENCE_THUMBNAIL = 256  # pixels on the long side: the page shows references small


def _data_url(path: Path) -> str | None:
    if not path.exists():
        return None
    kind = "jpeg" if path.suffix.lower() in {".jpg", ".jpeg"} else path.suffix.lower().lstrip(".") or "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def _reference_urls(hit: RetrievalHit) -> tuple[str, str | None] | None:
    """A reference as data URLs, the whole image and the object the critic located in it (None without a box), read
    through the store: only files inside the indexed folders (or the data folder's reference cache), within the
    pixel limit; anything else is left out of the page."""
    try:
        image = ReferenceStore.load_image(hit)
    except (OSError, ValueError):
        return None
    views = [image] + ([object_view(image, hit.box, "crop")] if hit.box is not None else [])
    for view in views:
        view.thumbnail((REFERENCE_THUMBNAIL, REFERENCE_THUMBNAIL))
    urls = [image_data_url(view) for view in views]
    return urls[0], urls[1] if len(urls) > 1 else None


def render_report(result: RunResult) -> str:
    env = Environment(
        loader=PackageLoader("imagerag.agent", ""),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["html", "j2"]),
    )
    images = {c.image_id: _data_url(RunFolder(Path(result.run_dir)).image(c.image_id)) for c in result.candidates}
    references = {h.id: _reference_urls(h) for c in result.candidates for h in c.references}
    texts = {c.id: c.text for c in result.concepts}
    return env.get_template("report.html.j2").render(r=result, images=images, references=references, texts=texts)
