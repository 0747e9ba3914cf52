"""One base for every error a user can fix. Front ends (the CLI, the MCP server, the assistant tool, the LangGraph
Server app) show such an error's message as it is, with no traceback; anything else is a bug and is shown as one."""

from __future__ import annotations


class ImageRAGError(ValueError):
    """Input or setup that cannot work; the message names the problem and the fix.

    A ValueError, so code that already catches ValueError around user input keeps doing so."""


class ConfigError(ImageRAGError):
    """A setting that cannot work; the message says which and how to fix it."""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the input or the setup is wrong, not a bug: the project's own, pydantic's refusal of a
    value, and a file that is not there."""
    from pydantic import ValidationError

    return (ImageRAGError, ValidationError, FileNotFoundError)


def user_message(error: Exception) -> str:
    """A user error as one line: which field and what is wrong for pydantic's, the message for the others."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        )
    return str(error)
