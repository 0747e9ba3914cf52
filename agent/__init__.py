"""imagerag-agent: state, configuration, policies' entry points (agent.run), CLI and report.

from imagerag.agent.config import Settings
from imagerag.agent.run import run
result = run("a boston bull wearing a red scarf", Settings(profile="sdxl"))
"""
