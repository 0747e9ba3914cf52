"""Checkpointers: SQLite in the data folder by default, Postgres when a URL is configured.

Every run is checkpointed after each node, so a killed run resumes where it stopped and a thread remembers its
turns. Only our own pydantic types are allowed out of a checkpoint (CHECKPOINT_TYPES).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver

from imagerag.agent.config import Settings
from imagerag.tools.config import ConfigError

# Our pydantic types that checkpoints may hold; listing them keeps checkpoint loading strict (no arbitrary types).
CHECKPOINT_TYPES = [
    *[
        ("imagerag.tools.types", name)
        for name in ("Concept", "ConceptVerdict", "Critique", "RetrievalHit", "Candidate")
    ],
    *[("imagerag.graphs.state", name) for name in ("Budget", "Usage", "Step", "Turn")],
    ("imagerag.graphs.agent_tools", "ToolOutcome"),
]


def checkpoint_serde() -> JsonPlusSerializer:
    return JsonPlusSerializer(allowed_msgpack_modules=CHECKPOINT_TYPES)


@contextmanager
def open_checkpointer(settings: Settings) -> Iterator[BaseCheckpointSaver]:
    if settings.checkpoint_url:
        try:
            from langgraph.checkpoint.postgres import PostgresSaver
        except ImportError:
            raise ConfigError("a Postgres checkpoint URL needs `pip install 'imagerag-agent[postgres]'`") from None
        with PostgresSaver.from_conn_string(settings.checkpoint_url) as saver:
            saver.serde = checkpoint_serde()
            saver.setup()
            yield saver
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(settings.data_dir / "checkpoints.sqlite", check_same_thread=False)
    try:
        yield SqliteSaver(conn, serde=checkpoint_serde())
    finally:
        conn.close()
