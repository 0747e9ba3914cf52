"""Train the oracle CNN on the world's ground-truth labels, then measure it on held-out scenes.

    python -m imagerag.evals.miniworld.train_oracle

Every step renders fresh random scenes (1-4 objects, every shape; rendering is cheap), so the oracle never sees the
same image twice; blur and noise (`augment`, up to twice) and shifts of up to two pixels teach it to also read the
generator's soft and less exactly placed images.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagerag.evals.miniworld.common import (
    CHECKPOINTS_DIR,
    ORACLE_DIR,
    SEED_EVAL,
    SEED_ORACLE,
    Pool,
    augment,
    fit,
    seed_everything,
)
from imagerag.evals.miniworld.grammar import reading_of
from imagerag.evals.miniworld.oracle import IGNORE, Oracle, OracleNet, scene_targets
from imagerag.tools.miniworld.world import CELLS, MAX_OBJECTS, render_array, sample_scene

WEIGHTS = (0.25,) * MAX_OBJECTS  # share of scenes with 1..4 objects, in training and held out
SHIFT = 2  # largest shift of a training image, in pixels


def shift(x01: torch.Tensor, gen: torch.Generator, max_px: int = SHIFT) -> torch.Tensor:
    """Each image moved by up to max_px pixels each way on a white background: generated objects sit less exactly in
    their cells than rendered ones."""
    padded = F.pad(x01, (max_px,) * 4, value=1.0)
    dx, dy = (torch.randint(0, 2 * max_px + 1, (2, len(x01)), generator=gen)).tolist()
    size = x01.shape[-1]
    return torch.stack([p[:, y : y + size, x : x + size] for p, x, y in zip(padded, dx, dy, strict=True)])


def heldout_accuracy(oracle: Oracle, pool: Pool, blur: bool = False) -> dict[str, float]:
    """Per true object, the rate at which its cell is read with the right shape / colour / size, and as occupied at
    all (cell); the rate at which empty cells read empty; and the share of scenes read exactly."""
    images = pool.images
    if blur:
        x = augment(pool.batch01(range(len(pool))), torch.Generator().manual_seed(SEED_EVAL), p_blur=1.0)
        images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    hits: dict[str, list[bool]] = {"shape": [], "colour": [], "size": [], "cell": []}
    empty: list[bool] = []
    exact: list[bool] = []
    for scene, reading in zip(pool.scenes, oracle.read(images), strict=True):
        at = {d.cell: d for d in reading}
        for o in scene.objects:
            d = at.get(o.cell)
            hits["cell"].append(d is not None)
            for attr in ("shape", "colour", "size"):
                hits[attr].append(d is not None and getattr(d, attr) == getattr(o, attr))
        taken = {o.cell for o in scene.objects}
        empty += [cell not in at for cell in CELLS if cell not in taken]
        exact.append(set(reading) == set(reading_of(scene)))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    return {**out, "empty": float(np.mean(empty)), "exact_scene": float(np.mean(exact))}


def train(
    out_dir: Path = ORACLE_DIR,
    steps: int = 800,
    batch: int = 128,
    log: Callable[[str], None] = print,
    width: int = 24,
    checkpoint: Path | None = CHECKPOINTS_DIR / "oracle.pt",
) -> dict[str, Any]:
    """Train, save float16 weights to out_dir, and return timings and held-out accuracy (clean and blurred).
    Resumes from `checkpoint` (delete it after changing the architecture)."""
    seed_everything(SEED_ORACLE, threads=1)  # one thread: another stage may train alongside
    t0 = time.time()
    net = OracleNet(width)
    gen = torch.Generator().manual_seed(SEED_ORACLE)
    rng = random.Random(SEED_ORACLE)
    counts = range(1, MAX_OBJECTS + 1)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        scenes = [sample_scene(rng, rng.choices(counts, WEIGHTS)[0]) for _ in range(batch)]
        shapes, colours, sizes = (torch.tensor(t) for t in zip(*(scene_targets(sc) for sc in scenes), strict=True))
        x = torch.from_numpy(render_array(scenes)).permute(0, 3, 1, 2).float() / 255.0
        x = augment(augment(shift(x, gen), gen, p_blur=0.3, noise=0.0), gen, p_blur=0.5, noise=0.08)  # 0-2 blurs
        s_log, c_log, z_log = net(x)
        losses = [
            F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
            for logits, target in ((s_log, shapes), (c_log, colours), (z_log, sizes))
        ]
        note = " ".join(f"{k} {v.item():.3f}" for k, v in zip(("shape", "colour", "size"), losses, strict=True))
        return sum(losses, torch.zeros(())), note

    net.train()
    loop_s = fit(
        net.parameters(),
        steps,
        step_fn,
        log,
        tag="oracle",
        lr=3e-3,
        weight_decay=1e-4,
        warmup=0.05,
        every=250,
        checkpoint=checkpoint,
        modules=[net],
        rngs=[gen, rng],
    )
    Oracle(net).save(out_dir)
    loaded = Oracle.from_pretrained(out_dir)  # measure the float16 weights that ship
    held_out = Pool.sample(SEED_EVAL + 202, 2000, WEIGHTS)
    metrics = {"clean": heldout_accuracy(loaded, held_out), "blurred": heldout_accuracy(loaded, held_out, blur=True)}
    loaded.save(out_dir, extra={"heldout_accuracy": metrics})
    log(f"[oracle] held-out {metrics}")
    return {
        "seconds": round(time.time() - t0, 1),
        "loop_seconds": round(loop_s, 1),
        "steps": steps,
        "batch": batch,
        "width": width,
        "weights_bytes": (Path(out_dir) / "model.safetensors").stat().st_size,
        "heldout_accuracy": metrics,
    }


if __name__ == "__main__":
    train()
