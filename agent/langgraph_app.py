"""The policies as LangGraph Server graphs (`langgraph.json`, `langgraph dev` / LangGraph Platform).

Input of a run: `{"message": "...", "budget": {"max_rounds": 3}}` (RunInput); on a thread that already has an
image, the message refines it. Output: RunOutput (status, concepts with their verdicts, candidates, steps).
Settings come per run as the context (RunContext: profile, data_dir, ...); fields a client leaves out come from
the server's IMAGERAG_* environment. Backends load once per process on the first run that needs them. A thread's
images go to `<data_dir>/runs/<thread_id>/images/`. The server supplies the checkpointer, so a thread continues
like `imagerag generate --thread`. The pipelines are not re-entrant: serve with `--n-jobs-per-worker 1`.
"""

from __future__ import annotations

from imagerag.graphs import build_graph

imagerag = build_graph("imagerag").compile()
agent = build_graph("agent").compile()
