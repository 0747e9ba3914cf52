"""The shipped miniature-world models load through their real classes and behave.

Fast (CPU, a few seconds): one tiny generation with and without a reference, CLIP ranking, oracle.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch

from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import (
    ObjectSpec,
    Scene,
    caption,
    concepts,
    corpus_scenes,
    heldout_prompts,
    render,
    write_corpus,
)

MODELS = MODELS_DIR


def _scene(shape, colour="red", position="centre", size="large"):
    return Scene((ObjectSpec(shape, colour, position, size),))


@pytest.fixture(scope="module")
def clip_model():
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{(MODELS / 'clip').resolve()}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{(MODELS / 'clip').resolve()}")
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(MODELS / "t2i"), torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_world_is_deterministic_and_corpus_can_exclude(tmp_path):
    a, b = corpus_scenes(50, seed=3), corpus_scenes(50, seed=3)
    assert a == b
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    write_corpus(tmp_path / "c", n=30, seed=1, exclude_shapes=["heart"])
    caps = [p.read_text() for p in sorted((tmp_path / "c").glob("*.txt"))]
    assert len(caps) == 30 and not any("heart" in c for c in caps)
    assert len(list((tmp_path / "c").glob("*.png"))) == 30
    items = heldout_prompts(0)
    assert len(items) >= 200 and {i.group for i in items} == {"common", "rare", "two_object"}
    sc = Scene((ObjectSpec("heart", "red", "left"), ObjectSpec("square", "blue", "right")))
    assert caption(sc) == "a red heart on the left and a blue square on the right"
    assert [c.text for c in concepts(sc)][:3] == ["a heart", "a red heart", "a heart on the left"]


@pytest.mark.parametrize("shape", ["heart", "square"])
def test_clip_ranks_the_right_caption_first(clip_model, shape):
    model, preprocess, tokenizer = clip_model
    captions = ["a heart", "a square", "a circle", "a star", "a crescent", "a triangle"]
    image = preprocess(render(_scene(shape, "blue", "left"))).unsqueeze(0)
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(tokenizer(captions))
    assert img.shape == (1, 64) and img.dtype == torch.float32
    sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    assert captions[int(sims.argmax())] == f"a {shape}"


def test_clip_calibration_file():
    cal = json.loads((MODELS / "clip" / "calibration.json").read_text())
    assert -1 < cal["judge_threshold"] < 1 and -1 < cal["retrieval_min_similarity"] < 1


def test_t2i_generates_with_and_without_reference(pipe):
    kw = {"num_inference_steps": 4, "height": 32, "width": 32, "guidance_scale": 5.0, "output_type": "np"}
    plain = pipe("a red heart on the left", generator=torch.Generator().manual_seed(0), **kw).images
    assert plain.shape == (1, 32, 32, 3) and plain.dtype == np.float32
    assert pipe.unet.dtype == torch.float32 and pipe.unet.config.cross_attention_dim == 64
    pipe.load_ip_adapter(
        str((MODELS / "ip_adapter").resolve()),
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    pipe.set_ip_adapter_scale(1.0)
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    ref = render(_scene("heart", "blue", "right", "small"))
    with_ref = pipe(
        "a red heart on the left", ip_adapter_image=ref, generator=torch.Generator().manual_seed(0), **kw
    ).images
    assert with_ref.shape == (1, 32, 32, 3) and np.isfinite(with_ref).all()
    assert np.abs(with_ref - plain).mean() > 1e-3  # the reference changes the image
    pipe.unload_ip_adapter()


def test_oracle_judges_renders():
    from imagerag.evals.miniworld.oracle import Oracle

    oracle = Oracle.from_pretrained(ORACLE_DIR)
    sc = Scene((ObjectSpec("star", "orange", "left", "large"), ObjectSpec("ring", "green", "right", "small")))
    verdicts = oracle.judge(render(sc), sc)
    assert all(v.shape and v.colour and v.position for v in verdicts)
    wrong = Scene((ObjectSpec("heart", "blue", "top"),))
    (v,) = oracle.judge(render(sc), wrong)
    assert not v.shape and not v.position and not v.occupied


def test_the_device_check_runs_the_shipped_models_and_compares_with_the_cpu(tmp_path, monkeypatch):
    import json
    import sys

    from imagerag.evals.miniworld import device_check

    monkeypatch.setattr(sys, "argv", ["device_check", "--prompts", "2", "--out", str(tmp_path)])
    device_check.main()
    report = json.loads((tmp_path / "device_check.json").read_text())
    [cpu] = [r for r in report["runs"] if r["device"] == "cpu"]
    assert cpu["prompts"] == 2 and cpu["mean_abs_pixel_diff_vs_cpu"] == 0.0
    assert 0 <= cpu["rare_shape_with_reference"] <= 2 and 0.0 <= cpu["judge_score_first_image"] <= 1.0
