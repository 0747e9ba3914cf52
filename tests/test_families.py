"""Each generator family end to end on tiny random checkpoints saved in its real repositories' file layout.

The tiny profiles load tools.backends.tiny's folders through the same `from_pretrained` and `load_ip_adapter`
calls the real profiles make, and the whole loop runs on them: generate, critique (scripted: the first image misses
the heart), retrieve a reference for the heart, regenerate with it. What the real weights draw is out of reach
here; what the code sends to each pipeline class, and what those classes accept, is not.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import OmniGenPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from PIL import Image
from scripted import ScriptedCritic
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from imagerag.agent.config import Settings
from imagerag.agent.result import RunResult
from imagerag.agent.run import run
from imagerag.tools.backends.loading import load_backends
from imagerag.tools.config import PROFILES
from imagerag.tools.toolkit import Backends

PROMPT = "a heart and a square"  # c1 (a heart), c2 (a square)
# Settings a tiny profile may change from the real one it stands for: which weights, and how long they run.
SIZE_AND_WEIGHTS = {"model_id", "ip_adapter", "steps", "height", "width"}


class CallSpy:
    """Records every pipeline call's keyword arguments, and the IP-Adapter scale in force during the call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pipe):
        self.calls: list[dict] = []
        self.scales: list[float | None] = []
        original = type(pipe).__call__

        def spy(pipe, *args, **kwargs):
            self.calls.append(kwargs)
            unet = getattr(pipe, "unet", None)
            ip = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)] if unet else []
            self.scales.append(ip[0].scale[0] if ip else None)
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)


def loaded(profile: str, data_dir: Path) -> tuple[Settings, Backends]:
    # On the CPU even where a GPU is present: these tests check the CPU's float32 path.
    settings = Settings(profile=profile, data_dir=data_dir, device="cpu")
    return settings, load_backends(settings)


def run_loop(settings: Settings, backends: Backends, tmp_path: Path) -> RunResult:
    """The whole loop on the profile's real backends with a scripted critic that misses the heart at first; the round
    redraws the whole image (tests/test_edit.py runs edits through each family), from whole references (what the
    pipeline does with a reference does not depend on its size; tests/test_detector.py checks the crop)."""
    settings = settings.model_copy(update={"edits": False, "object_references": False})
    critic = ScriptedCritic([{"c2"}, {"c1", "c2"}])
    result = run(PROMPT, settings, tmp_path / "runs", backends=dataclasses.replace(backends, critic=critic))
    assert result.status == "satisfied" and result.profile == settings.profile, result.error
    assert [s.node for s in result.steps] == [
        "plan",
        "generate",
        "critique",
        "retrieve",
        "regenerate",
        "critique",
        "finish",
    ]
    first, regenerated = result.candidates
    assert not first.references
    [reference] = regenerated.references
    assert reference.query == "a photo of a heart" and Path(reference.source).exists()
    spec = PROFILES[settings.profile].generator
    for candidate in result.candidates:
        with Image.open(Path(result.run_dir) / "images" / f"{candidate.image_id}.png") as image:
            assert image.size == (spec.width, spec.height)
    return result


def all_float32(*modules: torch.nn.Module) -> bool:
    """The CPU runs float32 whatever the profile's dtype and whatever the files hold (the adapters are float16)."""
    return all(p.dtype == torch.float32 for m in modules for p in m.parameters())


def mirrors(tiny: str, real: str) -> bool:
    """The tiny profile sends its pipeline what the real one does, but for the weights and their size and steps."""
    a, b = PROFILES[tiny].generator, PROFILES[real].generator
    same = a.model_dump(exclude=SIZE_AND_WEIGHTS) == b.model_dump(exclude=SIZE_AND_WEIGHTS)
    if a.ip_adapter is None or b.ip_adapter is None:
        return same and a.ip_adapter is b.ip_adapter
    return same and a.ip_adapter.model_dump(exclude={"repo"}) == b.ip_adapter.model_dump(exclude={"repo"})


def test_sd15_with_ip_adapter_through_the_loop(data_dir, tmp_path, monkeypatch):
    """Mirrors stable-diffusion-v1-5/stable-diffusion-v1-5 (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ (PNDM), feature_extractor/) and h94/IP-Adapter's models/ip-adapter_sd15.safetensors with
    models/image_encoder/, loaded as the sd15 profile loads them (subfolder "models")."""
    tiny, sd15 = PROFILES["tiny"].generator.ip_adapter, PROFILES["sd15"].generator.ip_adapter
    assert tiny.model_dump(exclude={"repo"}) == sd15.model_dump(exclude={"repo"})
    settings, backends = loaded("tiny", data_dir)
    pipe = backends.generator.pipe
    spy = CallSpy(monkeypatch, pipe)
    run_loop(settings, backends, tmp_path)
    assert type(pipe) is StableDiffusionPipeline
    [projection] = pipe.unet.encoder_hid_proj.image_projection_layers
    assert type(projection) is ImageProjection and projection.num_image_text_embeds == 4
    assert all_float32(pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder)
    text, regeneration = spy.calls
    assert spy.scales == [0.0, 0.5]
    # Text alone gets a blank stand-in at scale 0; the regeneration gets the 32 px reference itself.
    assert text["ip_adapter_image"].size == (224, 224) and regeneration["ip_adapter_image"].size == (32, 32)


def test_sdxl_with_ip_adapter_plus_through_the_loop(data_dir, tmp_path, monkeypatch):
    """Mirrors stabilityai/stable-diffusion-xl-base-1.0 (model_index.json, unet/ with text_time added embeddings,
    vae/ with force_upcast, text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection), tokenizer/,
    tokenizer_2/, scheduler/ (Euler)) and h94/IP-Adapter's sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors (a
    resampler) with the ViT-H encoder in models/image_encoder/, loaded as the sdxl profile loads them."""
    assert mirrors("tiny-sdxl", "sdxl")
    settings, backends = loaded("tiny-sdxl", data_dir)
    pipe = backends.generator.pipe
    spy = CallSpy(monkeypatch, pipe)
    result = run_loop(settings, backends, tmp_path)
    assert type(pipe) is StableDiffusionXLPipeline
    # Like sdxl, its miniature locates a reference's object with OWLv2 (the tiny one, loaded the same way).
    assert backends.locator is not None and result.candidates[1].references[0].box is not None
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.force_upcast is True
    # load_ip_adapter recognised the Plus kind: a resampler with 16 queries over the encoder's hidden states.
    [projection] = pipe.unet.encoder_hid_proj.image_projection_layers
    assert type(projection) is IPAdapterPlusImageProjection and projection.latents.shape[1] == 16
    assert all_float32(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.image_encoder)
    text, regeneration = spy.calls
    assert spy.scales == [0.0, 0.5]
    assert "low quality" in text["negative_prompt"] and text["guidance_scale"] == 7.5
    assert regeneration["ip_adapter_image"].size == (32, 32)


def test_omnigen_with_references_in_context_through_the_loop(data_dir, tmp_path, monkeypatch):
    """Mirrors Shitao/OmniGen-v1-diffusers (model_index.json, transformer/ (OmniGenTransformer2DModel), vae/,
    scheduler/ (FlowMatchEulerDiscreteScheduler), tokenizer/ (Phi-3's LlamaTokenizer: <s>=1, chat markers)),
    loaded as the omnigen profile loads it; the reference goes in context at its <|image_1|> placeholder."""
    assert mirrors("tiny-omnigen", "omnigen")
    settings, backends = loaded("tiny-omnigen", data_dir)
    pipe = backends.generator.pipe
    assert type(pipe) is OmniGenPipeline
    assert pipe.tokenizer.bos_token_id == 1  # the processor drops a leading 1 from each piece after a placeholder
    spy = CallSpy(monkeypatch, pipe)
    sequences = []
    original = pipe.transformer.forward

    def forward(*args, **kwargs):
        sequences.append((len(kwargs["input_img_latents"]), kwargs["input_image_sizes"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    run_loop(settings, backends, tmp_path)
    assert all_float32(pipe.transformer, pipe.vae)
    text, regeneration = spy.calls
    assert text["input_images"] is None and "<|image_" not in text["prompt"]
    assert "looks like this: <img><|image_1|></img>." in regeneration["prompt"]
    assert "<|image_2|>" not in regeneration["prompt"]
    [image] = regeneration["input_images"]
    assert image.size == (32, 32) and text["img_guidance_scale"] == regeneration["img_guidance_scale"] == 1.6
    # Text alone: no image in any sequence. The regeneration: the reference, VAE-encoded, fills 4 positions (32 px
    # at 16 px a patch, squared) of the conditional and the image-guidance sequences (0 and 2; 1 is unconditional).
    steps = PROFILES["tiny-omnigen"].generator.steps
    assert sequences[:steps] == [(0, {})] * steps
    for latents, spans in sequences[steps:]:
        assert latents == 2 and sorted(spans) == [0, 2]
        assert all(end - start == 4 for [(start, end)] in spans.values())
