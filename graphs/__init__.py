"""The LangGraph machines: `imagerag` (deterministic, the paper's procedure in a loop) and `agent` (LLM).

Both take RunInput, return RunOutput and read their backends through RunContext (graphs.context)."""

from __future__ import annotations

from typing import Any

from langgraph.graph import StateGraph

from imagerag.graphs.context import RunContext
from imagerag.graphs.state import RunInput, RunOutput
from imagerag.tools.errors import ConfigError

POLICIES = ("imagerag", "agent")


def build_graph(
    policy: str, context: type[RunContext] = RunContext
) -> StateGraph[Any, RunContext, RunInput, RunOutput]:
    """The uncompiled builder for `policy`; callers compile it with the checkpointer they need. `context` is the
    schema of the run context: ClientContext where a remote client supplies it."""
    if policy == "imagerag":
        from imagerag.graphs.imagerag import build_imagerag_graph

        return build_imagerag_graph(context)
    if policy == "agent":
        from imagerag.graphs.agent import build_agent_graph

        return build_agent_graph(context)
    raise ConfigError(f"unknown policy {policy!r}: use 'imagerag' or 'agent'")
