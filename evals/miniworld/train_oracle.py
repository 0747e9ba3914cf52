"""Train the oracle CNN on ground-truth slot labels (with blur/noise so it reads generated images)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagerag.evals.miniworld.common import ORACLE_DIR, SEED_EVAL, SEED_ORACLE, Pool, augment, fit, seed_everything
from imagerag.evals.miniworld.oracle import Oracle, OracleNet, scene_targets


def evaluate(oracle: Oracle, pool: Pool, blur: bool = False) -> dict:
    images = pool.images
    if blur:
        g = torch.Generator().manual_seed(0)
        x = augment(pool.batch01(range(len(pool))), g, p_blur=1.0, noise=0.03)
        images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    verdicts = oracle.judge_many(images, pool.scenes)
    flat = [v for vs in verdicts for v in vs]
    slots = oracle.read(images)
    exact = [
        all(r.shape == t for r, t in zip(row, _slot_shapes(sc), strict=True))
        for row, sc in zip(slots, pool.scenes, strict=True)
    ]
    return {
        "shape": float(np.mean([v.shape for v in flat])),
        "colour": float(np.mean([v.colour for v in flat])),
        "position": float(np.mean([v.position for v in flat])),
        "all_slots_exact": float(np.mean(exact)),
    }


def _slot_shapes(scene):
    from imagerag.evals.miniworld.oracle import SLOT_CLASSES

    return [SLOT_CLASSES[i] for i in scene_targets(scene)[0]]


def train(out_dir: Path = ORACLE_DIR, steps: int = 1200, batch: int = 96, log: Callable[[str], None] = print) -> dict:
    seed_everything(SEED_ORACLE)
    t0 = time.time()
    pool = Pool.sample(SEED_ORACLE, 30000, p_two=0.5)
    tgt = [scene_targets(sc) for sc in pool.scenes]
    t_shape = torch.tensor([t[0] for t in tgt])
    t_col = torch.tensor([t[1] for t in tgt])
    net = OracleNet()
    gen = torch.Generator().manual_seed(SEED_ORACLE)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = augment(pool.batch01(idx.tolist()), gen, p_blur=0.5, noise=0.08)
        s_log, c_log = net(x)
        shape_loss = F.cross_entropy(s_log.reshape(-1, s_log.shape[-1]), t_shape[idx].reshape(-1))
        colour_loss = F.cross_entropy(c_log.reshape(-1, c_log.shape[-1]), t_col[idx].reshape(-1), ignore_index=-100)
        loss = shape_loss + colour_loss
        return loss, ""

    net.train()
    fit(net.parameters(), steps, step_fn, log, tag="oracle", lr=2e-3, weight_decay=1e-4, every=250)
    oracle = Oracle(net)
    oracle.save_pretrained(out_dir)
    loaded = Oracle.from_pretrained(out_dir)
    ev = Pool.sample(SEED_EVAL + 2, 2000, p_two=0.5)
    metrics = {"clean": evaluate(loaded, ev), "blurred": evaluate(loaded, ev, blur=True)}
    loaded.save_pretrained(out_dir, extra={"heldout_accuracy": metrics})
    log(f"[oracle] held-out {metrics}")
    return {"seconds": round(time.time() - t0, 1), "steps": steps, "heldout_accuracy": metrics}


if __name__ == "__main__":
    train()
