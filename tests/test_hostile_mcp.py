"""The MCP server against hostile callers: a server on the network without a token, a web page that reaches it
through DNS rebinding, arguments of the wrong type or name, and arbitrary text in every text argument.

The HTTP checks run in process (httpx's ASGI transport against the server's app), the tool checks through the
MCP SDK's in-memory client, with fake models, so that hypothesis can try many inputs in seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from scripted import ScriptedCritic, fake_backends

from imagerag.agent.config import Settings
from imagerag.agent.mcp_server import TOKEN_ENV, build_server, http_app, required_token, serve_mcp, transport_security
from imagerag.tools.errors import ConfigError

TOKEN = "s3cret-token-for-tests-0123456789"
REPO = Path(__file__).resolve().parents[1]
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
# A call ends with an image (satisfied, a budget spent, stopped) or, for a refinement it cannot map, a question.
FINISHED = {"satisfied", "budget_exhausted", "stopped", "needs_clarification"}


def text_of(result) -> str:
    return " ".join(c.text for c in result.content if c.type == "text")


# --- HTTP: a bearer token, and the Host and Origin checks on every bind --------------------------------------------


def post_initialize(
    host: str, token: str | None, cases: dict[str, dict[str, str]], allowed_hosts: tuple[str, ...] = ()
) -> dict[str, httpx.Response]:
    """POST an MCP initialize to the server's HTTP app once per case, with that case's headers."""
    server = build_server(Settings(profile="tiny"))
    app = http_app(server, host, token, transport_security(host, allowed_hosts))
    base = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

    async def main() -> dict[str, httpx.Response]:
        async with server.session_manager.run():  # the app's lifespan, which the ASGI transport does not run
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
                return {
                    case: await client.post("/mcp", json=INITIALIZE, headers=base | headers)
                    for case, headers in cases.items()
                }

    return anyio.run(main)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_http_requests_need_the_bearer_token():
    cases = {
        "none": {},
        "wrong": bearer("not-the-token-0123456789"),
        "prefix": bearer(TOKEN[:-1]),
        "basic": {"authorization": f"Basic {TOKEN}"},
        "right": bearer(TOKEN),
        "right, lower-case scheme": {"authorization": f"bearer {TOKEN}"},
    }
    responses = post_initialize("127.0.0.1", TOKEN, cases)
    statuses = {case: response.status_code for case, response in responses.items()}
    assert statuses == {
        "none": 401,
        "wrong": 401,
        "prefix": 401,
        "basic": 401,
        "right": 200,
        "right, lower-case scheme": 200,
    }
    refused = responses["none"]
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer <token>" in refused.text and TOKEN not in refused.text
    assert "serverInfo" in responses["right"].text  # the token let the request through to MCP


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_foreign_host_or_origin_is_refused_on_every_bind(host):
    # DNS rebinding: a page on evil.example resolves its own name to this server; the browser then sends
    # Host: evil.example and Origin: http://evil.example. The SDK checked them only on a loopback bind.
    own = "imagerag.lan:8000" if host == "0.0.0.0" else "127.0.0.1:8000"
    cases = {
        "own name": {**bearer(TOKEN), "host": own},
        "own origin": {**bearer(TOKEN), "host": own, "origin": f"http://{own}"},
        "foreign host": {**bearer(TOKEN), "host": "evil.example:8000"},
        "foreign origin": {**bearer(TOKEN), "host": own, "origin": "http://evil.example"},
        "foreign host, no token": {"host": "evil.example"},
    }
    responses = post_initialize(host, TOKEN, cases, ("imagerag.lan",))
    statuses = {case: response.status_code for case, response in responses.items()}
    assert statuses == {
        "own name": 200,
        "own origin": 200,
        "foreign host": 421,
        "foreign origin": 403,
        "foreign host, no token": 401,
    }


def test_the_allowed_names_are_loopback_the_bound_address_and_those_given():
    security = transport_security("0.0.0.0", ["imagerag.lan", "192.168.1.20:8443", "fe80::1"])
    assert security.enable_dns_rebinding_protection
    assert set(security.allowed_hosts) == {
        *("127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*", "[::1]", "[::1]:*"),
        *("imagerag.lan", "imagerag.lan:*", "192.168.1.20:8443", "[fe80::1]", "[fe80::1]:*"),
    }  # 0.0.0.0 is no name a client writes
    assert "https://imagerag.lan:*" in security.allowed_origins and "http://evil.example" not in str(security)
    assert "10.0.0.5:*" in transport_security("10.0.0.5").allowed_hosts
    for bad in ["*", "http://imagerag.lan", "imagerag.lan/mcp", "0.0.0.0", "", "a b"]:
        with pytest.raises(ConfigError, match="is not a host name"):
            transport_security("0.0.0.0", [bad])


def test_a_network_bind_without_a_token_refuses_to_start(tiny_settings, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ["0.0.0.0", "::", "192.168.1.20", "imagerag.lan"]:
        with pytest.raises(ConfigError, match=f"pass --token or set {TOKEN_ENV}"):
            serve_mcp(tiny_settings, http=True, host=host, port=1)
    with pytest.raises(ConfigError, match="at least 16 printable ASCII"):
        serve_mcp(tiny_settings, http=True, host="0.0.0.0", port=1, token="short")
    assert required_token("127.0.0.1", None) is None  # loopback: no token needed
    assert required_token("::1", None) is None and required_token("localhost", "") is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert required_token("0.0.0.0", None) == TOKEN  # from the environment, which keeps it out of `ps`
    with pytest.raises(ConfigError, match="without spaces"):
        required_token("0.0.0.0", "a token with spaces in it")


# --- tool arguments are strict ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_server(tiny_settings, tiny_store, tmp_path):
    """The MCP server over the tiny profile's collection with fake models: a run takes a fraction of a second."""
    backends = fake_backends(tiny_store, ScriptedCritic([set()]))
    return build_server(tiny_settings, tmp_path / "runs", backends)


def call(server, tool: str, arguments: dict):
    async def main():
        async with Client(server) as client:
            return await client.call_tool(tool, arguments)

    return anyio.run(main)


def test_tool_arguments_are_strict(fake_server):
    async def main():
        async with Client(fake_server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            schemas = {name: tool.input_schema for name, tool in tools.items()}
            answers = {
                case: await client.call_tool(tool, args)
                for case, (tool, args) in {
                    "boolean rounds": ("generate_image", {"prompt": "a red square", "max_rounds": True}),
                    "string rounds": ("generate_image", {"prompt": "a red square", "max_rounds": "2"}),
                    "float rounds": ("refine_image", {"thread": "t", "instruction": "x", "max_rounds": 1.0}),
                    "boolean k": ("search_references", {"caption": "a red square", "k": False}),
                    "misspelt": ("generate_image", {"prompt": "a red square", "max_round": 1}),
                    "extra": ("search_references", {"caption": "a red square", "k": 1, "path": "/etc/passwd"}),
                }.items()
            }
            return schemas, answers

    schemas, answers = anyio.run(main)
    assert all(schema["additionalProperties"] is False for schema in schemas.values())
    assert all(answer.is_error for answer in answers.values())
    for case in ("boolean rounds", "string rounds", "float rounds"):
        assert "max_rounds" in text_of(answers[case]) and "valid integer" in text_of(answers[case]), case
    assert "k" in text_of(answers["boolean k"]) and "valid integer" in text_of(answers["boolean k"])
    assert "unknown argument(s) 'max_round': generate_image takes prompt, max_rounds, thread" in text_of(
        answers["misspelt"]
    )
    assert "unknown argument(s) 'path': search_references takes caption, k" in text_of(answers["extra"])
    ok = call(fake_server, "search_references", {"caption": "a red square", "k": 1})
    assert not ok.is_error and len(ok.structured_content["hits"]) == 1  # a right call still works


# --- arbitrary text into every text argument -----------------------------------------------------------------------

MARKUP = ["[/bold]", "[/]", "[bold red]", "[link=file:///etc/passwd]x[/link]", "\x1b[31m", "\x1b]8;;http://x\x07"]
PIECES = [*MARKUP, "a red square", " ", "\n", "\r", "\t", "\x00", "\x7f", "../", "/etc/passwd", "%s", "{0}", "é", "🙂"]
HOSTILE_TEXT = st.one_of(
    st.text(max_size=200),  # any unicode, control characters included
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=50),
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.sampled_from([f"a red {m} square" for m in MARKUP]),
    st.integers(3_990, 9_000).map(lambda n: ("a green [/] square " * 500)[:n]),  # around and over the limit
)
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    database=None,  # nothing written to .hypothesis in the working folder
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def files_under(root: Path, skip: tuple[str, ...] = ()) -> set[Path]:
    """Every file under `root`, not descending into folders named in `skip` (os.walk prunes them: a virtual
    environment has tens of thousands of files)."""
    found: set[Path] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        found.update(Path(folder, name) for name in files)
    return found


@pytest.fixture
def confined(tmp_path, tmp_path_factory, data_dir, monkeypatch) -> Iterator[None]:
    """Fails the test if a file appears anywhere but the data folder and tmp_path/runs: under pytest's temporary
    folders, the default data folder, the working folder (moved to an empty one) and the repository."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    default_data = Path(os.environ["IMAGERAG_DATA_DIR"])
    # hypothesis keeps its own cache in .hypothesis beside the tests: the test tool's, not the server's.
    repo_skip = (".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", "node_modules", "tests")
    roots = {tmp_path_factory.getbasetemp(): (), default_data: (), REPO: repo_skip}
    before = {root: files_under(root, skip) for root, skip in roots.items()}
    yield
    allowed = (data_dir.resolve(), (tmp_path / "runs").resolve())
    for root, skip in roots.items():
        new = files_under(root, skip) - before[root]
        if root == REPO:
            # Sources may be edited by people while this runs; nothing the server writes is one of these.
            new = {p for p in new if p.suffix not in {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".pyc"}}
        stray = [p for p in new if not any(p.resolve().is_relative_to(a) for a in allowed)]
        assert not stray, f"files written outside the data and run folders: {sorted(stray)[:10]}"


def check_answer(result) -> None:
    """A clean tool error with a message, or a finished run (or a search's hits); never a traceback."""
    text = text_of(result)
    assert "Traceback" not in text and 'File "' not in text, text[:2000]
    if result.is_error:
        assert text.strip(), "an error result without a message"
        return
    answer = result.structured_content
    if "hits" in answer:
        assert all(Path(hit["source"]).exists() for hit in answer["hits"])
        return
    assert answer["status"] in FINISHED, answer
    # An instruction the reviser cannot map is answered, not guessed: the thread as it was, and why.
    assert (answer["status"] == "needs_clarification") == bool(answer["clarification"]), answer
    assert answer["best_image"] is None or Path(answer["best_image"]).exists()


def run_examples(server, tool: str, arguments) -> None:
    """Hypothesis draws a text and calls `tool` with `arguments(text)` through the in-memory client."""

    @EXAMPLES
    @given(HOSTILE_TEXT)
    def example(text: str) -> None:
        check_answer(call(server, tool, arguments(text)))

    example()


def test_any_prompt_or_thread_name_gives_a_clean_error_or_a_finished_run(fake_server, confined):
    run_examples(fake_server, "generate_image", lambda text: {"prompt": text, "max_rounds": 1})
    run_examples(
        fake_server, "generate_image", lambda text: {"prompt": "a red square", "max_rounds": 1, "thread": text}
    )
    run_examples(fake_server, "refine_image", lambda text: {"thread": text, "instruction": "make it blue"})


def test_any_instruction_gives_a_clean_error_or_a_finished_run(fake_server, confined):
    first = call(fake_server, "generate_image", {"prompt": "a red square", "max_rounds": 1, "thread": "base"})
    assert not first.is_error, text_of(first)
    run_examples(fake_server, "refine_image", lambda text: {"thread": "base", "instruction": text, "max_rounds": 1})


def test_any_caption_gives_a_clean_error_or_hits(fake_server, confined):
    run_examples(fake_server, "search_references", lambda text: {"caption": text, "k": 2})
