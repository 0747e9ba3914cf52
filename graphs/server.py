"""The policies as LangGraph Server graphs (`langgraph.json`, `langgraph dev` / LangGraph Platform).

The server loads `imagerag` and `agent` from here. Each is a graph factory: for a thread it builds the policy graph
over backends made from the environment's Settings (IMAGERAG_PROFILE, IMAGERAG_DATA_DIR, IMAGERAG_LLM__MODEL,
..., or imagerag.toml), loaded once per process and closed over by the graph; the state holds only ids, texts and
verdicts. A thread's images are written to `<data_dir>/runs/<thread_id>/images/<image_id>.png`. The server supplies
the checkpointer, so a thread continues like `imagerag generate --thread`.

Input of a run: `{"prompt": "...", "budget": {"max_rounds": 3}}` (the fields of `agent.state.RunInput`). The final
state carries `status`, `concepts` with their verdicts, `candidates` and `steps`. The pipelines are not re-entrant:
serve with `--n-jobs-per-worker 1`.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

from langchain_core.runnables import RunnableConfig

# `agent` before `graphs`: graphs/__init__ imports agent.config, whose package imports agent.run, which imports
# graphs; loaded in this order the cycle closes (the server loads this file by path, not as graphs.server).
import agent.run  # noqa: F401,I001
from agent.config import ConfigError, Settings
from graphs import build_graph
from tools.backends.images import ImageStore
from tools.toolkit import Backends

_loading = threading.Lock()


@cache
def server_settings() -> Settings:
    """Settings from the server's environment; review pauses are off (the server has nobody to ask)."""
    settings = Settings()
    settings.resolved_profile()
    return settings.model_copy(update={"review": False})


@cache
def _backends() -> Backends:
    from tools.backends.loading import load_backends

    return load_backends(server_settings())


def server_backends() -> Backends:
    with _loading:  # two first runs at once load the models once
        return _backends()


def thread_dir(config: RunnableConfig) -> Path:
    """The thread's folder under <data_dir>/runs (a schema read without a thread gets a scratch folder)."""
    thread_id = (config.get("configurable") or {}).get("thread_id") or "_no_thread"
    return Path(server_settings().data_dir) / "runs" / str(thread_id)


def policy_graph(policy: str, config: RunnableConfig, backends: Backends):
    from tools.toolkit import Toolkit

    settings = server_settings().model_copy(update={"policy": policy})
    toolkit = Toolkit(backends, ImageStore(thread_dir(config) / "images"))
    return build_graph(policy, toolkit, settings).compile()  # the server adds its checkpointer


@asynccontextmanager
async def imagerag(config: RunnableConfig):
    """The deterministic policy: the paper's procedure, iterated within the budget."""
    backends = await asyncio.to_thread(server_backends)  # loading models must not block the server's event loop
    yield policy_graph("imagerag", config, backends)


@asynccontextmanager
async def agent(config: RunnableConfig):
    """The LLM policy; needs IMAGERAG_LLM__MODEL (and IMAGERAG_LLM__BASE_URL for vLLM or Ollama)."""
    backends = await asyncio.to_thread(server_backends)
    if backends.llm is None:
        raise ConfigError("the agent graph needs an LLM: set IMAGERAG_LLM__MODEL for the server, or use the imagerag graph")
    yield policy_graph("agent", config, backends)
