"""Scripted stand-ins for the models: a tool-calling chat model, a critic, a generator, and an OpenAI server."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableLambda
from PIL import Image
from pydantic import Field

from imagerag.tools.backends.planner import RuleDecomposer
from imagerag.tools.backends.store import ReferenceStore
from imagerag.tools.config import PROFILES
from imagerag.tools.toolkit import Backends
from imagerag.tools.types import Concept, ConceptVerdict, Critique

# The rule decomposer's concepts of "a red heart on the left and a blue square on the right", the tests' usual prompt.
TWO_OBJECT_CONCEPTS = [
    "a heart",
    "a red heart",
    "a heart on the left",
    "a square",
    "a blue square",
    "a square on the right",
]


class ScriptedChatModel(GenericFakeChatModel):
    """Replies from `messages` in order (callables get the conversation); structured calls from `structured`.

    Records every structured call's temperature, so tests can see retries run hotter.
    """

    structured: Iterator[Any] = iter(())
    temperature: float = 0.0
    temperatures: list[float] = Field(default_factory=list)
    seen: list[list] = Field(default_factory=list)

    def bind_tools(self, tools, **kwargs):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        """Next scripted reply; a callable entry builds it from the conversation so far."""
        self.seen.append(messages)
        reply = next(self.messages)
        reply = reply(messages) if callable(reply) else reply
        return ChatResult(generations=[ChatGeneration(message=AIMessage(reply) if isinstance(reply, str) else reply)])

    def with_structured_output(self, schema, include_raw: bool = False, **kwargs):
        def answer(messages):
            self.seen.append(messages)
            self.temperatures.append(self.temperature)
            item = next(self.structured)
            if isinstance(item, Exception):
                raise item
            raw = AIMessage("", usage_metadata={"input_tokens": 90, "output_tokens": 10, "total_tokens": 100})
            parsed = item if item is None or isinstance(item, schema) else schema.model_validate(item)
            return {"raw": raw, "parsed": parsed, "parsing_error": None} if include_raw else parsed

        return RunnableLambda(answer)


def call(name: str, call_id: str, **args) -> dict:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def last_tool_answer(messages) -> str:
    return next(m for m in reversed(messages) if isinstance(m, ToolMessage)).content


def tool_turn(*calls: dict, tokens: int = 50) -> AIMessage:
    return AIMessage(
        "",
        tool_calls=list(calls),
        usage_metadata={"input_tokens": tokens - 10, "output_tokens": 10, "total_tokens": tokens},
    )


class ScriptedCritic:
    """Verdicts from a script: each entry is the set of satisfied concept ids for the next image judged.

    Entries may also be exceptions to raise. Scores rise with the number satisfied so ranking is predictable.
    """

    def __init__(
        self, script: list[set[str] | Exception], score_bonus: list[float] | None = None, boxes: dict | None = None
    ):
        self.script, self.calls = list(script), 0
        self.score_bonus = score_bonus or [0.0] * len(script)
        self.boxes = boxes or {}  # concept id -> Box: where the critic says it sees a satisfied object

    def critique(self, image: Image.Image, concepts: list[Concept], prompt: str) -> Critique:
        step = self.script[min(self.calls, len(self.script) - 1)]
        bonus = self.score_bonus[min(self.calls, len(self.score_bonus) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return Critique(
            verdicts=[
                ConceptVerdict(
                    concept_id=c.id,
                    satisfied=c.id in step,
                    score=min(1.0, (0.8 if c.id in step else 0.2) + bonus),
                    caption=None if c.id in step else f"a photo of {c.text}",
                    box=self.boxes.get(c.id) if c.id in step else None,
                )
                for c in concepts
            ],
            tokens=0,
        )


class FakeGenerator:
    """Draws a distinct flat image per call (colour from seed and reference count); records its calls."""

    max_references = 1
    max_region_references = 1  # references are not masked to regions: one conditions a whole edit

    def __init__(self):
        self.calls: list[dict] = []

    def generate(self, prompt, seed, n=1, references=(), on_step: Callable | None = None):
        self.calls.append({"prompt": prompt, "seed": seed, "n": n, "references": len(references)})
        if on_step:
            on_step(1, 1)
        return [
            Image.new("RGB", (8, 8), ((37 * (seed + i) + 80 * len(references)) % 256, len(self.calls) * 13 % 256, 7))
            for i in range(n)
        ]

    def edit(self, image, mask, prompt, seed, references=(), reference_masks=(), on_step: Callable | None = None):
        """Paints the white part of the mask a flat colour; every other pixel is kept."""
        self.calls.append(
            {
                "prompt": prompt,
                "seed": seed,
                "n": 1,
                "references": len(references),
                "edit": True,
                "reference_masks": list(reference_masks),
            }
        )
        painted = Image.new("RGB", image.size, (200, (37 * seed) % 256, 90))
        return Image.composite(painted, image, mask.convert("L")), True


class FakeOpenAIServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers from `respond(request) -> message`."""

    def __init__(self, respond: Callable[[dict], dict]):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                message = respond(body)
                payload = {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "scripted"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", **message},
                            "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50},
                }
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def function_call(name: str, arguments: dict, call_id: str = "call_1") -> dict:
    return {
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        ],
    }


def fake_backends(store: ReferenceStore, critic, llm=None, generator=None, min_similarity: float = -1.0) -> Backends:
    return Backends(
        profile=PROFILES["tiny"],
        generator=generator or FakeGenerator(),
        critic=critic,
        store=store,
        decomposer=RuleDecomposer(),
        llm=llm,
        min_similarity=min_similarity,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server_process(
    command: list[str], log_path: Path, ready: Callable[[], bool], what: str, **popen
) -> Iterator[subprocess.Popen]:
    """Start a server, wait (60 s at most) until `ready()`, yield it, then stop it: terminate, kill if it lingers."""
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.time() + 60
        while not ready():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"{what} was not ready within 60 s"
            time.sleep(0.3)
        yield process
        assert process.poll() is None, "the server died: " + log_path.read_text()[-3000:]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
