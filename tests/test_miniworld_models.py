"""The shipped miniature-world models load through their real classes and behave on the world's 48 px scenes.

Fast (CPU, a few seconds each): CLIP ranking, the calibration file, one short generation with and without a
reference, the oracle on rendered scenes, and the device check on two prompts.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch

from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.grammar import reading_of
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import (
    CELLS,
    IMAGE_SIZE,
    SHAPES,
    ObjectSpec,
    Scene,
    render,
    sample_scene,
)

MODELS = MODELS_DIR


def _scene(shape: str, colour: str = "red", size: str = "large", cell: str = "centre") -> Scene:
    return Scene((ObjectSpec(shape, colour, size, cell),))


@pytest.fixture(scope="module")
def clip_model():
    folder = f"local-dir:{(MODELS / 'clip').resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(folder)
    return model.eval(), preprocess, open_clip.get_tokenizer(folder)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(MODELS / "t2i"), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


# Model quality (holds for trained v2 weights): a common and a rare shape, alone in a 48 px scene, are closer to
# their own shape's caption than to every other shape's.
@pytest.mark.parametrize("shape", ["square", "heart"])
def test_clip_ranks_the_right_shape_caption_first(clip_model, shape):
    model, preprocess, tokenizer = clip_model
    captions = [f"a {s}" for s in SHAPES]
    image = render(_scene(shape, "blue", "large", "left"))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        img = model.encode_image(preprocess(image).unsqueeze(0))
        txt = model.encode_text(tokenizer(captions))
    assert img.shape == (1, txt.shape[1]) and img.dtype == torch.float32
    sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    assert captions[int(sims.argmax())] == f"a {shape}"


def test_clip_calibration_file():
    cal = json.loads((MODELS / "clip" / "calibration.json").read_text())
    assert -1 < cal["judge_threshold"] < 1 and -1 < cal["retrieval_min_similarity"] < 1


def test_t2i_generates_48_px_images_with_and_without_a_reference(pipe):
    prompt = "a large red heart in the top left and a small blue ring at the bottom"
    kw = {
        "num_inference_steps": 4,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "guidance_scale": 5.0,
        "output_type": "np",
    }
    plain = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    assert plain.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and plain.dtype == np.float32
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    pipe.load_ip_adapter(
        str((MODELS / "ip_adapter").resolve()),
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    try:
        pipe.set_ip_adapter_scale(1.0)
        assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
        ref = render(_scene("heart", "green", "small", "bottom right"))
        with_ref = pipe(prompt, ip_adapter_image=ref, generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        pipe.unload_ip_adapter()
    assert with_ref.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(with_ref).all()
    assert np.abs(with_ref - plain).mean() > 1e-3  # the reference changes the image


def test_the_oracle_reads_rendered_scenes_of_several_objects_exactly():
    from imagerag.evals.miniworld.oracle import Oracle

    oracle = Oracle.from_pretrained(ORACLE_DIR)
    rng = random.Random(5)
    scenes = [sample_scene(rng, n) for n in (3, 4, 3, 4, 4, 3)]
    scenes.append(
        Scene(
            (
                ObjectSpec("heart", "red", "large", "top left", 0.5, -0.5),
                ObjectSpec("ring", "blue", "small", "bottom"),
                ObjectSpec("crescent", "cyan", "small", "centre", -0.7, 0.7),
                ObjectSpec("star", "yellow", "large", "right"),
            )
        )
    )
    by_cell = lambda reading: sorted(reading, key=lambda d: CELLS.index(d.cell))
    readings = oracle.read([render(sc) for sc in scenes])
    assert [by_cell(r) for r in readings] == [by_cell(reading_of(sc)) for sc in scenes]
    assert oracle.read(render(_scene("star"))) == [reading_of(_scene("star"))]  # one image: a list of one reading


def test_the_device_check_runs_the_shipped_models_and_compares_with_the_cpu(tmp_path, monkeypatch):
    from imagerag.evals.miniworld import device_check

    monkeypatch.setattr(sys, "argv", ["device_check", "--prompts", "2", "--out", str(tmp_path)])
    device_check.main()
    report = json.loads((tmp_path / "device_check.json").read_text())
    [cpu] = [r for r in report["runs"] if r["device"] == "cpu"]
    assert cpu["prompts"] == 2 and cpu["mean_abs_pixel_diff_vs_cpu"] == 0.0
    assert 0 <= cpu["rare_shape_text_alone"] <= 2 and 0 <= cpu["rare_shape_with_reference"] <= 2
    assert 0.0 <= cpu["judge_score_first_image"] <= 1.0 and cpu["seconds_per_image"] > 0


def test_the_clip_judge_reads_places_counts_and_relations_cell_by_cell(tmp_path):
    """On a rendered scene the mini critic judges concepts of place from where CLIP finds each object alone."""
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.judges import ClipJudge
    from imagerag.tools.backends.loading import calibrated, load_embedder
    from imagerag.tools.grid import CELL_BOXES, singular
    from imagerag.tools.revision import vocabulary_for
    from imagerag.tools.types import Concept

    settings = Settings(profile="mini", data_dir=tmp_path, device="cpu")
    nouns = sorted({singular(n) for n in vocabulary_for("miniworld").nouns or ()})
    judge = ClipJudge(load_embedder(settings), calibrated(settings).judge_threshold, {"object": nouns})
    scene = Scene(
        (
            ObjectSpec("star", "red", "large", "top left"),
            ObjectSpec("ring", "blue", "small", "centre"),
            ObjectSpec("ring", "blue", "small", "bottom right"),
            ObjectSpec("square", "green", "large", "top right"),
        )
    )
    texts = {
        "a star": ("object", True),
        "a star in the top left": ("relation", True),
        "a star at the bottom": ("relation", False),
        "two rings": ("count", True),
        "three rings": ("count", False),
        "a star to the left of a square": ("relation", True),
        "a star to the right of a square": ("relation", False),
        # A relation is about places: the square is green, yet it stands where "a blue square" asks (its colour is a
        # concept of its own); the star reads more as a star than as a heart, so no heart is left of anything.
        "a star to the left of a blue square": ("relation", True),
        "a heart to the left of a square": ("relation", False),
        "a red star": ("attribute", True),
        "a blue star": ("attribute", False),
    }
    concepts = [Concept(id=f"c{i}", text=t, kind=kind) for i, (t, (kind, _)) in enumerate(texts.items())]
    verdicts = judge.critique(render(scene), concepts).verdicts
    assert {t: v.satisfied for t, v in zip(texts, verdicts, strict=True)} == {t: ok for t, (_, ok) in texts.items()}
    assert verdicts[0].box == CELL_BOXES["top left"]


def test_the_clip_judge_finds_the_objects_nobody_asked_for_in_a_closed_world_only(tmp_path):
    """A stray is a drawn cell that reads as one of the world's objects and that no concept accounts for: an object
    of another noun, or a second object of a noun asked for once. A count accounts for every cell it found."""
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.judges import ClipJudge
    from imagerag.tools.backends.loading import calibrated, load_embedder
    from imagerag.tools.grid import CELL_BOXES, singular
    from imagerag.tools.revision import vocabulary_for
    from imagerag.tools.types import Concept

    settings = Settings(profile="mini", data_dir=tmp_path, device="cpu")
    nouns = sorted({singular(n) for n in vocabulary_for("miniworld").nouns or ()})
    embedder, threshold = load_embedder(settings), calibrated(settings).judge_threshold
    judge = ClipJudge(embedder, threshold, {"object": nouns})
    image = render(
        Scene(
            (
                ObjectSpec("star", "red", "large", "top left"),
                ObjectSpec("ring", "blue", "large", "centre"),
                ObjectSpec("ring", "green", "large", "bottom right"),
                ObjectSpec("square", "green", "large", "top right"),
            )
        )
    )

    def strays(*texts: tuple[str, str]) -> list:
        concepts = [Concept(id=f"c{i}", text=t, kind=kind) for i, (t, kind) in enumerate(texts)]  # type: ignore[arg-type]
        return judge.strays(image, concepts, judge.critique(image, concepts).verdicts)

    assert strays(("a star", "object"), ("two rings", "count"), ("a square", "object")) == []
    assert strays(("a star", "object"), ("two rings", "count")) == [CELL_BOXES["top right"]]
    assert strays(("a star", "object"), ("a ring", "object"), ("a square", "object")) == [CELL_BOXES["bottom right"]]
    # An open world (no nouns known) finds none: a photograph holds much that nobody named.
    assert ClipJudge(embedder, threshold).strays(image, [], []) == []


def test_the_clip_judge_embeds_a_collection_images_cells_once(tmp_path, monkeypatch):
    """A reference found by many queries, in many processes, has its cells embedded once: kept in memory by its
    pixels, and on disk under its collection id. A generated image (no id) is kept in memory only."""
    from imagerag.agent.config import Settings
    from imagerag.tools.backends.judges import CellCache, ClipJudge
    from imagerag.tools.backends.loading import load_embedder
    from imagerag.tools.types import REFERENCE_ID, Concept

    embedder = load_embedder(Settings(profile="mini", data_dir=tmp_path, device="cpu"))
    batches = []
    embed_images = embedder.embed_images
    monkeypatch.setattr(embedder, "embed_images", lambda images: batches.append(len(images)) or embed_images(images))
    concepts = [Concept(id="c1", text="a star", kind="object"), Concept(id="c2", text="a red star", kind="attribute")]
    reference = render(_scene("star"))
    reference.info[REFERENCE_ID] = "abc123"
    first = ClipJudge(embedder, 0.3, cache=CellCache(tmp_path / "cells")).critique(reference, concepts)
    assert batches == [1, 9] and (tmp_path / "cells" / "abc123.npy").is_file()  # the whole image, then 9 cells
    judge = ClipJudge(embedder, 0.3, cache=CellCache(tmp_path / "cells"))  # another process: read from disk
    assert judge.critique(reference, concepts) == first and batches == [1, 9, 1]
    generated = render(_scene("star", cell="top left"))
    judge.critique(generated, concepts)
    judge.critique(generated.copy(), concepts)  # the same pixels: from memory
    assert batches == [1, 9, 1, 1, 9, 1] and sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["abc123.npy"]
