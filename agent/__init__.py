"""imagerag-agent: state, configuration and the run entry point.

    from agent import Settings, run
    result = run("a boston bull wearing a red scarf", Settings(profile="sdxl"))
"""

from agent.config import PROFILES, Settings
from agent.run import RunResult, run

__all__ = ["PROFILES", "RunResult", "Settings", "run"]
