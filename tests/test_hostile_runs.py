"""Hostile input to runs, round two (issue 23): an --out folder on a full disk, a copied run folder given to
resume, and a chat line far over the prompt limit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import imagerag, runner

from imagerag.agent.cli import app
from imagerag.graphs.state import MAX_PROMPT_CHARS

PROMPT = "a red square and a blue circle"


@pytest.mark.slow
def test_an_out_folder_on_a_full_disk_says_so_and_the_run_resumes_once_there_is_space(data_dir, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    cli = Path(sys.executable).parent / "imagerag"
    common = f"--data-dir {data_dir} --out {mount}"
    script = f"""
set -u
mount -t tmpfs -o size=12k tmpfs {mount} || exit 90
{cli} generate '{PROMPT}' --profile tiny --thread full --max-rounds 3 {common} 2> {tmp_path}/full.err; echo "first=$?"
mount -o remount,size=16m {mount}
{cli} resume full --data-dir {data_dir} 2> {tmp_path}/resumed.err; echo "second=$?"
ls {mount}/full
"""
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], check=False, capture_output=True, text=True, timeout=600
    )
    assert "first=" in done.stdout, done.stdout + done.stderr  # the tmpfs was mounted (root in a mount namespace)
    full = " ".join((tmp_path / "full.err").read_text().split())
    assert "first=2" in done.stdout and "Traceback" not in full, full
    assert "is full" in full and "imagerag resume" in full, full
    resumed = (tmp_path / "resumed.err").read_text()
    assert "second=0" in done.stdout and "Traceback" not in resumed, resumed
    assert "run.json" in done.stdout and "report.html" in done.stdout  # written once there was space


def test_resume_refuses_a_copied_run_folder_and_names_the_real_one(data_dir, tmp_path):
    made = imagerag(
        "generate",
        PROMPT,
        "--profile",
        "tiny",
        "--thread",
        "orig",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "a"),
    )
    assert made.exit_code == 0, made.output
    copy = tmp_path / "b" / "orig"
    shutil.copytree(tmp_path / "a" / "orig", copy)
    before = sorted(p.name for p in copy.rglob("*"))
    refused = imagerag("resume", str(copy), "--data-dir", str(data_dir))
    assert refused.exit_code == 2 and "is not the folder its run recorded" in " ".join(refused.output.split())
    assert sorted(p.name for p in copy.rglob("*")) == before  # nothing written into the copy


def test_a_chat_line_over_the_limit_is_refused_and_the_chat_goes_on(data_dir, tmp_path):
    lines = [PROMPT, "x" * 60_000, "make the square green", ""]
    args = ["chat", "--thread", "long", "--profile", "tiny", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    result = runner.invoke(app, args, input="\n".join(lines) + "\n", env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"more than {MAX_PROMPT_CHARS}" in said  # refused, with the limit
    shown = imagerag("history", "long", "--data-dir", str(data_dir))
    assert "make the square green" in shown.output and "xxxx" not in shown.output
