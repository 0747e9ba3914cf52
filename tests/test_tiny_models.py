"""The real loading path (from_pretrained, load_ip_adapter, open_clip local-dir) on tiny models built offline."""

import json

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
from imagerag.tools.backends.loading import load_backends, resolve
from imagerag.tools.backends.tiny import LAYOUT, build_tiny_models
from imagerag.tools.toolkit import Toolkit


def test_tiny_pipeline_round_trips_through_save_and_from_pretrained(tiny_settings, tmp_path):
    folder = resolve("tiny:sd", tiny_settings.data_dir)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path / "copy")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "copy")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "copy" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_ip_adapter_loads_from_a_local_folder_and_changes_the_image(tiny_settings):
    backends = load_backends(tiny_settings)
    pipe = backends.generator.pipe
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None
    plain = backends.generator.generate("a red heart", seed=0)[0]
    with_ref = backends.generator.generate("a red heart", seed=0, references=[Image.new("RGB", (32, 32), "red")])[0]
    assert plain.size == with_ref.size == (32, 32)
    assert list(plain.getdata()) != list(with_ref.getdata())
    # Text-only calls switch the adapter off exactly: two text-only calls with one seed agree pixel for pixel.
    assert list(plain.getdata()) == list(backends.generator.generate("a red heart", seed=0)[0].getdata())


def test_generate_and_regenerate_share_one_pipeline(tiny_settings, tmp_path):
    first, second = load_backends(tiny_settings), load_backends(tiny_settings)
    assert first.generator is second.generator  # loaded once per process
    toolkit = Toolkit(first, tmp_path)
    generator_calls = []
    original = first.generator.pipe.__class__.__call__

    def counting(pipe, *args, **kwargs):
        generator_calls.append(id(pipe))
        return original(pipe, *args, **kwargs)

    first.generator.pipe.__class__.__call__ = counting
    try:
        toolkit.generate("a heart")
        toolkit.regenerate("a heart", toolkit.retrieve("a red square"))
    finally:
        first.generator.pipe.__class__.__call__ = original
    assert len(generator_calls) == 2 and len(set(generator_calls)) == 1


def test_captions_longer_than_the_text_encoder_limit_are_truncated_not_fatal(tiny_settings):
    backends = load_backends(tiny_settings)
    long_prompt = "a red heart beside a blue square " * 40
    [image] = backends.generator.generate(long_prompt, seed=0)
    assert image.size == (32, 32)
    assert backends.store.embedder.embed_texts([long_prompt]).shape == (1, 16)


def test_open_clip_local_dir_identity_is_its_weights_not_its_path(tiny_settings, tmp_path):
    import shutil

    folder = resolve("tiny:clip", tiny_settings.data_dir)
    shutil.copytree(folder, tmp_path / "moved")
    original = ClipEmbedder.from_pretrained(LOCAL_DIR + folder)
    moved = ClipEmbedder.from_pretrained(LOCAL_DIR + str(tmp_path / "moved"))
    assert original.info == moved.info and original.info.dim == 16


def test_a_data_folder_built_to_the_older_layout_is_built_again(tmp_path):
    # Layout 1 kept the adapter at ip_adapter/ip_adapter.safetensors, where the profiles no longer look.
    root = tmp_path / "tiny-models"
    (root / "ip_adapter").mkdir(parents=True)
    (root / "ip_adapter" / "ip_adapter.safetensors").write_bytes(b"")
    (root / "done").write_text("ok")
    build_tiny_models(root)
    assert (root / "done").read_text() == LAYOUT
    assert not (root / "ip_adapter" / "ip_adapter.safetensors").exists()
    for path in (
        "ip_adapter/models/ip-adapter_sd15.safetensors",
        "ip_adapter/models/image_encoder/config.json",
        "ip_adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        "sdxl/text_encoder_2/config.json",
        "omnigen/transformer/config.json",
    ):
        assert (root / path).is_file(), path


def test_image_i_of_a_batch_is_the_image_of_seed_plus_i_drawn_alone(tiny_settings):
    """--samples K draws one batched call; each candidate records seed + i, which must reproduce it alone."""
    import numpy as np

    from imagerag.tools.backends.loading import load_backends

    generator = load_backends(tiny_settings).generator
    batch = generator.generate("a red square", 5, 3)
    alone = generator.generate("a red square", 7, 1)[0]
    assert np.abs(np.asarray(batch[2], dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert np.abs(np.asarray(batch[0], dtype=int) - np.asarray(batch[1], dtype=int)).max() > 0
