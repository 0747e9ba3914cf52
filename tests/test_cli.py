"""The command line: a run folder with run.json and report.html per policy, and clear errors on bad input."""

import json
from pathlib import Path

import pytest
from scripted import FakeOpenAIServer
from test_openai_http import scripted_openai
from typer.testing import CliRunner

from imagerag.agent.cli import app

runner = CliRunner()
PROMPT = "a red heart on the left and a blue square on the right"


def imagerag(*args: str, **env):
    return runner.invoke(app, list(args), env={"COLUMNS": "250", **env})


def test_generate_writes_a_run_folder_and_prints_json(data_dir, tmp_path):
    result = imagerag(
        "generate",
        PROMPT,
        "--profile",
        "tiny",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path),
        "--max-rounds",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    run_dir = Path(printed["run_dir"])
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved == printed
    assert saved["status"] in {"satisfied", "budget_exhausted"} and saved["rounds"] <= 2
    assert {"status", "best_image", "concepts", "rounds", "generations", "usage", "elapsed", "steps"} <= saved.keys()
    assert (run_dir / saved["best_image"]).exists()
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= saved["generations"] and "a blue square on the right" in report


def test_generate_with_the_agent_policy_over_an_openai_compatible_endpoint(data_dir, tmp_path):
    with FakeOpenAIServer(scripted_openai()) as server:
        result = imagerag(
            "generate",
            PROMPT,
            "--profile",
            "tiny",
            "--policy",
            "agent",
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path),
            "--json",
            IMAGERAG_LLM__MODEL="gpt-4o-2024-08-06",
            IMAGERAG_LLM__BASE_URL=server.base_url,
        )
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["policy"] == "agent" and saved["status"] == "satisfied" and saved["generations"] == 2


def test_settings_come_from_a_toml_file_under_the_flags(data_dir, tmp_path, monkeypatch):
    config = tmp_path / "imagerag.toml"
    config.write_text(f'profile = "tiny"\ndata_dir = "{data_dir}"\n[budget]\nmax_rounds = 1\n')
    monkeypatch.setenv("IMAGERAG_CONFIG", str(config))
    result = imagerag("generate", PROMPT, "--out", str(tmp_path / "runs"), "--json")
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert (
        saved["profile"] == "tiny"
        and saved["rounds"] == 1
        and saved["stop_reason"] in {"budget_exhausted:rounds", "satisfied"}
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "   ", "--profile", "tiny"], "the prompt is empty"),
        (["generate", PROMPT, "--profile", "nope"], "unknown profile 'nope'"),
        (
            ["generate", PROMPT, "--profile", "tiny", "--max-rounds", "0"],
            "max_rounds: Input should be greater than or equal to 1",
        ),
        (["generate", PROMPT, "--profile", "tiny", "--collection", "absent"], "no reference collection 'absent'"),
        (["generate", PROMPT, "--profile", "tiny", "--policy", "agent"], "the agent policy needs an LLM"),
        (["index", "/no/such/folder", "--profile", "tiny"], "no image folder at /no/such/folder"),
    ],
)
def test_bad_input_gets_a_clear_error_and_a_nonzero_exit(data_dir, tmp_path, args, message):
    result = imagerag(
        *args, "--data-dir", str(data_dir), *(["--out", str(tmp_path / "runs")] if args[0] == "generate" else [])
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no half-made run folder


def test_an_unwritable_out_dir_is_refused_before_any_work(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = imagerag(
        "generate", PROMPT, "--profile", "tiny", "--data-dir", str(data_dir), "--out", str(blocker / "runs")
    )
    assert result.exit_code == 2 and "cannot write runs to" in " ".join(result.stderr.split())


def test_index_is_incremental(data_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "copy-of-img0.png").write_bytes((folder / "img0.png").read_bytes())  # same content, same id
    first = imagerag("index", str(folder), "--profile", "tiny", "--data-dir", str(data_dir), "--collection", "cli-test")
    second = imagerag(
        "index", str(folder), "--profile", "tiny", "--data-dir", str(data_dir), "--collection", "cli-test"
    )
    assert "added 3, skipped 1, failed 1" in first.stderr
    assert "added 0, skipped 4, failed 1" in second.stderr
    search = imagerag(
        "search",
        "img1",
        "--profile",
        "tiny",
        "--data-dir",
        str(data_dir),
        "--collection",
        "cli-test",
        "-k",
        "2",
    )
    assert search.exit_code == 0 and "2 hit(s)" in search.stdout


def test_chat_refines_one_thread_and_history_lists_its_turns(data_dir, tmp_path):
    messages = "a red heart on the left and a blue square on the right\nmake the square green\n\n"
    result = runner.invoke(
        app,
        ["chat", "--thread", "talk", "--profile", "tiny", "--data-dir", str(data_dir), "--out", str(tmp_path)],
        input=messages,
    )
    assert result.exit_code == 0, result.output
    listed = imagerag("history", "talk", "--data-dir", str(data_dir))
    assert listed.exit_code == 0
    assert "make the square green" in listed.stdout and "a red heart on the left" in listed.stdout
    saved = json.loads((tmp_path / "talk" / "run.json").read_text())
    assert saved["turn"] == 2 and saved["prompt"] == "a red heart on the left and a green square on the right"


def test_review_at_the_terminal(data_dir, tmp_path):
    result = runner.invoke(
        app,
        [
            "generate",
            PROMPT,
            "--profile",
            "tiny",
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path),
            "--max-rounds",
            "2",
            "--review",
            "--json",
        ],
        input="drop\n",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout[result.stdout.index("{") :])
    assert "review before round 2" in " ".join(result.stderr.split())
    assert saved["generations"] == 2 and saved["candidates"][1]["references"] == []
    assert any(s["node"] == "review" and "no reference" in s["summary"] for s in saved["steps"])


def test_a_local_profile_builds_its_collection_on_first_use_from_any_folder(tmp_path, monkeypatch):
    """No index step, no --data-dir: the tiny profile renders and indexes its references into the default data
    folder (IMAGERAG_DATA_DIR here) on the first run, then draws."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    result = imagerag("generate", "a red square", "--profile", "tiny", "--max-rounds", "2", IMAGERAG_DATA_DIR=str(home))
    assert result.exit_code == 0, result.output
    assert (home / "tiny-corpus" / ".complete").exists() and (home / "chroma").is_dir()
    again = imagerag("search", "a red square", "--profile", "tiny", "-k", "2", IMAGERAG_DATA_DIR=str(home))
    assert again.exit_code == 0 and "2 hit(s)" in again.stdout


def test_a_hub_profile_without_weights_or_hub_fails_fast_naming_the_offline_demo(tmp_path):
    """HF_HUB_OFFLINE=1 (set for the tests) and an empty Hub cache: the default sdxl profile refuses at once."""
    result = imagerag(
        "generate",
        "a red fox",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "runs"),
        HF_HOME=str(tmp_path / "hf"),
    )
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "--profile mini" in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder was made


def test_runs_and_threads_of_the_previous_version_fail_with_what_to_do(data_dir, tmp_path):
    """A 0.1 run folder (settings.json held the whole Settings) is readable but cannot be resumed."""
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "settings.json").write_text(json.dumps({"profile": "tiny", "data_dir": str(data_dir), "policy": "imagerag"}))
    result = imagerag("resume", str(old), "--data-dir", str(data_dir))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "earlier version of imagerag-agent" in message and "start a new run" in message


def test_eval_paper_without_a_dataset_or_dsg_file_is_a_clear_error(data_dir, tmp_path):
    result = imagerag("eval", "paper", "--profile", "tiny", "--data-dir", str(data_dir), "--out", str(tmp_path / "p"))
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and not (tmp_path / "p" / "paper.json").exists()
