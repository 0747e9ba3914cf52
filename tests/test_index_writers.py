"""Writers of one data folder (issue 23 items 2 and 6): the writer lock, concurrent indexers, `index --repair` of a
damaged collection, and a full disk under --data-dir.

A lock holder runs in a subprocess (an flock is per process); the concurrent indexers are two worker processes that
run the `imagerag index` command once per round, each round into a fresh data folder, ten rounds. The full disk is
a 1 MiB tmpfs mounted in a private mount namespace (`unshare -m`, root here), plus a simulated ENOSPC.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.agent.config import Settings
from imagerag.tools.backends import indexer
from imagerag.tools.backends.indexer import REPAIR_OF_KEY, repair_collection, repair_name
from imagerag.tools.backends.loading import load_embedder, open_store
from imagerag.tools.backends.store import (
    CollectionDamaged,
    DiskFull,
    ReferenceStore,
    StoreBusy,
    chroma_client,
    disk_full,
    writer_lock,
)

runner = CliRunner()

HOLDER = """
import sys
from imagerag.tools.backends.store import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""

# One concurrent indexer: runs `imagerag index` in-process once per line (a data folder) and reports the counts and
# whether it had to wait for the other writer.
WORKER = """
import json, logging, sys
from imagerag.agent.cli import app
folder = sys.argv[1]
notes = []
class Note(logging.Handler):
    def emit(self, record):
        notes.append(record.getMessage())
logging.getLogger("imagerag.tools.backends.store").addHandler(Note())
print("ready", flush=True)
for line in sys.stdin:
    notes.clear()
    args = ["index", folder, "--profile", "tiny", "--data-dir", line.strip(), "--collection", "race", "--workers", "0"]
    try:
        app(args, prog_name="imagerag")
        code = 0
    except SystemExit as stop:
        code = stop.code
    print(json.dumps({"code": code, "waited": any(n.startswith("waiting for") for n in notes)}), flush=True)
"""


def png(colour, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def distinct_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(png((i % 256, (i // 256) * 40, 7)))
        (folder / f"{i:04d}.txt").write_text(f"square number {i}")
    return folder


def fresh_data_dir(path: Path, models_from: Path) -> Path:
    """An empty data folder that shares the session's tiny models (built once, minutes of work)."""
    path.mkdir(parents=True)
    (path / "tiny-models").symlink_to(models_from / "tiny-models")
    return path


def hold_lock(data_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0


def said(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


def wait_for(condition, what: str, limit: float = 120.0) -> None:
    """Poll until `condition()` holds (a liveness guard, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_second_writer_stops_after_its_timeout_naming_the_first_and_waits_without_one(tmp_path, data_dir, caplog):
    folder = distinct_images(tmp_path / "photos", 3)
    target = fresh_data_dir(tmp_path / "data", data_dir)
    holder = hold_lock(target)
    try:
        named = rf"process {holder.pid} \(`-c {re.escape(str(target))}`, since .*is writing to the database"
        with pytest.raises(StoreBusy, match=named), writer_lock(target, timeout=0.2):
            pass
        # A Chroma server takes concurrent writers: nothing is locked for it.
        with writer_lock(target, chroma_url="http://127.0.0.1:9", timeout=0):
            pass

        args = ["index", str(folder), "--profile", "tiny", "--data-dir", str(target), "--collection", "busy"]
        stopped = runner.invoke(app, [*args, "--lock-timeout", "0.3"])
        assert stopped.exit_code == 2, stopped.output
        assert f"process {holder.pid}" in said(stopped.stderr) and "--lock-timeout" in said(stopped.stderr)
        assert "Traceback" not in stopped.output
        assert not (target / "chroma").exists()  # the database was not even opened

        # Without a timeout the second writer waits, says so, and goes on once the first is done.
        outcome: dict[str, object] = {}
        thread = threading.Thread(target=lambda: outcome.update(result=runner.invoke(app, args)))
        with caplog.at_level(logging.WARNING):
            thread.start()
            wait_for(lambda: any(r.getMessage().startswith("waiting for process") for r in caplog.records), "the wait")
            assert thread.is_alive() and not (target / "chroma").exists()
            release(holder)
            thread.join(timeout=300)
        result = outcome["result"]
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
        assert "added 3" in said(result.stderr)  # type: ignore[attr-defined]
        assert f"waiting for process {holder.pid}" in " ".join(r.getMessage() for r in caplog.records)
    finally:
        holder.kill()


def test_a_killed_writer_leaves_no_lock(tmp_path):
    holder = hold_lock(tmp_path)
    with pytest.raises(StoreBusy), writer_lock(tmp_path, timeout=0):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    # The kernel dropped the lock with the process; and the lock is re-entrant in one thread (open_store renders the
    # corpus under its own hold).
    with writer_lock(tmp_path, timeout=0), writer_lock(tmp_path, timeout=0):
        pass


def test_the_local_profiles_first_use_build_waits_for_the_writer_lock(tmp_path, data_dir, caplog):
    target = fresh_data_dir(tmp_path / "data", data_dir)
    settings = Settings(profile="tiny", data_dir=target)
    holder = hold_lock(target)
    built: dict[str, ReferenceStore] = {}
    thread = threading.Thread(target=lambda: built.update(store=open_store(settings)))
    try:
        with caplog.at_level(logging.WARNING):
            thread.start()
            wait_for(lambda: any(r.getMessage().startswith("waiting for process") for r in caplog.records), "the wait")
        assert thread.is_alive() and not (target / "tiny-corpus" / ".complete").exists()
        release(holder)
        thread.join(timeout=300)
    finally:
        holder.kill()
    assert built["store"].count() == 8 and (target / "tiny-corpus" / ".complete").exists()


@pytest.mark.slow
def test_two_concurrent_indexers_never_damage_one_embedded_collection(tmp_path, data_dir):
    images = 300
    folder = distinct_images(tmp_path / "photos", images)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    embedder = load_embedder(Settings(profile="tiny", data_dir=data_dir))
    waits = 0
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        for round_ in range(10):
            target = fresh_data_dir(tmp_path / f"round{round_}", data_dir)
            for worker in workers:  # both start the same index command at once
                assert worker.stdin is not None
                worker.stdin.write(f"{target}\n")
                worker.stdin.flush()
            reports = [json.loads(worker.stdout.readline()) for worker in workers]  # type: ignore[union-attr]
            assert [r["code"] for r in reports] == [0, 0], reports
            waits += sum(r["waited"] for r in reports)

            store = ReferenceStore.open(chroma_client(target), "race", embedder)
            assert store.count() == images, f"round {round_}: {store.count()} rows for {images} distinct images"
            got = store.collection.get(include=[])["ids"]
            assert len(set(got)) == images
            hits = store.search("square number 7", k=5)
            assert len(hits) == 5 and all(Path(h.source).parent == folder.resolve() for h in hits)
    finally:
        for worker in workers:
            worker.kill()
    assert waits >= 1, "the two indexers never overlapped: the test did not exercise the lock"


def indexed_then_damaged(folder: Path, data: Path, name: str) -> None:
    """`imagerag index` in another process (chromadb keeps an index it loaded in memory, so this process must first
    read the collection after the damage), then its HNSW index files overwritten, as two writers at once could.

    chromadb persists an HNSW index only from 1,000 vectors on (below, it rebuilds one from its log), so `folder`
    must hold more."""
    imagerag = Path(sys.executable).parent / "imagerag"
    args = [str(imagerag), "index", str(folder), "--profile", "tiny", "--data-dir", str(data), "--collection", name]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, said(done.stderr)
    files = list((data / "chroma").glob("*/header.bin"))
    assert files, "no HNSW index on disk to damage"
    for header in files:
        header.write_bytes(b"\0" * 10)
        (header.parent / "link_lists.bin").write_bytes(b"\xff" * 100)


@pytest.mark.slow
def test_a_damaged_collection_names_the_repair_and_index_repair_rebuilds_it(tmp_path, data_dir):
    folder = distinct_images(tmp_path / "photos", 1100)
    target = fresh_data_dir(tmp_path / "data", data_dir)
    base = ["--profile", "tiny", "--data-dir", str(target), "--collection", "mended"]
    indexed_then_damaged(folder, target, "mended")

    again = runner.invoke(app, ["index", str(folder), *base])
    assert again.exit_code == 2, again.output
    assert "imagerag index --repair --collection mended" in said(again.stderr) and "Traceback" not in again.output
    search = runner.invoke(app, ["search", "square", *base])
    assert search.exit_code == 2 and "--repair" in said(search.stderr) and "Traceback" not in search.output

    assert runner.invoke(app, ["index", str(folder), "--repair", *base]).exit_code == 2  # sources or --repair
    repaired = runner.invoke(app, ["index", "--repair", *base])
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: added 1100" in said(repaired.stderr) and "holds 1100" in said(repaired.stderr)
    found = runner.invoke(app, ["search", "square number 3", "-k", "2", *base])
    assert found.exit_code == 0, found.output
    assert "square number" in found.stdout
    names = {c.name for c in chroma_client(target).list_collections()}
    assert names == {"mended"}  # the fresh one took the name; nothing left over


@pytest.mark.slow
def test_an_interrupted_repair_leaves_the_damaged_collection_until_a_rerun_completes(tmp_path, data_dir, monkeypatch):
    folder = distinct_images(tmp_path / "photos", 1100)
    target = fresh_data_dir(tmp_path / "data", data_dir)
    embedder = load_embedder(Settings(profile="tiny", data_dir=data_dir))
    indexed_then_damaged(folder, target, "fragile")
    client = chroma_client(target)
    damaged_id = client.get_collection("fragile").id
    with pytest.raises(CollectionDamaged, match="imagerag index --repair --collection fragile"):
        ReferenceStore.open(client, "fragile", embedder).search("square", k=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexer, "index_sources", killed)
    with pytest.raises(KeyboardInterrupt):
        repair_collection(client, "fragile", embedder, target)
    assert client.get_collection("fragile").id == damaged_id  # untouched
    leftover = client.get_collection(repair_name("fragile"))
    assert leftover.metadata[REPAIR_OF_KEY] == "fragile"

    monkeypatch.undo()
    repaired, notes = repair_collection(client, "fragile", embedder, target)
    assert repaired.count() == 1100 and repaired.collection.id != damaged_id
    assert any("not rebuilt" in note for note in notes)  # the reference cache is a recorded folder, named
    assert {c.name for c in client.list_collections()} == {"fragile"}
    assert len(repaired.search("square number 2", k=3)) == 3


def shard(path: Path, n: int, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
            for name, data in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.txt", f"noise {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_full_disk_stops_indexing_saying_what_was_kept_and_a_rerun_resumes(tmp_path, data_dir, monkeypatch):
    # Simulated: the third cache copy finds no space (errno ENOSPC, as the kernel says it).
    source = shard(tmp_path / "00000.tar", 8)
    target = fresh_data_dir(tmp_path / "data", data_dir)
    real_copy, copies = indexer.cache_copy, []

    def copy_until_full(*args, **kwargs):
        copies.append(1)
        if len(copies) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(indexer, "cache_copy", copy_until_full)
    args = ["index", str(source), "--profile", "tiny", "--data-dir", str(target), "--collection", "full"]
    result = runner.invoke(app, [*args, "--batch-size", "4"])
    assert result.exit_code == 2, result.output
    assert "the disk is full" in said(result.stderr) and "this run added 4 image(s)" in said(result.stderr)
    assert "run the same command again" in said(result.stderr) and "Traceback" not in result.output
    monkeypatch.undo()
    resumed = runner.invoke(app, [*args, "--batch-size", "4"])
    assert resumed.exit_code == 0 and "added 4, skipped 4" in said(resumed.stderr), resumed.output


def test_disk_full_is_recognised_in_the_words_each_layer_uses():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert disk_full(Exception("database or disk is full"))  # SQLite's words
    wrapped = ValueError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert disk_full(wrapped)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert issubclass(DiskFull, ValueError)


@pytest.mark.slow
def test_a_data_dir_on_a_full_tmpfs_gives_a_clear_error_and_resumes_once_there_is_space(tmp_path, data_dir):
    source = shard(tmp_path / "00000.tar", 60, size=96)  # 60 images of 28 KB, 1.7 MB: more than the tmpfs holds
    mount = tmp_path / "mnt"
    mount.mkdir()
    imagerag = Path(sys.executable).parent / "imagerag"
    index = f"{imagerag} index {source} --profile tiny --data-dir {mount}/d --collection full --batch-size 8"
    script = f"""
set -u
mount -t tmpfs -o size=1m tmpfs {mount} || exit 90
mkdir {mount}/d && ln -s {data_dir}/tiny-models {mount}/d/tiny-models
{index} 2> {tmp_path}/full.err; echo "first=$?"
mount -o remount,size=64m {mount}
{index} 2> {tmp_path}/resumed.err; echo "second=$?"
"""
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], check=False, capture_output=True, text=True, timeout=600
    )
    assert "first=2" in done.stdout and "second=0" in done.stdout, done.stdout + said(done.stderr)
    full = said((tmp_path / "full.err").read_text())
    assert "disk is full" in full and "run the same command again" in full and "Traceback" not in full
    resumed = said((tmp_path / "resumed.err").read_text())
    assert "holds 60" in resumed and "skipped" in resumed and "Traceback" not in resumed
