"""Threads under concurrent and hostile use: one writer per thread, review answers checked before they are stored,
no path read on a server client's say, data folders that cannot be one, lost run folders and deleting threads."""

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError
from scripted import FakeGenerator, ScriptedCritic, fake_backends
from test_postgres_threads import postgres_url  # noqa: F401 - a fixture, requested by name below

from imagerag.agent.checkpoints import open_checkpointer, thread_lock
from imagerag.agent.config import Settings
from imagerag.agent.events import Finished, ReviewRequested
from imagerag.agent.run import RunError, delete_thread, history, prepare, resume, run, stream
from imagerag.graphs import build_graph
from imagerag.graphs.context import register_backends
from imagerag.graphs.nodes import ReviewDecision
from imagerag.graphs.state import Budget
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import content_id

PROMPT = "a heart and a square"
BUSY = r"is being written by another run \(pid \d+ on [^)]+\); wait for it or use another thread"

# Files opened while `_watch` is armed (an audit hook sees every open, by builtins, io, pathlib or PIL; hooks
# cannot be removed, so one is added for the session and armed per test).
_watched: set[str] = set()
_opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watched and str(args[0]) in _watched:
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


def settings_for(tiny_settings, **update):
    return tiny_settings.model_copy(update={"budget": Budget(max_rounds=2), **update})


def png(path: Path | None = None, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def paused(settings, backends, out: Path, thread: str) -> ReviewRequested:
    """A run of `thread` paused at its first review."""
    event = list(stream(PROMPT, settings, out, thread=thread, backends=backends))[-1]
    assert isinstance(event, ReviewRequested)
    return event


# Bug 4 and 5: one writer per thread.


def test_a_second_message_to_a_thread_being_written_is_refused_at_once(tiny_settings, tiny_store, tmp_path):
    settings = settings_for(tiny_settings)
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    run(PROMPT, settings, tmp_path, thread="hostile-busy", backends=backends)
    first = stream("add a star", settings, tmp_path, thread="hostile-busy", backends=backends)
    next(first)  # the second turn has started and holds the thread
    with pytest.raises(RunError, match="thread 'hostile-busy' " + BUSY):
        next(stream("add a circle", settings, tmp_path, thread="hostile-busy", backends=backends))
    second = list(first)[-1].result
    assert second.turn == 2 and second.prompt == "a heart, a square and a star"  # rewritten from its objects
    third = run("add a circle", settings, tmp_path, thread="hostile-busy", backends=backends)
    assert third.turn == 3  # once the thread is free, the refused message is simply the next turn
    assert [t.index for t in history("hostile-busy", settings)] == [1, 2, 3]


def test_a_second_new_run_of_the_same_new_thread_is_refused_and_touches_nothing(tiny_settings, tiny_store, tmp_path):
    settings = settings_for(tiny_settings)
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    winner = stream(PROMPT, settings, tmp_path, thread="hostile-new", backends=backends)
    next(winner)
    recipe = tmp_path / "hostile-new" / "settings.json"
    written = (recipe.read_bytes(), recipe.stat().st_mtime_ns)
    with pytest.raises(RunError, match="thread 'hostile-new' " + BUSY):
        next(stream("a star", settings.model_copy(update={"seed": 7}), tmp_path, thread="hostile-new"))
    assert (recipe.read_bytes(), recipe.stat().st_mtime_ns) == written
    result = list(winner)[-1].result
    assert result.status == "satisfied" and result.prompt == PROMPT and result.turn == 1


def test_a_paused_stream_lets_resume_take_its_thread_without_being_closed(tiny_settings, tiny_store, tmp_path):
    """A caller that answers a review from inside its event loop (the CLI does) resumes while the stream that
    paused is still open: the stream has let go of the thread before it yields its last event."""
    settings = settings_for(tiny_settings, review=True)
    backends = fake_backends(tiny_store, ScriptedCritic([set()]))
    events = stream(PROMPT, settings, tmp_path, thread="hostile-open", backends=backends)
    pause = next(e for e in events if isinstance(e, ReviewRequested))
    follow = list(resume(pause.run_dir, ReviewDecision(action="drop"), settings, backends=backends))
    assert isinstance(follow[-1], Finished) and follow[-1].result.status == "budget_exhausted"


def test_sqlite_checkpoints_are_written_in_wal_mode(tmp_path):
    with open_checkpointer(Settings(data_dir=tmp_path)) as saver:
        assert saver.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


HOLD = """
import sys, time
from imagerag.agent.checkpoints import thread_lock
from imagerag.agent.config import Settings

with thread_lock(Settings(data_dir=sys.argv[1], checkpoint_url=sys.argv[2] or None), "hostile-held"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _killed_holder_leaves_no_lock(settings: Settings) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(settings.data_dir), settings.checkpoint_url or ""],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = f"thread 'hostile-held' is being written by another run \\(pid {holder.pid} "
        with pytest.raises(RunError, match=busy), thread_lock(settings, "hostile-held"):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10  # a server notices a dropped connection within moments, not at once
    while True:
        try:
            with thread_lock(settings, "hostile-held"):
                return
        except RunError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_writer_leaves_no_lock_behind_on_sqlite(tmp_path):
    _killed_holder_leaves_no_lock(Settings(data_dir=tmp_path))


@pytest.mark.slow
def test_a_killed_writer_leaves_no_lock_behind_on_postgres(tmp_path, postgres_url):  # noqa: F811 - the fixture
    settings = Settings(data_dir=tmp_path, checkpoint_url=postgres_url)
    busy = pytest.raises(RunError, match="thread 'hostile-pg' " + BUSY)
    with thread_lock(settings, "hostile-pg"), busy, thread_lock(settings, "hostile-pg"):  # a second session here
        pass
    _killed_holder_leaves_no_lock(settings)
    assert not (tmp_path / "locks").exists()  # the lock lives with the checkpoints, in Postgres


# Bug 6 and Risk 16: review answers.


def test_a_bad_replacement_is_refused_before_it_is_stored(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    settings = settings_for(tiny_settings, review=True)
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    pause = paused(settings, backends, tmp_path, "hostile-bad-answer")
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 5001)).save(huge)  # 40,008,000 pixels, a few kB as PNG
    bad = {
        "/etc/passwd": "/etc/passwd is not an image PIL can read",
        str(tmp_path / "missing.png"): "missing.png is missing",
        str(tmp_path): "is not a file",
        str(huge): "8000x5001 = 40,008,000 pixels, over the limit",
    }
    for path, problem in bad.items():
        with pytest.raises(RunError, match=f"review: .*{problem}"):
            next(resume(pause.run_dir, ReviewDecision(action="replace", images=[path]), settings, backends=backends))
    with pytest.raises(RunError, match="upload 1 is not base64"):
        next(resume(pause.run_dir, {"action": "replace", "uploads": ["%%%"]}, settings, backends=backends))
    with pytest.raises(RunError, match="needs at least one image"):
        next(resume(pause.run_dir, {"action": "replace"}, settings, backends=backends))
    # Nothing of those answers was stored: the run still waits for its review and takes the next answer.
    after = list(resume(pause.run_dir, ReviewDecision(action="drop"), settings, backends=backends))[-1]
    assert isinstance(after, Finished) and after.result.status == "budget_exhausted"
    assert generator.calls[-1]["references"] == 0


def test_a_local_replacement_is_sent_as_bytes_into_the_reference_cache(tiny_settings, tiny_store, tmp_path):
    generator = FakeGenerator()
    settings = settings_for(tiny_settings, review=True)
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    pause = paused(settings, backends, tmp_path, "hostile-replaced")
    mine = tmp_path / "my-heart.png"
    data = png(mine)
    final = list(resume(pause.run_dir, ReviewDecision(action="replace", images=[str(mine)]), settings, backends))[-1]
    mine.unlink()  # the run holds its own copy
    assert isinstance(final, Finished)
    [reference] = [h for c in final.result.candidates for h in c.references]
    copy = Path(reference.source)
    assert copy == settings.data_dir / "references" / f"{content_id(data)}.png" and copy.read_bytes() == data
    assert reference.caption == "my-heart" and generator.calls[-1]["references"] == 1


def _state(settings: Settings, thread: str) -> dict:
    with open_checkpointer(settings) as saver:
        return dict(saver.get_tuple({"configurable": {"thread_id": thread}}).checkpoint["channel_values"])


def test_a_server_client_cannot_make_the_graph_read_a_path(tiny_settings, tiny_store, tmp_path):
    """What a LangGraph Server client sends goes straight into the graph as Command(resume=...): a path is refused
    without being opened, the run asks again, and uploaded bytes are taken."""
    from langgraph.types import Command

    generator = FakeGenerator()
    settings = settings_for(tiny_settings, review=True)
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    pause = paused(settings, backends, tmp_path, "hostile-served")
    secret = tmp_path / "secret.png"
    png(secret, "blue")  # a real image: refused for being a path, not for what it holds
    context = {"profile": "tiny", "data_dir": str(settings.data_dir), "backends_id": register_backends(backends)}
    config = {"configurable": {"thread_id": "hostile-served"}}
    with open_checkpointer(settings) as saver:
        graph = build_graph("imagerag").compile(checkpointer=saver)

        def answer(decision: dict) -> dict:
            graph.invoke(Command(resume=decision), config, context=context)
            return graph.get_state(config).tasks[0].interrupts[0].value

        _watched.update({"/etc/passwd", str(secret)})
        try:
            for path in ("/etc/passwd", str(secret)):
                again = answer({"action": "replace", "images": [path]})
                assert again["round"] == pause.request["round"]
                assert "must be sent as image bytes (uploads: base64 or data: URLs), not as paths" in again["error"]
            assert (
                "upload 1 is not an image PIL can read"
                in answer({"action": "replace", "uploads": ["aGVsbG8="]})["error"]
            )
        finally:
            _watched.clear()
        assert _opened == []
        mine = png(colour="green")
        upload = "data:image/png;base64," + base64.b64encode(mine).decode()
        graph.invoke(
            Command(resume={"action": "replace", "uploads": [upload], "caption": "mine"}), config, context=context
        )
    assert generator.calls[-1]["references"] == 1
    [reference] = [h for c in _state(settings, "hostile-served")["candidates"] for h in c.references]
    assert reference.caption == "mine" and Path(reference.source).read_bytes() == mine
    assert Path(reference.source).parent == settings.data_dir / "references"


# Bug 7 and 8: bad settings are clean errors.


def test_a_huge_seed_is_a_validation_error_before_anything_runs(tiny_settings, tmp_path):
    with pytest.raises(ValidationError, match="less than 9223372036854775808"):
        Settings(profile="tiny", seed=99999999999999999999999)
    unchecked = tiny_settings.model_copy(update={"seed": 99999999999999999999999})  # as an embedding app might
    with pytest.raises(RunError, match="less than 9223372036854775808"):
        next(stream(PROMPT, unchecked, tmp_path / "out", thread="hostile-seed"))
    assert not (tmp_path / "out").exists()


def test_a_data_dir_that_cannot_be_a_folder_is_a_config_error(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    fix = r": pass a writable folder with --data-dir or IMAGERAG_DATA_DIR"
    for data_dir, reason in ((a_file, "it is a file"), (a_file / "below", "Not a directory")):
        settings = Settings(profile="tiny", data_dir=data_dir)
        match = f"cannot use {data_dir} as the data folder \\({reason}\\){fix}"
        with pytest.raises(ConfigError, match=match), open_checkpointer(settings):
            pass
        with pytest.raises(ConfigError, match=match), thread_lock(settings, "hostile-anywhere"):
            pass
        with pytest.raises(ConfigError, match=match):
            next(stream(PROMPT, settings, tmp_path / "out"))
        with pytest.raises(ConfigError, match=match):
            prepare(settings)  # what the CLI calls first, to show progress while models load
    assert not (tmp_path / "out").exists()


# Bug 9: lost run folders and deleting threads.


def test_a_thread_whose_folder_is_gone_names_the_delete_command(tiny_settings, tiny_store, tmp_path):
    settings = settings_for(tiny_settings)
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    run(PROMPT, settings, tmp_path, thread="hostile-lost", backends=backends)
    shutil.rmtree(tmp_path / "hostile-lost")
    lost = r"thread 'hostile-lost' has lost its run folder \(.*\): delete the thread with `imagerag thread delete hostile-lost`"
    with pytest.raises(RunError, match=lost):
        next(stream("add a star", settings, tmp_path, thread="hostile-lost", backends=backends))
    with pytest.raises(RunError, match=lost):
        next(resume("hostile-lost", settings=settings, backends=backends))
    assert delete_thread("hostile-lost", settings, remove_folder=True) is None  # nothing left to remove
    again = run(PROMPT, settings, tmp_path, thread="hostile-lost", backends=backends)
    assert again.turn == 1 and again.status == "satisfied"


def test_delete_thread_removes_its_checkpoints_and_on_request_its_folder(tiny_settings, tiny_store, tmp_path):
    settings = settings_for(tiny_settings)
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    kept = Path(run(PROMPT, settings, tmp_path, thread="hostile-del", backends=backends).run_dir)
    assert delete_thread("hostile-del", settings) is None
    assert (kept / "run.json").is_file()
    with pytest.raises(RunError, match="no thread 'hostile-del'"):
        history("hostile-del", settings)
    with pytest.raises(RunError, match="no thread 'hostile-del'"):
        delete_thread("hostile-del", settings)

    folder = Path(run(PROMPT, settings, tmp_path / "b", thread="hostile-del", backends=backends).run_dir)
    with thread_lock(settings, "hostile-del"), pytest.raises(RunError, match="thread 'hostile-del' " + BUSY):
        delete_thread("hostile-del", settings, remove_folder=True)
    assert delete_thread("hostile-del", settings, remove_folder=True) == folder
    assert not folder.exists() and tmp_path.joinpath("b").is_dir()
    assert run(PROMPT, settings, tmp_path / "b", thread="hostile-del", backends=backends).turn == 1


@pytest.mark.parametrize("victim", ["no settings.json", "another name", "a link"])
def test_delete_thread_removes_nothing_but_the_thread_run_folder(tiny_settings, tiny_store, tmp_path, victim):
    settings = settings_for(tiny_settings)
    backends = fake_backends(tiny_store, ScriptedCritic([{"c1", "c2"}]))
    thread = f"hostile-victim-{len(victim)}"
    real = Path(run(PROMPT, settings, tmp_path / "runs", thread=thread, backends=backends).run_dir)
    precious = tmp_path / "precious" / (thread if victim != "another name" else "home")
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    if victim == "another name":
        (precious / "settings.json").write_text("{}")
    elif victim == "a link":
        precious = tmp_path / "links" / thread
        precious.parent.mkdir()
        precious.symlink_to(real, target_is_directory=True)
    # A checkpoint that records another folder (tampered, or a bug): it must not become an rm -rf of that folder.
    with open_checkpointer(settings) as saver:
        graph = build_graph("imagerag").compile(checkpointer=saver)
        graph.update_state({"configurable": {"thread_id": thread}}, {"run_dir": str(precious)})
    with pytest.raises(RunError, match=f"refusing to remove {precious}: it is not the run folder of thread"):
        delete_thread(thread, settings, remove_folder=True)
    assert precious.is_dir() and (real / "settings.json").is_file()
    assert [t.index for t in history(thread, settings)] == [1]  # refused before anything was deleted
