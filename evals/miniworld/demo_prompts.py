"""The demo prompt and its variants at seeds 0-4, as `make demo` runs them (the CLI's default budget), judged by the
oracle on the best image:

    python -m imagerag.evals.miniworld.demo_prompts [--data-dir D] [--out evals/results/demo-prompts]

"a large red SHAPE in the top left, a blue ring at the bottom and a yellow square on the right" for a star, a heart and
a crescent (the three shapes the generator never learned the words of). Writes results.json (per shape and seed: all
right by the oracle, images, status) and prints the count right per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from imagerag.agent.config import Settings
from imagerag.agent.run import prepare, run
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.grammar import Group, PromptSpec, judge
from imagerag.evals.miniworld.oracle import Oracle

SHAPES = ("star", "heart", "crescent")
SEEDS = range(5)


def demo_spec(shape: str) -> PromptSpec:
    return PromptSpec(
        id=shape,
        prompt=f"a large red {shape} in the top left, a blue ring at the bottom and a yellow square on the right",
        groups=[
            Group(shape=shape, size="large", colour="red", cell="top left"),
            Group(shape="ring", colour="blue", cell="bottom"),
            Group(shape="square", colour="yellow", cell="right"),
        ],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.evals.miniworld.demo_prompts")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/demo-prompts"))
    args = ap.parse_args(argv)
    settings = Settings(profile="mini") if args.data_dir is None else Settings(profile="mini", data_dir=args.data_dir)
    backends, oracle = prepare(settings), Oracle.from_pretrained(ORACLE_DIR)
    results: dict[str, dict] = {}
    for shape in SHAPES:
        spec = demo_spec(shape)
        for seed in SEEDS:
            with tempfile.TemporaryDirectory() as tmp:
                result = run(spec.prompt, settings.model_copy(update={"seed": seed}), Path(tmp), backends=backends)
                assert result.best is not None, result.error
                with Image.open(Path(result.run_dir) / "images" / f"{result.best.image_id}.png") as image:
                    right = judge(spec, oracle.read([image.convert("RGB")])[0]).all_right
            results[f"{shape} seed {seed}"] = {
                "all_right": right,
                "images": result.generations,
                "status": result.status,
            }
            print(f"{shape} seed {seed}: {'all right' if right else 'not all right'} ({result.status}, "
                  f"{result.generations} images)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for shape in SHAPES:
        count = sum(results[f"{shape} seed {s}"]["all_right"] for s in SEEDS)
        print(f"{shape}: all right at {count} of {len(SEEDS)} seeds")


if __name__ == "__main__":
    main()
