"""Train every model of the miniature world and write evals/miniworld/models/.

    python -m imagerag.evals.miniworld.train                 # all stages: clip, oracle, t2i, check
    python -m imagerag.evals.miniworld.train --stages t2i    # one stage (timings merge into train_log.json)

Fixed seeds and deterministic data; CPU, 2 threads. Timings and final metrics go to
models/train_log.json; the final check writes models/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerag.tools.miniworld import MODELS_DIR

STAGES = ("clip", "oracle", "t2i", "check")


def _log_factory(path):
    def log(msg: str) -> None:
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.evals.miniworld.train")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = MODELS_DIR / "train_log.json"
    train_log = json.loads(log_path.read_text()) if log_path.exists() else {"stages": {}}
    log = _log_factory(MODELS_DIR.parent / "logs" / "train.txt")
    (MODELS_DIR.parent / "logs").mkdir(exist_ok=True)
    for stage in stages:
        t0 = time.time()
        if stage == "clip":
            from imagerag.evals.miniworld.train_clip import train as run
        elif stage == "oracle":
            from imagerag.evals.miniworld.train_oracle import train as run
        elif stage == "t2i":
            from imagerag.evals.miniworld.train_t2i import train as run
        elif stage == "check":
            from imagerag.evals.miniworld.check import run_check as run
        else:
            raise SystemExit(f"unknown stage {stage}")
        result = run(log=log)
        result["seconds"] = round(time.time() - t0, 1)
        # Re-read before writing: stages may also have been run separately.
        train_log = json.loads(log_path.read_text()) if log_path.exists() else {"stages": {}}
        train_log["stages"][stage] = result
        train_log["total_training_seconds"] = round(sum(
            v["seconds"] for k, v in train_log["stages"].items() if k != "check"), 1)
        log_path.write_text(json.dumps(train_log, indent=2))
        log(f"[train] stage {stage} done in {result['seconds']}s")
    print(json.dumps({k: v.get("seconds") for k, v in train_log["stages"].items()}, indent=2))


if __name__ == "__main__":
    main()
