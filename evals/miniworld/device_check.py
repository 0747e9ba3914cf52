"""Do the mini models give the same answers on your accelerator as on the CPU? Run through the project's own classes.

    python -m imagerag.evals.miniworld.device_check              # CPU float32, then CUDA float32 and float16 if present
    python -m imagerag.evals.miniworld.device_check --prompts 4 --out /tmp/d

For each device and dtype: rare-shape prompts drawn with a reference of the shape and from text alone (oracle-judged),
seconds per image, and the CLIP judge's score; then the mean absolute pixel difference of every image against the
CPU's (same seeds: the pipeline's noise comes from a CPU generator). Writes OUT/device_check.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
from imagerag.tools.backends.diffusion import DiffusersGenerator
from imagerag.tools.backends.judges import ClipJudge
from imagerag.tools.config import PROFILES
from imagerag.tools.miniworld import MODELS_DIR as MINI_MODELS
from imagerag.tools.miniworld.world import ObjectSpec, Scene, heldout_prompts, render
from imagerag.tools.types import Concept


def measure(device: str, dtype: str, prompts: int) -> tuple[dict, list[np.ndarray]]:
    spec = PROFILES["mini"].generator.model_copy(update={"dtype": dtype})
    generator = DiffusersGenerator.from_pretrained(
        spec, str(MINI_MODELS / "t2i"), str(MINI_MODELS / "ip_adapter"), device
    )
    embedder = ClipEmbedder.from_pretrained(LOCAL_DIR + str(MINI_MODELS / "clip"), None, device)
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    items = [p for p in heldout_prompts() if p.group == "rare"][:prompts]
    generator.generate("a red circle", 0)  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started, images = time.perf_counter(), []
    for item in items:
        reference = render(Scene((ObjectSpec(item.scene.objects[0].shape, "blue", "top", "large"),)))
        images += [generator.generate(item.prompt, 1, 1, [reference])[0], generator.generate(item.prompt, 0)[0]]
    sync()
    seconds = (time.perf_counter() - started) / len(images)
    drawn = [oracle.judge(image, items[i // 2].scene)[0].shape for i, image in enumerate(images)]
    judge_threshold = json.loads((MINI_MODELS / "clip" / "calibration.json").read_text())["judge_threshold"]
    concept = Concept(id="c1", text=f"a {items[0].scene.objects[0].shape}")
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
