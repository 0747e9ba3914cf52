"""One base for every error a user can fix. Front ends (the CLI, the MCP server, the assistant tool, the LangGraph
Server app) show such an error's message as it is, with no traceback; anything else is a bug and is shown as one."""

from __future__ import annotations


class ImageRAGError(ValueError):
    """Input or setup that cannot work; the message names the problem and the fix.

    A ValueError, so code that already catches ValueError around user input keeps doing so."""
