"""Several users of one server at once: a loaded pipeline runs one call at a time, runs of different threads go
side by side, a busy thread refuses a second run, and MCP clients over HTTP each get back their own thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image
from scripted import FakeGenerator, ScriptedCritic, fake_backends

from imagerag.agent.assistant import AssistantError, ImageRAGAssistant
from imagerag.agent.mcp_server import build_server, http_app
from imagerag.agent.run import history
from imagerag.agent.serving import serving_in_thread
from imagerag.tools.backends.sd import SDGenerator
from imagerag.tools.config import PROFILES

TOKEN = "concurrent-clients-token-0123456789"


class RacingPipe:
    """A stand-in diffusers pipeline that notices what a real one would suffer silently: two calls inside it at
    once, or its adapter scale changed by another call while it denoises."""

    def __init__(self) -> None:
        self.scale: float | None = None
        self.inside = self.most_inside = 0
        self.corrupted: list[str] = []
        self._count = threading.Lock()

    def set_ip_adapter_scale(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, **kwargs) -> SimpleNamespace:
        with self._count:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        wanted = 0.0 if kwargs["ip_adapter_image"].size == (224, 224) else PROFILES["tiny"].generator.ip_adapter.scale
        for step in range(5):  # denoising steps: the scale must hold for all of them
            if self.scale != wanted:
                self.corrupted.append(f"step {step}: scale {self.scale}, this call needs {wanted}")
            time.sleep(0.005)
        with self._count:
            self.inside -= 1
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))])


def test_a_loaded_pipeline_runs_one_call_at_a_time():
    pipe = RacingPipe()
    generator = SDGenerator(pipe, PROFILES["tiny"].generator, "cpu")
    start = threading.Barrier(6)

    def user(index: int) -> None:
        start.wait()
        for call in range(4):  # half with a reference (adapter on), half without (adapter off)
            references = [Image.new("RGB", (16, 16))] if (index + call) % 2 else []
            assert len(generator.generate(f"prompt {index}", seed=call, references=references)) == 1

    users = [threading.Thread(target=user, args=(i,)) for i in range(6)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(60)
    assert pipe.most_inside == 1, f"{pipe.most_inside} calls were inside the pipeline at once"
    assert not pipe.corrupted, pipe.corrupted[:5]


class MeetingGenerator(FakeGenerator):
    """Each call waits until `parties` calls are inside at once: passes only if the runs overlap."""

    def __init__(self, parties: int):
        super().__init__()
        self.meeting = threading.Barrier(parties, timeout=10)

    def generate(self, prompt, seed, n=1, references=(), on_step=None):
        self.meeting.wait()
        return super().generate(prompt, seed, n, references, on_step)


class HeldGenerator(FakeGenerator):
    """Holds each call until released, so a test can act while a run is inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def generate(self, prompt, seed, n=1, references=(), on_step=None):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().generate(prompt, seed, n, references, on_step)


def in_thread(target, *args) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def go() -> None:
        try:
            outcome["result"] = target(*args)
        except Exception as error:  # noqa: BLE001 - handed to the test, which asserts on it
            outcome["error"] = error

    thread = threading.Thread(target=go)
    thread.start()
    return thread, outcome


def test_runs_of_different_threads_go_at_once(tiny_settings, tiny_store, tmp_path):
    # One lock around every run (as before) would keep the second run out until the first timed out at the meeting.
    generator = MeetingGenerator(parties=2)
    assistant = ImageRAGAssistant(
        tiny_settings, tmp_path / "runs", fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    )
    runs = [in_thread(assistant.run, f"a {colour} square", 1, colour) for colour in ("red", "blue")]
    for thread, _ in runs:
        thread.join(60)
    for (_, outcome), colour in zip(runs, ("red", "blue"), strict=True):
        assert "error" not in outcome, outcome
        result = outcome["result"]
        assert result.status != "failed", result.error
        assert result.thread == colour and result.prompt == f"a {colour} square"


def test_a_busy_thread_refuses_a_second_run_and_loses_no_turn(tiny_settings, tiny_store, tmp_path):
    generator = HeldGenerator()
    assistant = ImageRAGAssistant(
        tiny_settings, tmp_path / "runs", fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    )
    generator.release.set()
    assistant.run("a red square", 1, "shared")
    generator.release.clear()
    generator.entered.clear()

    first, first_outcome = in_thread(assistant.run, "make the square blue", 1, "shared")
    try:
        assert generator.entered.wait(30), "the first refinement never reached the generator"
        second, second_outcome = in_thread(assistant.run, "make the square green", 1, "shared")
        second.join(10)  # refused at once; before, it waited for the first and then overwrote turn 2
        assert not second.is_alive(), "the second run of a busy thread waited instead of being refused"
        assert isinstance(second_outcome.get("error"), AssistantError), second_outcome
        assert "thread 'shared' is busy" in str(second_outcome["error"])
    finally:
        generator.release.set()
        first.join(60)
    assert first_outcome["result"].turn == 2 and first_outcome["result"].prompt == "a blue square"
    assert [turn.index for turn in history("shared", assistant.settings)] == [1, 2]
    # The thread is free again once its run returned.
    assert assistant.run("make the square green", 1, "shared").turn == 3


# --- several MCP clients over HTTP, one server ---------------------------------------------------------------------


@pytest.fixture
def http_url(tiny_settings, tmp_path) -> Iterator[str]:
    """The MCP server over the real tiny models, served by uvicorn in a thread of this process on a loopback port,
    with a bearer token (so the clients go through the same checks as on the network)."""
    server = build_server(tiny_settings, tmp_path / "runs")
    with serving_in_thread(http_app(server, "127.0.0.1", TOKEN)) as base:
        yield f"{base}mcp"


CLIENTS = {  # thread: (prompt, refinement, refined prompt)
    "heart": ("a red heart on the left", "make the heart yellow", "a yellow heart on the left"),
    "square": ("a blue square on the right", "make the square purple", "a purple square on the right"),
    "star": ("a green star at the top", "make the star red", "a red star at the top"),
}


def test_concurrent_mcp_clients_each_get_their_own_thread(http_url, tiny_settings, tmp_path):
    seen: dict[str, list] = {}
    progress: dict[str, list[float]] = {thread: [] for thread in CLIENTS}  # when each run's notifications came

    async def user(thread: str) -> None:
        prompt, instruction, _ = CLIENTS[thread]

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress[thread].append(time.monotonic())

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(30, read=300))
        async with http, Client(streamable_http_client(http_url, http_client=http), read_timeout_seconds=120) as mcp:
            drawn = await mcp.call_tool(
                "generate_image", {"prompt": prompt, "max_rounds": 2, "thread": thread}, progress_callback=on_progress
            )
            refined = await mcp.call_tool(
                "refine_image", {"thread": thread, "instruction": instruction, "max_rounds": 1}
            )
        seen[thread] = [drawn, refined]

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for thread in CLIENTS:
                group.start_soon(user, thread)

    anyio.run(main)
    # The runs went side by side: some run reported progress while another was still reporting (one lock around
    # every run, as before, would have kept them one after the other; only the pipeline's calls take turns now).
    spans = sorted((min(times), max(times)) for times in progress.values())
    assert any(later[0] < earlier[1] for earlier, later in pairwise(spans)), spans
    runs = tmp_path / "runs"
    for thread, (prompt, _, refined_prompt) in CLIENTS.items():
        drawn, refined = seen[thread]
        for answer in (drawn, refined):
            assert not answer.is_error, " ".join(c.text for c in answer.content if c.type == "text")
        first, second = drawn.structured_content, refined.structured_content
        assert first["thread"] == second["thread"] == thread
        assert (first["prompt"], first["turn"]) == (prompt, 1)
        assert (second["prompt"], second["turn"]) == (refined_prompt, 2)
        object_ = prompt.split()[2]  # heart, square, star: its own, and no other client's
        for answer in (first, second):
            texts = [c["text"] for c in answer["concepts"]]
            assert any(object_ in text for text in texts), texts
            assert not any(other in " ".join(texts) for other in {"heart", "square", "star"} - {object_}), texts
            best = Path(answer["best_image"])
            assert best.exists() and best.is_relative_to(runs / thread / "images"), best
            assert Path(answer["report"]).parent == runs / thread
        assert [(turn.index, turn.prompt) for turn in history(thread, tiny_settings)] == [
            (1, prompt),
            (2, refined_prompt),
        ]
