"""The returned image of every loop_edits run of a dev prompt that asks for a star (seeds 0 and 1), on numbered
contact sheets, with what the oracle reads in it: for looking at the oracle's readings of generated stars by eye.

    OMP_NUM_THREADS=1 python evals/results/dev-choices/oracle-star-audit/audit.py OUT [--data-dir D]
"""

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from imagerag.agent.config import Settings
from imagerag.agent.run import prepare, run
from imagerag.evals.miniworld import benchmark
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.graphs.state import Budget

PER_SHEET, CELL = 12, 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in benchmark.load_prompts(benchmark.PROMPTS_DIR / "dev.jsonl") if " star" in s.prompt]
    settings = Settings(profile="mini") if args.data_dir is None else Settings(profile="mini", data_dir=args.data_dir)
    backends, oracle = prepare(settings), Oracle.from_pretrained(ORACLE_DIR)
    budget = Budget(max_rounds=4, max_generations=4, max_seconds=None, max_tokens=None)
    rows: list[dict[str, object]] = []
    images: list[Image.Image] = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            for seed in (0, 1):
                update = {"budget": budget, "seed": seed * benchmark.SEED_SPACING, "edits": True}
                result = run(spec.prompt, settings.model_copy(update=update), Path(tmp), backends=backends)
                assert result.best is not None
                image = Image.open(Path(result.run_dir) / "images" / f"{result.best.image_id}.png").convert("RGB")
                reading = oracle.read([image])[0]
                rows.append(
                    {
                        "n": len(rows),
                        "prompt": spec.prompt,
                        "id": spec.id,
                        "seed": seed,
                        "right": benchmark.judge(spec, reading).all_right,
                        "oracle": [f"{d.colour} {d.size} {d.shape}@{d.cell}" for d in reading],
                    }
                )
                images.append(image)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    for first in range(0, len(images), PER_SHEET):
        sheet = Image.new("RGB", (4 * CELL, 3 * (CELL + 20)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, image in enumerate(images[first : first + PER_SHEET]):
            x, y = (i % 4) * CELL, (i // 4) * (CELL + 20)
            sheet.paste(image.resize((CELL - 8, CELL - 8), Image.Resampling.NEAREST), (x + 4, y + 20))
            draw.text((x + 4, y + 2), f"#{first + i}", fill="black")
        sheet.save(args.out / f"sheet-{first // PER_SHEET}.png")


if __name__ == "__main__":
    main()
