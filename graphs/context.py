"""The run context (LangGraph's context_schema): settings passed with every call and never checkpointed, so a
resumed run passes them again. Nodes turn them into a Toolkit over backends cached per process."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from langgraph.config import get_config
from langgraph.prebuilt import ToolRuntime
from langgraph.runtime import Runtime
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagerag.graphs.state import MAX_RETRIEVE_K, MAX_TOOL_ERRORS, THREAD_PATTERN, RunState
from imagerag.tools.config import BackendConfig
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import RunFolder, content_id
from imagerag.tools.toolkit import Backends, Toolkit, load_backends


class RunContext(BackendConfig, BaseSettings):
    """Backends and policy knobs of a run. Unset fields come from IMAGERAG_* variables (so a LangGraph Server is
    configured by its environment), then the defaults."""

    model_config = SettingsConfigDict(env_prefix="IMAGERAG_", env_nested_delimiter="__", extra="ignore")

    retrieve_k: int = Field(default=1, ge=1, le=MAX_RETRIEVE_K, description="References retrieved per missing concept.")
    samples: int = Field(
        default=1, ge=1, le=16, description="Images per round, drawn in one batched call; each is judged and counted."
    )
    edits: bool = Field(
        default=True,
        description="Redraw only the regions of what is missing when the best image holds the rest (else redraw all).",
    )
    check_stop: bool = Field(
        default=True,
        description="Before a run stops on an image the critic passes whole, the critic looks again (its verify, "
        "when it has one): what the second look does not confirm is missing, and the loop goes on.",
    )
    object_references: bool = Field(
        default=True,
        description="Hand the generator the object the critic located in each reference (when retrieval re-ranks by "
        "the critic), not the whole retrieved image.",
    )
    region_references: bool = Field(
        default=True,
        description="In an edit, give each redrawn object its own reference acting only in its region, so one edit "
        "fixes several objects (needs a generator that masks references); else one reference conditions the edit.",
    )
    max_tool_errors: int = Field(
        default=3, ge=1, le=MAX_TOOL_ERRORS, description="Consecutive failed tool calls before a run fails."
    )
    runs_dir: Path | None = Field(
        default=None, description="Where run folders go (one per thread); default: DATA_DIR/runs."
    )
    backends_id: str | None = Field(
        default=None, description="Backends handed over in this process (register_backends); default: load them."
    )


# Where data lives and what to connect to: set by whoever runs the process, never by a remote client.
SERVER_ONLY = frozenset({"data_dir", "runs_dir", "device", "chroma_url", "llm", "backends_id"})


class ClientContext(RunContext):
    """The context a LangGraph Server client may send: how to draw (profile, collection, retrieve_k, ...), never
    where data lives or what to connect to; those come from the server's IMAGERAG_* environment."""

    def __init__(self, **values: Any) -> None:
        refused = sorted(SERVER_ONLY & set(values))
        if refused:
            raise ConfigError(
                f"a client cannot set {', '.join(refused)}: the server decides where data lives and what it connects "
                "to (its IMAGERAG_* environment); send only how to draw, e.g. profile, collection, retrieve_k"
            )
        for name in ("profile", "collection"):  # names, never paths or pasted text
            value = values.get(name)
            if value is not None and not (isinstance(value, str) and re.fullmatch(THREAD_PATTERN, value)):
                raise ConfigError(
                    f"{name} must be a name of at most 100 letters, digits, '.', '_' or '-' (got {str(value)[:40]!r}"
                    f"{'...' if len(str(value)) > 40 else ''}): e.g. tiny, mini, sdxl"
                )
        super().__init__(**values)


_registered: dict[str, Backends] = {}


def register_backends(backends: Backends) -> str:
    """Hand already-built backends (an embedding app's, a test's fakes) to runs that name the returned id."""
    key = f"in-process:{id(backends)}"
    _registered[key] = backends
    return key


def context_of(runtime: Runtime[RunContext] | ToolRuntime[RunContext, Any] | None) -> RunContext:
    """The call's context; a caller that passed none (or a plain dict, as a server does) gets the environment's."""
    context = runtime.context if runtime is not None else None
    if isinstance(context, RunContext):
        return context
    return RunContext(**(context or {}))


def backends_for(context: RunContext) -> Backends:
    if context.backends_id is not None:
        try:
            return _registered[context.backends_id]
        except KeyError:
            raise ConfigError(
                f"no backends {context.backends_id!r} in this process: drop backends_id to load them"
            ) from None
    return load_backends(context)


def run_dir_of(state: RunState, context: RunContext) -> Path:
    """The run's folder: the one its first node recorded, else <runs_dir>/<thread_id>."""
    if state.run_dir:
        return Path(state.run_dir)
    thread = str((get_config().get("configurable") or {}).get("thread_id") or "_no_thread")
    if not re.fullmatch(THREAD_PATTERN, thread):  # a thread id names a folder: never a path of its own
        thread = content_id(thread.encode())
    return Path(context.runs_dir or Path(context.data_dir) / "runs") / thread


def toolkit(state: RunState, runtime: Runtime[RunContext] | ToolRuntime[RunContext, Any]) -> Toolkit:
    """The tools for this run: backends from the call's context, images in the run's folder, progress to the
    graph's stream."""
    context = context_of(runtime)
    images = RunFolder(run_dir_of(state, context)).images
    return Toolkit(
        backends_for(context),
        images,
        runtime.stream_writer,
        check_stop=context.check_stop,
        object_references=context.object_references,
    )
