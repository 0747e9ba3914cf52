"""Checkpointers: SQLite in the data folder by default, Postgres when a URL is configured; and the thread lock.

Every run is checkpointed after each node, so a killed run resumes where it stopped and a thread remembers its
turns. Only our own pydantic types are allowed out of a checkpoint (CHECKPOINT_TYPES). One run at a time writes a
thread (thread_lock): two writers would both continue from the same checkpoint and one turn would be lost.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from pydantic import BaseModel

from imagerag.agent.config import Settings
from imagerag.agent.runfolder import RunError
from imagerag.graphs import agent_tools
from imagerag.graphs import state as graphs_state
from imagerag.graphs.state import THREAD_PATTERN
from imagerag.tools import types as tools_types
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import content_id

# The modules whose pydantic types a checkpoint may hold (the run's state and what the tools exchange); allowing only
# those keeps checkpoint loading strict (no arbitrary types), and a type added to one of them needs no entry here.
STATE_MODULES = (tools_types, graphs_state, agent_tools)
CHECKPOINT_TYPES = [
    (module.__name__, name)
    for module in STATE_MODULES
    for name, value in vars(module).items()
    if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__
]
LOCKS = "locks"  # in the data folder: one lock file per thread that SQLite checkpoints


def checkpoint_serde() -> JsonPlusSerializer:
    return JsonPlusSerializer(allowed_msgpack_modules=CHECKPOINT_TYPES)


def data_folder(settings: Settings) -> Path:
    """The data folder, created if missing; a path that cannot be one fails with the fix, not an errno."""
    folder = Path(settings.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = "it is a file" if folder.exists() and not folder.is_dir() else (error.strerror or str(error))
    else:
        if os.access(folder, os.W_OK):
            return folder
        problem = "it is not writable"
    raise ConfigError(
        f"cannot use {folder} as the data folder ({problem}): pass a writable folder with --data-dir or "
        "IMAGERAG_DATA_DIR"
    )


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
    path = data_folder(settings) / "checkpoints.sqlite"
    try:
        conn = sqlite3.connect(path, check_same_thread=False)
    except sqlite3.Error as error:
        raise ConfigError(
            f"cannot open the checkpoint database {path} ({error}): pass a writable folder with --data-dir or "
            "IMAGERAG_DATA_DIR"
        ) from None
    try:
        # WAL: readers (history, a resume looking up its thread) never wait for a run that is writing, and runs of
        # different threads in several processes write the file in turn instead of failing on "database is locked".
        conn.execute("PRAGMA journal_mode=WAL")
        yield SqliteSaver(conn, serde=checkpoint_serde())
    finally:
        conn.close()


def _holder() -> str:
    """Who holds a lock, for the message the next writer gets (a pid alone means nothing on another host)."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _busy(thread: str, holder: str) -> RunError:
    return RunError(f"thread {thread!r} is being written by another run ({holder}); wait for it or use another thread")


@contextmanager
def thread_lock(settings: Settings, thread: str) -> Iterator[None]:
    """Hold `thread` for one writer for the whole block; a second writer gets a RunError at once, never a wait.

    The lock lives where the thread's checkpoints live and dies with the process that holds it, so a killed run
    never leaves it behind: on SQLite an OS lock on a file per thread (released by the kernel when the process
    ends; a lock row in the database would outlive a kill and need guessing whether its pid is still alive), on
    Postgres a session advisory lock (released by the server when the connection closes).
    """
    if settings.checkpoint_url:
        with _advisory_lock(settings.checkpoint_url, thread):
            yield
        return
    folder = data_folder(settings) / LOCKS
    folder.mkdir(exist_ok=True)
    # A thread id names a folder; one that is not a plain name (a server's) is hashed rather than made a path.
    name = thread if re.fullmatch(THREAD_PATTERN, thread) else content_id(thread.encode())
    # Lock files are never deleted: a process that opened the old file could lock it while another locks a new one.
    with open(folder / f"{name}.lock", "a+", encoding="utf-8") as handle:
        try:
            # flock, not lockf: flock locks belong to the open file, so two runs in one process (an MCP server's
            # threads) exclude each other too; lockf locks belong to the process and would let them both in.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise _busy(thread, handle.read().strip() or "pid unknown") from None
        handle.truncate(0)
        handle.write(_holder())
        handle.flush()
        yield  # closing the file releases the lock, as the kernel does for a killed process


def advisory_key(thread: str) -> int:
    """The 64-bit signed key of a thread's Postgres advisory lock."""
    digest = hashlib.sha256(f"imagerag-agent thread {thread}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _advisory_lock(url: str, thread: str) -> Iterator[None]:
    import psycopg

    key = advisory_key(thread)
    # A connection of its own, held for the run and closed at its end, which releases the lock (as the server does
    # for a killed process): the saver's connection runs transactions and pipelines that a session lock must not
    # depend on. application_name tells the next writer who holds the thread.
    with psycopg.connect(url, autocommit=True, application_name=f"imagerag {_holder()}"[:63]) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not (row and row[0]):
            holder = conn.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                "AND l.classid::bigint = %s AND l.objid::bigint = %s",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
            ).fetchone()
            raise _busy(thread, str(holder[0]).removeprefix("imagerag ") if holder else "pid unknown")
        yield
