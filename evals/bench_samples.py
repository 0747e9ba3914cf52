"""Images per second against the batch of a round (`--samples K`): one batched pipeline call of K images against
K calls of one, side by side in one process, on the loaded profile's real pipeline.

    python -m imagerag.evals.bench_samples                       # mini and tiny on this machine's device
    python -m imagerag.evals.bench_samples --profiles mini --ks 1 2 4 8 --repeats 3

Each row: the profile, device, K, seconds per batched call (median of the repeats, after one warm-up call),
images per second batched, images per second as K single calls, and their ratio (above 1: batching pays).
Results go to OUT/samples.json and OUT/samples.md; rows of other (profile, device) pairs are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagerag.agent.config import Settings
from imagerag.agent.run import prepare
from imagerag.tools.backends.diffusion import pick_device

PROMPT = "a large red heart on the left"


def seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `call()` after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(profile: str, ks: list[int], repeats: int, data_dir: Path, device: str) -> list[dict[str, object]]:
    settings = Settings(profile=profile, data_dir=data_dir, device=device)
    generator = prepare(settings).generator
    rows: list[dict[str, object]] = []
    one = seconds(lambda: generator.generate(PROMPT, 0, 1), repeats)
    for k in ks:
        batched = seconds(partial(generator.generate, PROMPT, 0, k), repeats)
        rows.append(
            {
                "profile": profile,
                "device": pick_device(device),
                "k": k,
                "seconds_per_call": round(batched, 4),
                "images_per_second": round(k / batched, 2),
                "images_per_second_single_calls": round(1 / one, 2),
                "ratio": round((k / batched) / (1 / one), 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, object]], host: str) -> str:
    lines = [
        f"# Images per second against --samples K ({host})",
        "",
        "| profile | device | K | s per batched call | images/s batched | images/s one at a time | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['device']} | {r['k']} | {r['seconds_per_call']} | {r['images_per_second']} | "
            f"{r['images_per_second_single_calls']} | {r['ratio']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m imagerag.evals.bench_samples", description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["mini", "tiny"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("IMAGERAG_DATA_DIR", Path.home() / ".imagerag"))
    )
    parser.add_argument("--out", type=Path, default=Path("evals/results"))
    args = parser.parse_args()
    path = args.out / "samples.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for p in args.profiles for r in measure(p, args.ks, args.repeats, args.data_dir, args.device)]
    measured = {(r["profile"], r["device"]) for r in rows}
    rows = [r for r in kept if (r["profile"], r["device"]) not in measured] + rows
    host = f"{platform.machine()}, {os.cpu_count()} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "prompt": PROMPT, "repeats": args.repeats, "rows": rows}, indent=2))
    (args.out / "samples.md").write_text(markdown(rows, host))
    print(markdown(rows, host))


if __name__ == "__main__":
    main()
