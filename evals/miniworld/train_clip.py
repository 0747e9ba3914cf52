"""Train the mini OpenCLIP model on rendered scenes and save it as an open_clip local-dir folder.

Load with:
    open_clip.create_model_and_transforms("local-dir:/abs/tools/miniworld/models/clip")
    open_clip.get_tokenizer("local-dir:/abs/tools/miniworld/models/clip")
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from imagerag.evals.miniworld.common import (
    CLIP_MEAN,
    CLIP_STD,
    SEED_CLIP,
    SEED_EVAL,
    Pool,
    TokenCache,
    augment,
    false_concepts,
    fit,
    normalize_clip,
    partial_caption,
    query_true,
    seed_everything,
)
from imagerag.tools.backends.calibration import best_threshold
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import (
    POSITION_PHRASES,
    SHAPES,
    Scene,
    concepts,
    corpus_scenes,
    render_array,
    sample_scenes,
)

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
PREPROCESS_CFG = {
    "size": 32,
    "mode": "RGB",
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def clip_tokens() -> TokenCache:
    """open_clip's own tokenizer, the one a `local-dir:` model loads."""
    from open_clip.tokenizer import SimpleTokenizer

    return TokenCache(SimpleTokenizer(context_length=77))


def build_model():
    import open_clip

    return open_clip.CLIP(**MODEL_CFG)


@torch.no_grad()
def encode_images(model, x01: torch.Tensor, bs: int = 512) -> torch.Tensor:
    out = [F.normalize(model.encode_image(normalize_clip(x01[i : i + bs])), dim=-1) for i in range(0, len(x01), bs)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, bs: int = 512) -> torch.Tensor:
    out = [F.normalize(model.encode_text(tokens[i : i + bs]), dim=-1) for i in range(0, len(tokens), bs)]
    return torch.cat(out)


def zero_shot_shape_accuracy(model, tok, scenes: list[Scene], images_u8: np.ndarray) -> dict:
    model.eval()
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    img = encode_images(model, x)
    txt = encode_texts(model, tok([f"a {s}" for s in SHAPES]))
    pred = (img @ txt.T).argmax(1).numpy()
    per = {}
    for k, s in enumerate(SHAPES):
        m = np.array([sc.objects[0].shape == s for sc in scenes])
        per[s] = float((pred[m] == k).mean()) if m.any() else float("nan")
    truth = np.array([SHAPES.index(sc.objects[0].shape) for sc in scenes])
    return {"overall": float((pred == truth).mean()), "per_shape": per}


def calibrate(model, tok, seed: int = SEED_EVAL) -> dict:
    """judge_threshold: cosine that best separates true from false single-concept captions.
    retrieval_min_similarity: cosine below which a caption's best corpus match is not of the concept
    (positives: best match in a full corpus when it shows the concept; negatives: best match in a
    corpus that lacks the concept's shape)."""
    model.eval()
    rng = random.Random(seed)
    scenes = sample_scenes(seed, 600, p_two=0.4)
    x = torch.from_numpy(render_array(scenes)).permute(0, 3, 1, 2).float() / 255
    img = encode_images(model, x)
    pos_s, neg_s = [], []
    for i, sc in enumerate(scenes):
        trues = [c.text for c in concepts(sc)]
        falses = [t for t, _ in false_concepts(sc, rng)]
        t_emb = encode_texts(model, tok(trues + falses))
        sims = (t_emb @ img[i]).numpy()
        pos_s += list(sims[: len(trues)])
        neg_s += list(sims[len(trues) :])
    judge_t, judge_bacc = best_threshold(np.array(pos_s), np.array(neg_s))

    corpus = corpus_scenes(1500, seed=seed + 7)
    cx = torch.from_numpy(render_array(corpus)).permute(0, 3, 1, 2).float() / 255
    cemb = encode_images(model, cx)
    pos_r, neg_r = [], []
    queries = []
    for s in SHAPES:
        queries.append((s, f"a {s}"))
        for c in ("red", "blue", "yellow"):
            queries.append((s, f"a {c} {s}"))
        for p in ("left", "top"):
            queries.append((s, f"a {s} {POSITION_PHRASES[p]}"))
    q_emb = encode_texts(model, tok([q for _, q in queries]))
    q_sims = q_emb @ cemb.T
    for qi, (shape, _) in enumerate(queries):
        has = torch.tensor([any(o.shape == shape for o in sc.objects) for sc in corpus])
        best_with = q_sims[qi].max().item()
        best_j = int(q_sims[qi].argmax())
        if has[best_j]:
            pos_r.append(best_with)
        best_without = q_sims[qi][~has].max().item()
        neg_r.append(best_without)
    ret_t, ret_bacc = best_threshold(np.array(pos_r), np.array(neg_r))
    return {
        "judge_threshold": round(judge_t, 4),
        "judge_balanced_accuracy": round(judge_bacc, 4),
        "retrieval_min_similarity": round(ret_t, 4),
        "retrieval_balanced_accuracy": round(ret_bacc, 4),
        "n_judge_pairs": [len(pos_s), len(neg_s)],
        "n_retrieval_queries": [len(pos_r), len(neg_r)],
    }


def save(model, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / "open_clip_model.safetensors"))
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2)
    )


def train(out_dir: Path = MODELS_DIR / "clip", steps: int = 1000, batch: int = 128, log=print) -> dict:
    seed_everything(SEED_CLIP)
    t0 = time.time()
    pool = Pool.sample(SEED_CLIP, 30000, p_two=0.4)
    log(f"[clip] pool rendered in {time.time() - t0:.1f}s")
    model = build_model()
    tok = clip_tokens()
    gen = torch.Generator().manual_seed(SEED_CLIP)
    rng = random.Random(SEED_CLIP)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        idx = [rng.randrange(len(pool)) for _ in range(batch)]
        caps = [partial_caption(pool.scenes[i], rng) for i in idx]
        x = normalize_clip(augment(pool.batch01(idx), gen))
        tokens = tok([c for c, _ in caps])
        target = torch.tensor([[query_true(q, pool.scenes[i]) for _, q in caps] for i in idx], dtype=torch.float32)
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.T
        loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
        return 0.5 * (loss_i + loss_t), ""

    model.train()
    fit(
        model.parameters(),
        steps,
        step_fn,
        log,
        tag="clip",
        lr=1e-3,
        weight_decay=0.05,
        schedule=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.08),
    )
    save(model, out_dir)
    # Reload through the real loader before measuring, so the numbers are about the shipped files.
    import open_clip

    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out_dir.resolve()}")
    ev_scenes = sample_scenes(SEED_EVAL + 1, 1000, p_two=0.0)
    zs = zero_shot_shape_accuracy(loaded, tok, ev_scenes, render_array(ev_scenes))
    cal = calibrate(loaded, tok)
    (out_dir / "calibration.json").write_text(
        json.dumps(
            {
                "judge_threshold": cal["judge_threshold"],
                "retrieval_min_similarity": cal["retrieval_min_similarity"],
                "details": cal,
            },
            indent=2,
        )
    )
    log(f"[clip] zero-shot {zs}")
    log(f"[clip] calibration {cal}")
    return {"seconds": round(time.time() - t0, 1), "steps": steps, "zero_shot": zs, "calibration": cal}


if __name__ == "__main__":
    import sys

    train(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 2400)
