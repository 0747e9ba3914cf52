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
"""

from __future__ import annotations

from imagerag.graphs import build_graph
from imagerag.graphs.context import ClientContext

imagerag = build_graph("imagerag", ClientContext).compile()
agent = build_graph("agent", ClientContext).compile()
