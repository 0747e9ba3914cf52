"""A run killed with SIGKILL mid-way resumes from its last checkpoint; finished images are not made again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scripted import FakeGenerator, ScriptedCritic, fake_backends

from imagerag.agent.checkpoints import open_checkpointer
from imagerag.agent.config import Settings
from imagerag.agent.run import resume

pytestmark = pytest.mark.slow  # a real CLI process, killed and resumed

PROMPT = "a red heart on the left and a blue square on the right"


def test_a_killed_run_resumes_where_it_stopped(data_dir, tiny_store, tmp_path):
    budget = 10
    command = [
        str(Path(sys.executable).with_name("imagerag")),
        "generate",
        PROMPT,
        "--profile",
        "tiny",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path),
        "--thread",
        "killed",
        "--max-rounds",
        str(budget),
        "--max-generations",
        str(budget),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = tmp_path / "killed" / "images"
    deadline = time.time() + 300
    while len(list(images.glob("*.png"))) < 2:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}

    with open_checkpointer(Settings(data_dir=data_dir)) as saver:
        values = saver.get_tuple({"configurable": {"thread_id": "killed"}}).checkpoint["channel_values"]
    done = values["usage"].generations
    assert 1 <= done < budget and values.get("status", "running") == "running"

    generator = FakeGenerator()  # counts what the resumed run still has to draw
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    # Where data lives comes from the caller, never from the run folder.
    final = list(resume(tmp_path / "killed", settings=Settings(data_dir=data_dir), backends=backends))[-1].result
    assert final.status == "budget_exhausted" and final.generations == budget
    assert len(generator.calls) == budget - done
    kept = {c.image_id + ".png" for c in final.candidates}
    assert set(before) - kept <= {max(before, key=before.get)}  # at most the image being made at the kill is redone
    for name, mtime in before.items():
        assert (images / name).stat().st_mtime_ns == mtime  # nothing was overwritten
    saved = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert saved["generations"] == budget and [s["node"] for s in saved["steps"]].count("plan") == 1
