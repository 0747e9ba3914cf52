"""Do the mini models give the same answers on your accelerator as on the CPU? Run through the project's own classes.

    python -m imagerag.evals.miniworld.device_check              # CPU float32, then CUDA float32 and float16 if present
    python -m imagerag.evals.miniworld.device_check --prompts 4 --out /tmp/d

For each device and dtype: prompts of one rare object (every attribute named, scenes of the evaluation half) drawn
with a reference of the shape in another colour and cell (a scene of the retrieval corpus) and from text alone, the
oracle and grammar.judge deciding whether the rare shape is drawn; seconds per image; and the CLIP judge's score of
the first prompt's shape concept on its first image. Then the mean absolute pixel difference of every image against
the CPU's (same seeds and references: the pipeline's noise comes from a CPU generator). Writes OUT/device_check.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from imagerag.evals.miniworld.check import eval_prompts, reference_for
from imagerag.evals.miniworld.common import ORACLE_DIR, SEED_EVAL
from imagerag.evals.miniworld.grammar import PromptSpec, concept_text, judge
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
from imagerag.tools.backends.judges import ClipJudge
from imagerag.tools.backends.registries import GENERATORS
from imagerag.tools.config import PROFILES
from imagerag.tools.miniworld import MODELS_DIR as MINI_MODELS
from imagerag.tools.miniworld.world import RARE_SHAPES, corpus_scenes
from imagerag.tools.types import Concept

PROMPT_SEED = SEED_EVAL + 20
REFERENCE_SEED = SEED_EVAL + 21
# Every single-object scene of the corpus half comes first in corpus_scenes, so a corpus of this size holds every
# rare shape alone in every colour and cell the corpus has (the mini profile's 20,000 images open the same way).
CORPUS_SINGLES = 2_000


def rare_shape_concept(spec: PromptSpec) -> int:
    """The index of the prompt's concept that its rare shape is drawn."""
    return next(i for i, c in enumerate(spec.concepts) if c.kind == "shape" and c.value in RARE_SHAPES)


def measure(device: str, dtype: str, prompts: int) -> tuple[dict, list[np.ndarray]]:
    spec = PROFILES["mini"].generator.model_copy(update={"dtype": dtype})
    generator = GENERATORS[spec.family].from_pretrained(
        spec, str(MINI_MODELS / "t2i"), str(MINI_MODELS / "ip_adapter"), device
    )
    embedder = ClipEmbedder.from_pretrained(LOCAL_DIR + str(MINI_MODELS / "clip"), None, device)
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    items = eval_prompts(PROMPT_SEED, prompts, 1, rare=True)
    rng = random.Random(REFERENCE_SEED)  # the same references on every device
    corpus = corpus_scenes(CORPUS_SINGLES, seed=1)
    references = [reference_for(item, corpus, rng) for item in items]
    generator.generate("a large red circle in the centre", 0)  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started, images = time.perf_counter(), []
    for item, reference in zip(items, references, strict=True):
        images += [generator.generate(item.prompt, 1, 1, [reference])[0], generator.generate(item.prompt, 0)[0]]
    sync()
    seconds = (time.perf_counter() - started) / len(images)
    drawn = [
        judge(items[i // 2], reading).concepts[rare_shape_concept(items[i // 2])][1]
        for i, reading in enumerate(oracle.read(images))
    ]
    judge_threshold = json.loads((MINI_MODELS / "clip" / "calibration.json").read_text())["judge_threshold"]
    first = items[0]
    concept = Concept(id="c1", text=concept_text(first, first.concepts[rare_shape_concept(first)]))
    verdict = ClipJudge(embedder, judge_threshold).critique(images[0], [concept]).verdicts[0]
    row = {
        "device": device,
        "dtype": dtype,
        "prompts": len(items),
        "seconds_per_image": round(seconds, 4),
        "rare_shape_with_reference": sum(drawn[0::2]),
        "rare_shape_text_alone": sum(drawn[1::2]),
        "judge_score_first_image": round(verdict.score, 4),
    }
    return row, [np.asarray(image, np.float32) for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("evals/results"))
    args = parser.parse_args()
    runs = [("cpu", "float32")] + ([("cuda", "float32"), ("cuda", "float16")] if torch.cuda.is_available() else [])
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows: list[dict] = []
    report = {"torch": torch.__version__, "accelerator": accelerator, "runs": rows}
    cpu_images = None
    for device, dtype in runs:
        row, images = measure(device, dtype, args.prompts)
        cpu_images = images if cpu_images is None else cpu_images
        diff = np.mean([np.abs(a - b).mean() for a, b in zip(images, cpu_images, strict=True)])
        row["mean_abs_pixel_diff_vs_cpu"] = round(float(diff), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
