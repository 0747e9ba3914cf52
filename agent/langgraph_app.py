"""The policies as LangGraph Server graphs (`langgraph.json`, `langgraph dev` / LangGraph Platform).

Input of a run: `{"message": "...", "budget": {"max_rounds": 3}}` (RunInput); on a thread that already has an
image, the message refines it. Output: RunOutput (status, concepts with their verdicts, candidates, steps).
How to draw comes per run as the context (ClientContext: profile, collection, retrieve_k, max_tool_errors); where
data lives and what to connect to (data_dir, chroma_url, the LLM endpoint, device) only from the server's
IMAGERAG_* environment, and a client that names them gets an error. Every request that writes a thread is checked
before LangGraph stores it (agent/server_app.py, langgraph.json's `http.app`): LangGraph's START writer stores input
unchecked, and a bad value stored there would fail every later run of the thread. Backends load once per process on
the first run that needs them. A thread's images go to `<data_dir>/runs/<thread_id>/images/`. The server supplies
the checkpointer, so a thread continues like `imagerag generate --thread`. The pipelines are not re-entrant: serve
with `--n-jobs-per-worker 1`.

The graphs speak the chat convention too: `{"messages": [{"role": "user", "content": "..."}]}` instead of
`message`, and every turn ends with the `reply` node appending an AI message to `messages`: the verdict as text,
the best image as a standard image block (a small PNG data URL) and as a link the server serves (IMAGE_PATH).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.messages.content import create_image_block, create_text_block
from langgraph.config import get_config
from PIL import Image

from imagerag.agent.server_app import IMAGE_PATH
from imagerag.graphs.agent import build_agent_graph
from imagerag.graphs.context import ClientContext
from imagerag.graphs.imagerag import build_imagerag_graph
from imagerag.graphs.state import REPLY_NAME, RunState
from imagerag.tools.files import RunFolder

REPLY_IMAGE_PX = 256  # the longest side of the image sent inside the reply; the link serves it whole


def reply(state: RunState) -> dict[str, Any]:
    """The turn's answer in the chat: what came of the message, and the best image. Recorded as the message read
    too, so a later turn sent as `message` is not mistaken for it."""
    turn = state.turns[-1] if state.turns and state.turns[-1].index == state.turn else None
    if state.status == "needs_clarification" or turn is None:
        text = state.clarification or state.error or "this message was not understood; the image is as it was"
        return {"messages": [AIMessage(text, name=REPLY_NAME)], "message": state.message}
    lines = [f"Turn {turn.index}: {turn.status} ({turn.stop_reason}). Prompt: {turn.prompt}"]
    lines += [f"Satisfied: {', '.join(turn.satisfied)}"] if turn.satisfied else []
    lines += [f"Missing: {', '.join(turn.missing)}"] if turn.missing else []
    lines += [f"Error: {state.error}"] if state.error else []
    blocks: list[Any] = []
    path = RunFolder(Path(state.run_dir)).image(turn.best_image) if turn.best_image and state.run_dir else None
    if path is not None and path.is_file():
        thread = (get_config().get("configurable") or {}).get("thread_id")
        if thread:
            lines.append(f"Best image: {IMAGE_PATH.format(thread_id=thread, image_id=turn.best_image)}")
        blocks.append(create_image_block(url=data_url(path), mime_type="image/png"))
    content = [create_text_block("\n".join(lines)), *blocks]
    return {"messages": [AIMessage(content=content, name=REPLY_NAME)], "message": state.message}


def data_url(path: Path) -> str:
    """The image as a PNG data URL, shrunk to REPLY_IMAGE_PX on its longest side (a thread stores every reply)."""
    with Image.open(path) as image:
        image.thumbnail((REPLY_IMAGE_PX, REPLY_IMAGE_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


imagerag = build_imagerag_graph(ClientContext, reply=reply).compile()
agent = build_agent_graph(ClientContext, reply=reply).compile()
