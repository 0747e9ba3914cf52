"""Train every model of the miniature world.

    python -m imagerag.evals.miniworld.train                 # all stages: clip, oracle, t2i, check
    python -m imagerag.evals.miniworld.train --stages t2i    # one stage (timings merge into train_log.json)
    python -m imagerag.evals.miniworld.train --force         # retrain stages that finished before

Resumable: a stage recorded in train_log.json is skipped, and an interrupted stage resumes from its last checkpoint
(evals/miniworld/logs/checkpoints/, git-ignored; delete it to start over). Fixed seeds and deterministic data; CPU,
2 threads. The runtime's weights (clip, t2i, ip_adapter) go to
tools/miniworld/models; the oracle, which only evaluations load, to evals/miniworld/models/oracle. Timings and
final metrics go to evals/miniworld/models/train_log.json, the final check writes evals/miniworld/models/metrics.json,
and the text log goes to evals/miniworld/logs/train.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerag.evals.miniworld.common import EVAL_MODELS_DIR, LOGS_DIR

Log = Callable[[str], None]


# One runner per stage, each importing its trainer only when the stage runs.
def _train_clip(log: Log) -> dict:
    from imagerag.evals.miniworld.train_clip import train

    return train(log=log)


def _train_oracle(log: Log) -> dict:
    from imagerag.evals.miniworld.train_oracle import train

    return train(log=log)


def _train_t2i(log: Log) -> dict:
    from imagerag.evals.miniworld.train_t2i import train

    return train(log=log)


def _check(log: Log) -> dict:
    from imagerag.evals.miniworld.check import run_check

    return run_check(log=log)


RUNNERS: dict[str, Callable[[Log], dict]] = {
    "clip": _train_clip,
    "oracle": _train_oracle,
    "t2i": _train_t2i,
    "check": _check,
}
STAGES = tuple(RUNNERS)


def _log_factory(path: Path) -> Log:
    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")

    return log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.evals.miniworld.train")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--force", action="store_true", help="run stages even when train_log.json has them")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    EVAL_MODELS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = EVAL_MODELS_DIR / "train_log.json"
    train_log = json.loads(log_path.read_text()) if log_path.exists() else {"stages": {}}
    log = _log_factory(LOGS_DIR / "train.txt")
    LOGS_DIR.mkdir(exist_ok=True)
    for stage in stages:
        t0 = time.time()
        run = RUNNERS.get(stage)
        if run is None:
            raise SystemExit(f"unknown stage {stage}")
        if stage in train_log["stages"] and not args.force:
            log(f"[train] stage {stage} finished earlier ({train_log['stages'][stage]['seconds']} s): skipped")
            continue
        result = run(log)
        result["seconds"] = round(time.time() - t0, 1)
        # Re-read before writing: stages may also have been run separately.
        train_log = json.loads(log_path.read_text()) if log_path.exists() else {"stages": {}}
        train_log["stages"][stage] = result
        train_log["total_training_seconds"] = round(
            sum(v["seconds"] for k, v in train_log["stages"].items() if k != "check"), 1
        )
        log_path.write_text(json.dumps(train_log, indent=2))
        log(f"[train] stage {stage} done in {result['seconds']}s")
    print(json.dumps({k: v.get("seconds") for k, v in train_log["stages"].items()}, indent=2))


if __name__ == "__main__":
    main()
