"""The command line under hostile input: text reaches the terminal as data, a bad value is a clean error, and no
file appears outside the folders a command was given."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from imagerag.agent.cli import app, plain

runner = CliRunner()


def imagerag(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def tiny(data_dir: Path, out: Path) -> list[str]:
    return ["--profile", "tiny", "--data-dir", str(data_dir), "--out", str(out), "--max-rounds", "1"]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_square_brackets_in_a_prompt_are_text_not_markup_and_the_run_finishes(data_dir, tmp_path):
    result = imagerag("generate", "a red [/bold] square [link=x]", *tiny(data_dir, tmp_path))
    assert result.exit_code == 0, result.output
    assert "MarkupError" not in result.output and "[/bold]" in result.stderr
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run_dir / "run.json").exists() and (run_dir / "report.html").exists()


def test_terminal_escape_sequences_are_shown_never_sent(data_dir, tmp_path):
    result = imagerag("generate", "a \x1b[31mred\x1b[0m square \u202e", *tiny(data_dir, tmp_path))
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr
    assert "\\x1b[31mred" in result.stderr and "\\u202e" in result.stderr


def test_a_caption_with_markup_and_escapes_is_printed_as_data(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    Image.new("RGB", (32, 32), "green").save(folder / "g.png")
    (folder / "g.txt").write_text("a green [/] square \x1b]0;pwned\x07")
    common = ["--profile", "tiny", "--data-dir", str(tmp_path / "data"), "--collection", "hostile"]
    assert imagerag("index", str(folder), *common).exit_code == 0
    found = imagerag("search", "a green square", *common)
    assert found.exit_code == 0, found.output
    assert "a green [/] square" in found.stdout and "\x1b" not in found.stdout and "\\x1b]0;pwned\\x07" in found.stdout


def test_plain_escapes_every_control_character_and_keeps_the_rest():
    assert plain("tab\there\nnew line").plain == "tab\there\nnew line"
    assert plain("\x00\x07\x1b\x7f\x9b\u2066").plain == "\\x00\\x07\\x1b\\x7f\\x9b\\u2066"
    assert plain("[bold]x[/bold] ü 日本").plain == "[bold]x[/bold] ü 日本"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=200), thread=st.none() | st.text(max_size=40))
def test_any_prompt_and_thread_give_a_finished_run_or_a_clean_error_inside_their_folders(data_dir, prompt, thread):
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        out = work / "out"
        before = files_under(data_dir)
        args = ["generate", prompt, *tiny(data_dir, out)] + (["--thread", thread] if thread is not None else [])
        result = imagerag(*args)
        assert result.exit_code in (0, 2), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        new_in_data = {p.relative_to(data_dir).parts[0] for p in files_under(data_dir) - before}
        assert new_in_data <= {
            "chroma",
            "checkpoints.sqlite",
            "checkpoints.sqlite-wal",
            "checkpoints.sqlite-shm",
            "locks",
        }
        assert files_under(work) <= files_under(out)  # nothing written beside --out
        if result.exit_code == 0:
            assert any(p.name == "run.json" for p in files_under(out))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=st.text(max_size=80))
def test_any_review_answer_or_run_name_is_a_clean_error(data_dir, tmp_path, answer):
    result = imagerag("resume", answer or "x", "--decision", answer, "--data-dir", str(data_dir))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.strip().startswith("error:")


def test_serving_mcp_on_a_network_address_without_a_token_is_refused(data_dir):
    result = runner.invoke(
        app,
        ["serve", "mcp", "--http", "--host", "0.0.0.0", "--profile", "tiny", "--data-dir", str(data_dir)],
        env={"COLUMNS": "250", "IMAGERAG_MCP_TOKEN": ""},
    )
    assert result.exit_code == 2
    assert "pass --token or set IMAGERAG_MCP_TOKEN" in " ".join(result.stderr.split())


def test_thread_delete_removes_a_thread_whose_folder_was_deleted_by_hand(data_dir, tmp_path):
    import shutil

    assert imagerag("generate", "a red square", *tiny(data_dir, tmp_path), "--thread", "gone").exit_code == 0
    shutil.rmtree(tmp_path / "gone")
    stuck = imagerag("generate", "make it blue", *tiny(data_dir, tmp_path), "--thread", "gone")
    assert stuck.exit_code == 2 and "imagerag thread delete gone" in " ".join(stuck.stderr.split())
    deleted = imagerag("thread", "delete", "gone", "--data-dir", str(data_dir))
    assert deleted.exit_code == 0, deleted.output
    assert imagerag("history", "gone", "--data-dir", str(data_dir)).exit_code == 2
    assert imagerag("generate", "a green square", *tiny(data_dir, tmp_path), "--thread", "gone").exit_code == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caption=st.text(max_size=300))
def test_any_search_caption_gives_hits_or_a_clean_error(data_dir, caption):
    with tempfile.TemporaryDirectory() as scratch:
        here = Path.cwd()
        os.chdir(scratch)  # --sheet writes ./<caption>.png: the only file the command may write
        try:
            result = runner.invoke(
                app,
                [
                    "search",
                    caption,
                    "--profile",
                    "tiny",
                    "--data-dir",
                    str(data_dir),
                    "--collection",
                    "tiny",
                    "--sheet",
                ],
                env={"COLUMNS": "250"},
            )
        finally:
            os.chdir(here)
        assert result.exit_code in (0, 2), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output and "\x1b" not in result.output
        written = list(Path(scratch).rglob("*"))
        assert all(p.parent == Path(scratch) and p.suffix == ".png" for p in written), written
        assert len(written) == (1 if result.exit_code == 0 and "0 hit(s)" not in result.stdout else 0)
