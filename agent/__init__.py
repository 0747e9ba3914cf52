"""imagerag-agent, the application: runs and threads (run.py), run folders, checkpoints, settings, events, the
result model, report, CLI, MCP server, LangChain tool and LangGraph Server entry point.

    from imagerag.agent.config import Settings
    from imagerag.agent.run import run
    result = run("a boston bull wearing a red scarf", Settings(profile="sdxl"))
"""
