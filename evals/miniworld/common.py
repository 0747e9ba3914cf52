"""Shared helpers for training the miniature models: seeds, data pools, augmentation, token caching, the
optimisation loop, paths."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagerag.tools.miniworld.world import SHAPES, Scene, render_array, sample_scenes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Evaluation only, never loaded by a run: the oracle, train_log.json and metrics.json. The runtime's weights (clip, t2i,
# ip_adapter) live in imagerag.tools.miniworld.MODELS_DIR; training logs and sample grids go to LOGS_DIR (git-ignored).
ORACLE_DIR = Path(__file__).resolve().parent / "models" / "oracle"
EVAL_MODELS_DIR = ORACLE_DIR.parent
LOGS_DIR = EVAL_MODELS_DIR.parent / "logs"
CHECKPOINTS_DIR = LOGS_DIR / "checkpoints"  # resumable training state and finished stages' models
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Seed ranges: training pools use seeds < 1_000_000; held-out prompts use 10_000_000+ (world.py).
SEED_CLIP = 101
SEED_ORACLE = 202
SEED_T2I = 303
SEED_EVAL = 900_001


# Training threads; `train --threads 1` helps when other jobs share the two cores (oversubscribed threads spin).
THREADS = int(os.environ.get("IMAGERAG_TRAIN_THREADS", "2"))


def seed_everything(seed: int, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads or THREADS)
    # Adam's moments of rarely used rows (most of a text encoder's vocabulary) decay into subnormal floats, which a
    # CPU handles a hundred times slower: flush them to zero (training slowed from 0.5 to 3 s a step without it).
    torch.set_flush_denormal(True)


class Pool:
    """Rendered scenes held in memory as uint8 (N, 48, 48, 3)."""

    def __init__(self, scenes: Sequence[Scene]):
        self.scenes = list(scenes)
        self.images = render_array(self.scenes)

    @classmethod
    def sample(
        cls, seed: int, n: int, weights: Sequence[float] = (0.3, 0.3, 0.2, 0.2), shapes: Sequence[str] = SHAPES
    ) -> Pool:
        return cls(sample_scenes(seed, n, weights, shapes))

    def __len__(self) -> int:
        return len(self.scenes)

    def batch01(self, idx: Sequence[int]) -> torch.Tensor:
        """float tensor (B, 3, 48, 48) in [0, 1]."""
        return torch.from_numpy(self.images[np.asarray(idx)]).permute(0, 3, 1, 2).float() / 255.0


def normalize_clip(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def augment(x01: torch.Tensor, gen: torch.Generator, p_blur: float = 0.4, noise: float = 0.04) -> torch.Tensor:
    """Blur and noise so that models also read the generator's slightly soft outputs."""
    b = x01.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None, :]) / 16.0
    blurred = F.conv2d(F.pad(x01, (1, 1, 1, 1), mode="replicate"), k2.expand(3, 1, 3, 3), groups=3)
    mask = (torch.rand(b, 1, 1, 1, generator=gen) < p_blur).float()
    x = mask * blurred + (1 - mask) * x01
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * noise
    x = x + sigma * torch.randn(x.shape, generator=gen)
    gain = 1.0 + 0.06 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)
    return (x * gain).clamp(0, 1)


class TokenCache:
    """Token ids per text, computed once: training draws the same captions over and over."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]) -> None:
        self.encode = encode  # texts -> (len(texts), context length) token ids
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.encode(missing), strict=False))
        return torch.stack([self.cache[t] for t in texts])


# ----------------------------------------------------------------------------- optimisation


def warmup_cosine(
    opt: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 5% (a LambdaLR that works for any number of steps)."""
    w = max(1, int(total_steps * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        p = min(1.0, (step - w) / max(1, total_steps - w))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def fit(
    params: Iterable[torch.nn.Parameter],
    steps: int,
    step_fn: Callable[[int], tuple[torch.Tensor, str]],
    log: Callable[[str], None],
    *,
    tag: str,
    lr: float,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    every: int = 200,
    max_grad_norm: float | None = None,
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    checkpoint: Path | None = None,
    modules: Sequence[torch.nn.Module] = (),
    rngs: Sequence[random.Random | torch.Generator] = (),
    checkpoint_every: int = 250,
) -> float:
    """Minimise with AdamW for `steps` steps; `step_fn(step)` returns the loss and extra text for the log ("" for
    none). The learning rate follows warmup_cosine unless `schedule` builds another scheduler; gradients are clipped
    to `max_grad_norm` when one is given. Logs every `every` steps and at the last; returns the loop's seconds.

    With `checkpoint`, the modules' weights, the optimiser, the schedule and the random generators that `step_fn`
    draws from are saved there every `checkpoint_every` steps, and a later call resumes from them: an interrupted
    stage loses at most that many steps and ends where an uninterrupted one would."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = schedule(opt) if schedule else warmup_cosine(opt, steps, warmup)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        for module, sd in zip(modules, state["modules"], strict=True):
            module.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        for rng, rs in zip(rngs, state["rngs"], strict=True):
            rng.setstate(rs) if isinstance(rng, random.Random) else rng.set_state(rs)
        start = state["step"]
        log(f"[{tag}] resumed at step {start} from {checkpoint}")

    def save(step: int) -> None:
        assert checkpoint is not None
        state = {
            "step": step,
            "modules": [m.state_dict() for m in modules],
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rngs": [r.getstate() if isinstance(r, random.Random) else r.get_state() for r in rngs],
        }
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    t0 = time.time()
    for step in range(start, steps):
        loss, note = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps - 1:
            extra = f" {note}" if note else ""
            log(f"[{tag}] step {step}/{steps} loss {loss.item():.4f}{extra} {time.time() - t0:.0f}s")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            save(step + 1)
    return time.time() - t0
