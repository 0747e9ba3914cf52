"""Final check of the shipped miniature models, loaded from disk through their real classes.

    python -m imagerag.evals.miniworld.check [--steps 20 --guidance 8.0 --ip-scale 1.0]

Reads the runtime's weights from tools/miniworld/models and the oracle from evals/miniworld/models/oracle. Writes
evals/miniworld/models/metrics.json and a sample grid to evals/miniworld/logs/check_grid.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from imagerag.evals.miniworld.common import EVAL_MODELS_DIR, LOGS_DIR, ORACLE_DIR, SEED_EVAL
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import Scene, corpus_scenes, heldout_prompts, render, render_array, sample_scenes

DEFAULTS = {
    "num_inference_steps": 20,
    "guidance_scale": 8.0,
    "ip_adapter_scale": 1.0,
    "height": 32,
    "width": 32,
    "seed": 0,
}


def load_pipeline(models_dir: Path = MODELS_DIR, with_ip_adapter: bool = False, ip_scale: float = 1.0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "t2i"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if with_ip_adapter:
        pipe.load_ip_adapter(
            str((models_dir / "ip_adapter").resolve()),
            subfolder="",
            weight_name="ip_adapter.safetensors",
            image_encoder_folder="image_encoder",
        )
        pipe.set_ip_adapter_scale(ip_scale)
    return pipe


def reference_for(obj, corpus: list[Scene], rng: random.Random) -> Scene:
    """A corpus scene showing the object's shape alone, in another colour and position."""
    cands = [
        sc
        for sc in corpus
        if len(sc.objects) == 1
        and sc.objects[0].shape == obj.shape
        and sc.objects[0].colour != obj.colour
        and sc.objects[0].position != obj.position
    ]
    return cands[rng.randrange(len(cands))]


def ref_target(scene: Scene):
    rare = [o for o in scene.objects if o.is_rare]
    return rare[0] if rare else scene.objects[0]


def generate(
    pipe, prompts: list[str], refs: list[Image.Image] | None, settings: dict, bs: int = 64
) -> list[Image.Image]:
    out = []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        gens = [torch.Generator().manual_seed(settings["seed"] * 100_000 + i + j) for j in range(len(chunk))]
        kw = {}
        if refs is not None:
            emb, _ = pipe.encode_image(refs[i : i + bs], "cpu", 1)
            kw["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(emb), emb])[:, None, :]]
        out += pipe(
            chunk,
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            generator=gens,
            **kw,
        ).images
    return out


def score(oracle, images, scenes, groups) -> dict:
    verdicts = oracle.judge_many(np.stack([np.asarray(im) for im in images]), scenes)
    res: dict = {}
    for g in sorted(set(groups)):
        vs = [v for v, gg in zip(verdicts, groups, strict=True) if gg == g]
        flat = [x for v in vs for x in v]
        res[g] = {
            "n": len(vs),
            "shape": float(np.mean([x.shape for x in flat])),
            "colour": float(np.mean([x.colour for x in flat])),
            "position": float(np.mean([x.position for x in flat])),
            "all_objects_all_correct": float(
                np.mean([all(x.shape and x.colour and x.position for x in v) for v in vs])
            ),
        }
    return res


def split_groups(items, scenes):
    """Group two-object prompts by whether they contain a rare shape."""
    out = []
    for it, sc in zip(items, scenes, strict=True):
        g = it.group
        if g == "two_object":
            g = "two_object_with_rare" if sc.has_rare else "two_object_common"
        out.append(g)
    return out


def run_check(
    log: Callable[[str], None] = print,
    models_dir: Path = MODELS_DIR,
    settings: dict | None = None,
    grid: bool = True,
    out_dir: Path = EVAL_MODELS_DIR,
    logs_dir: Path = LOGS_DIR,
) -> dict:
    """Measure the models in `models_dir` (the runtime's); write metrics.json to `out_dir`, the grid to `logs_dir`."""
    import open_clip

    from imagerag.evals.miniworld.common import Pool
    from imagerag.evals.miniworld.oracle import Oracle
    from imagerag.evals.miniworld.train_clip import clip_tokens, zero_shot_shape_accuracy
    from imagerag.evals.miniworld.train_oracle import evaluate as oracle_eval

    torch.set_num_threads(2)
    settings = {**DEFAULTS, **(settings or {})}
    t0 = time.time()
    metrics: dict = {"settings": settings}

    clip_dir = (models_dir / "clip").resolve()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    model.eval()
    ev = sample_scenes(SEED_EVAL + 1, 1000, p_two=0.0)
    metrics["clip_zero_shot_shape_accuracy"] = zero_shot_shape_accuracy(model, clip_tokens(), ev, render_array(ev))
    metrics["clip_calibration"] = json.loads((clip_dir / "calibration.json").read_text())
    log(f"[check] clip zero-shot {metrics['clip_zero_shot_shape_accuracy']}")

    oracle = Oracle.from_pretrained(ORACLE_DIR)
    ev_pool = Pool.sample(SEED_EVAL + 2, 2000, p_two=0.5)
    metrics["oracle_accuracy"] = {
        "clean": oracle_eval(oracle, ev_pool),
        "blurred": oracle_eval(oracle, ev_pool, blur=True),
    }
    log(f"[check] oracle {metrics['oracle_accuracy']}")

    items = heldout_prompts(0)
    scenes = [it.scene for it in items]
    prompts = [it.prompt for it in items]
    groups = split_groups(items, scenes)
    corpus = corpus_scenes(6000, seed=1)
    rng = random.Random(SEED_EVAL + 3)
    ref_scenes = [reference_for(ref_target(sc), corpus, rng) for sc in scenes]
    refs = [render(r) for r in ref_scenes]

    pipe = load_pipeline(models_dir)
    text_imgs = generate(pipe, prompts, None, settings)
    metrics["t2i_text_alone"] = score(oracle, text_imgs, scenes, groups)
    log(f"[check] text alone {json.dumps(metrics['t2i_text_alone'])}")

    pipe = load_pipeline(models_dir, with_ip_adapter=True, ip_scale=settings["ip_adapter_scale"])
    ref_imgs = generate(pipe, prompts, refs, settings)
    metrics["t2i_with_reference"] = score(oracle, ref_imgs, scenes, groups)
    log(f"[check] with reference {json.dumps(metrics['t2i_with_reference'])}")

    # The ImageRAG prompt template, rare prompts only.
    rare_i = [i for i, g in enumerate(groups) if g == "rare"]
    tmpl = [f"according to this image of a {scenes[i].objects[0].shape}, generate {prompts[i]}" for i in rare_i]
    tmpl_imgs = generate(pipe, tmpl, [refs[i] for i in rare_i], settings)
    metrics["t2i_with_reference_imagerag_template_rare"] = score(
        oracle, tmpl_imgs, [scenes[i] for i in rare_i], ["rare"] * len(rare_i)
    )["rare"]

    ta, wr = metrics["t2i_text_alone"], metrics["t2i_with_reference"]
    metrics["summary"] = {
        "clip_zero_shot_overall": metrics["clip_zero_shot_shape_accuracy"]["overall"],
        "clip_zero_shot_min_shape": min(metrics["clip_zero_shot_shape_accuracy"]["per_shape"].values()),
        "oracle_shape_clean": metrics["oracle_accuracy"]["clean"]["shape"],
        "text_alone_shape_common": ta["common"]["shape"],
        "text_alone_shape_rare": ta["rare"]["shape"],
        "with_reference_shape_rare": wr["rare"]["shape"],
        "with_reference_shape_common": wr["common"]["shape"],
        "with_reference_colour_rare": wr["rare"]["colour"],
        "with_reference_position_rare": wr["rare"]["position"],
        "rare_gain_points": round(100 * (wr["rare"]["shape"] - ta["rare"]["shape"]), 1),
    }
    metrics["seconds"] = round(time.time() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"[check] summary {json.dumps(metrics['summary'])}")

    if grid:
        rows = [[render(sc) for sc in scenes], text_imgs, refs, ref_imgs]
        pick = list(range(16)) + list(range(80, 96)) + list(range(160, 176))
        g = Image.new("RGB", (32 * len(pick), 32 * len(rows)), (128, 128, 128))
        for r, row in enumerate(rows):
            for c, i in enumerate(pick):
                g.paste(row[i], (32 * c, 32 * r))
        logs_dir.mkdir(parents=True, exist_ok=True)
        g.resize((g.width * 2, g.height * 2), Image.Resampling.NEAREST).save(logs_dir / "check_grid.png")
    return {"seconds": metrics["seconds"], "summary": metrics["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.evals.miniworld.check")
    ap.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    ap.add_argument("--ip-scale", type=float, default=DEFAULTS["ip_adapter_scale"])
    a = ap.parse_args()
    run_check(settings={"num_inference_steps": a.steps, "guidance_scale": a.guidance, "ip_adapter_scale": a.ip_scale})


if __name__ == "__main__":
    main()
