"""The LangGraph machines: `imagerag` (deterministic, the paper's procedure in a loop) and `agent` (LLM)."""

from __future__ import annotations

from langgraph.graph import StateGraph

from agent.config import ConfigError, Settings
from tools.toolkit import Toolkit


def build_graph(policy: str, toolkit: Toolkit, settings: Settings) -> StateGraph:
    """The uncompiled builder for `policy`; callers compile it with the checkpointer they need."""
    from graphs.agent import build_agent_graph
    from graphs.imagerag import build_imagerag_graph

    if policy == "imagerag":
        return build_imagerag_graph(toolkit, retrieve_k=settings.retrieve_k)
    if policy == "agent":
        if toolkit.backends.llm is None:
            raise ConfigError(
                "the agent policy needs an LLM: set IMAGERAG_LLM__MODEL (and IMAGERAG_LLM__BASE_URL for vLLM or "
                "Ollama), or use --policy imagerag"
            )
        return build_agent_graph(toolkit, toolkit.backends.llm, settings.max_tool_errors)
    raise ConfigError(f"unknown policy {policy!r}: use 'imagerag' or 'agent'")

