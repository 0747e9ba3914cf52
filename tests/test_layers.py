"""The import contract of pyproject.toml, enforced by pytest so that `make test` fails on an upward import.

import-linter and grimp find `imagerag` on sys.path. Installed in editable mode, `imagerag` is a namespace whose
folders are reached through a setuptools hook, which grimp cannot walk; so each check runs in a subprocess whose
PYTHONPATH holds a symlink farm, `imagerag/{agent,graphs,tools,prompts,evals}` -> the repository's folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("agent", "graphs", "tools", "prompts", "evals")
CONTRACT = "Layers import one way: evals on top, then agent, graphs, tools, prompts"
DOOR = "The Toolkit is the one door from the graphs to the backends"


@pytest.fixture
def farm(tmp_path: Path) -> Path:
    """A folder whose `imagerag/` holds the repository's top folders (by symlink, so edits are seen as they are)."""
    package = tmp_path / "farm" / "imagerag"
    package.mkdir(parents=True)
    for name in LAYERS:
        (package / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp_path / "farm"


def run(command: list[str], cwd: Path, pythonpath: Path | None) -> subprocess.CompletedProcess[str]:
    """`command` in a fresh process whose PYTHONPATH is `pythonpath` alone (none: the installed package only)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_layers_contract_is_kept(farm: Path) -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    # The config file as a positional argument: `--config` still works in import-linter 2.x but is deprecated.
    result = run([str(lint_imports), "--no-cache", "--no-logo", str(REPO / "pyproject.toml")], REPO, farm)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{CONTRACT} KEPT" in output, output  # the contract of pyproject.toml was the one checked
    assert f"{DOOR} KEPT" in output, output
    assert "Contracts: 2 kept, 0 broken." in output, output


CYCLES_SCRIPT = textwrap.dedent(
    """
    import json
    import grimp

    graph = grimp.build_graph("imagerag", cache_dir=None)  # function-level imports included
    found = sorted(
        [module, *graph.find_shortest_chain(importer=imported, imported=module)]
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    print(json.dumps({"modules": sorted(graph.modules), "cycles": found}))
    """
)


def test_no_import_cycles(farm: Path) -> None:
    """A module never imports one that (through any chain, lazy imports included) imports it back."""
    result = run([sys.executable, "-c", CYCLES_SCRIPT], farm.parent, farm)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The graph really holds the project (an empty graph has no cycles either).
    assert {"imagerag.agent.cli", "imagerag.graphs.rules", "imagerag.tools.types"} <= set(report["modules"])
    cycles = "\n".join(" -> ".join(chain) for chain in report["cycles"])
    assert not report["cycles"], f"import cycles:\n{cycles}"


NAMES_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.util, json

    generic = [name for name in ("agent", "tools", "graphs", "prompts", "evals") if importlib.util.find_spec(name)]
    cli = importlib.import_module("imagerag.agent.cli")
    print(json.dumps({"generic": generic, "cli": cli.__file__}))
    """
)


def test_install_adds_no_generic_top_level_names(tmp_path: Path) -> None:
    """Only `imagerag` lands on the path; `agent`, `tools`, ... would shadow (or be shadowed by) other packages.
    Run from a folder other than the repository root, which pytest may have put on sys.path."""
    result = run([sys.executable, "-c", NAMES_SCRIPT], tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["generic"] == []
    assert Path(report["cli"]) == REPO / "agent" / "cli.py"
