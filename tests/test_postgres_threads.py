"""Threads on a real PostgreSQL server (a throwaway cluster on 127.0.0.1) through langgraph-checkpoint-postgres."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from scripted import ScriptedCritic, fake_backends

from imagerag.agent.run import history, run
from imagerag.graphs.state import Budget

pytestmark = pytest.mark.slow  # starts a PostgreSQL server

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres(*command: str) -> list[str]:
    # The server refuses to run as root; the Debian image has a postgres user for exactly this.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="module")
def postgres_url():
    if not BIN:
        pytest.fail("PostgreSQL server binaries are not installed: `make test` installs Debian's postgresql package")
    # Not under pytest's tmp folder: that is private to the test user, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="imagerag-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        _as_postgres(f"{BIN[-1]}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust"),
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder}"
    subprocess.run(
        _as_postgres(f"{BIN[-1]}/pg_ctl", "-D", str(data), "-o", options, "-w", "start", "-l", str(folder / "log")),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    finally:
        subprocess.run(
            _as_postgres(f"{BIN[-1]}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_a_thread_lives_in_postgres(tiny_settings, tiny_store, tmp_path, postgres_url):
    settings = tiny_settings.model_copy(update={"checkpoint_url": postgres_url, "budget": Budget(max_rounds=2)})
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    first = run("a heart and a square", settings, tmp_path, thread="pg-thread", backends=backends)
    second = run("add a star", settings, tmp_path, thread="pg-thread", backends=backends)
    assert first.status == "satisfied" and second.turn == 2 and second.prompt == "a heart, a square and a star"
    assert [t.message for t in history("pg-thread", settings)] == ["a heart and a square", "add a star"]
    # The thread is in Postgres, not in the SQLite file of the data folder.
    with pytest.raises(Exception, match="no thread 'pg-thread'"):
        history("pg-thread", settings.model_copy(update={"checkpoint_url": None}))
    assert Path(first.run_dir).name == "pg-thread"
