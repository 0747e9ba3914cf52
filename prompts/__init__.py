"""Named prompt templates (Jinja2, strict: a missing variable is an error, never an empty string)."""

from __future__ import annotations

from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined


@cache
def _env() -> Environment:
    return Environment(
        loader=PackageLoader("imagerag.prompts", ""),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def render(name: str, **variables) -> str:
    """Render prompts/<name>.j2 with `variables`."""
    return _env().get_template(f"{name}.j2").render(**variables).strip()
