"""`imagerag --help` and every subcommand's help answer without loading a heavy library.

agent/cli.py imports torch, diffusers, langgraph, chromadb, ... only inside the commands that use them; one
module-level import would make every `--help` wait seconds. Checked in a fresh interpreter, since this pytest
process has them all loaded already. (No wall-clock assertion: the absence of the modules is the deterministic
proxy for a fast start.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "open_clip",
    "chromadb",
    "langgraph",
    "langchain_core",
    "langchain_openai",
)

# Every command of agent/cli.py; the script also walks the app, so a command added later is checked as well.
EXPECTED = {
    "",
    "generate",
    "resume",
    "chat",
    "history",
    "index",
    "search",
    "eval",
    "eval miniworld",
    "serve",
    "serve mcp",
}

SCRIPT = textwrap.dedent(
    """
    import json, sys

    import typer
    from typer.testing import CliRunner

    from imagerag.agent import cli

    # The console script's own entry point first: main() sets up logging and the libraries' environment.
    sys.argv = ["imagerag", "--help"]
    try:
        cli.main()
        main_code = None
    except SystemExit as stop:
        main_code = stop.code

    def walk(command, path):
        yield path
        for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
            yield from walk(sub, [*path, name])

    runner = CliRunner()
    helps = {}
    for path in walk(typer.main.get_command(cli.app), []):
        result = runner.invoke(cli.app, [*path, "--help"])
        helps[" ".join(path)] = {"code": result.exit_code, "output": result.output, "error": repr(result.exception)}
    heavy = [name for name in HEAVY if name in sys.modules]
    print(json.dumps({"main": main_code, "helps": helps, "heavy": heavy}))
    """
)


@pytest.fixture(scope="module")
def startup() -> dict[str, Any]:
    """One fresh interpreter: `imagerag --help` through main(), then every command's --help, then sys.modules."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="120")
    result = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{SCRIPT}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_imagerag_help_through_the_entry_point_exits_0(startup: dict[str, Any]) -> None:
    assert startup["main"] == 0


@pytest.mark.parametrize("command", sorted(EXPECTED), ids=lambda c: c or "imagerag")
def test_help_of_each_command_exits_0(startup: dict[str, Any], command: str) -> None:
    assert command in startup["helps"], sorted(startup["helps"])
    help_ = startup["helps"][command]
    assert help_["code"] == 0, help_["error"] + "\n" + help_["output"]
    assert "Usage:" in help_["output"], help_["output"]


def test_commands_added_later_also_answer_help(startup: dict[str, Any]) -> None:
    failed = {path: h["error"] for path, h in startup["helps"].items() if h["code"] != 0}
    assert not failed, failed


def test_top_level_help_lists_the_commands(startup: dict[str, Any]) -> None:
    top = startup["helps"][""]["output"]
    assert [
        name
        for name in ("generate", "resume", "chat", "history", "index", "search", "eval", "serve")
        if name not in top
    ] == []


def test_help_loads_no_heavy_library(startup: dict[str, Any]) -> None:
    assert startup["heavy"] == [], f"imported by --help: {startup['heavy']}"
