"""What each generator family sends to its diffusers pipeline (a recording stand-in for the pipeline)."""

from PIL import Image

from imagerag.prompts import render
from imagerag.tools.backends.registries import GENERATORS
from imagerag.tools.config import PROFILES
from imagerag.tools.types import RetrievalHit


class RecordingPipe:
    def __init__(self):
        self.calls, self.scales = [], []

    def set_ip_adapter_scale(self, scale):
        self.scales.append(scale)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        kwargs.get("callback_on_step_end", lambda *a: None)(self, 0, 999, {})

        class Out:
            images = [Image.new("RGB", (8, 8))] * kwargs["num_images_per_prompt"]

        return Out()


def hit(query: str) -> RetrievalHit:
    return RetrievalHit(id=query, caption=query, similarity=0.5, source="x.png", query=query)


def test_sdxl_uses_the_papers_settings_and_switches_the_adapter_off_for_text_only():
    pipe = RecordingPipe()
    generator = GENERATORS["sdxl"](pipe, PROFILES["sdxl"].generator, "cpu")
    steps = []
    generator.generate("a boston bull", seed=0, on_step=lambda s, t: steps.append((s, t)))
    generator.generate("a boston bull", seed=0, references=[Image.new("RGB", (8, 8))])
    text_only, conditioned = pipe.calls
    assert pipe.scales == [0.0, 0.5]
    assert text_only["num_inference_steps"] == 50 and "low quality" in text_only["negative_prompt"]
    assert conditioned["ip_adapter_image"].size == (8, 8)
    assert steps == [(1, 50)]


def test_omnigen_gets_up_to_three_references_in_context_with_numbered_placeholders():
    pipe = RecordingPipe()
    spec = PROFILES["omnigen"].generator
    generator = GENERATORS["omnigen"](pipe, spec, "cpu")
    refs = [hit("a boston bull"), hit("a red scarf"), hit("a lighthouse"), hit("a fourth thing")][: spec.max_references]
    prompt = render(spec.regenerate_template, prompt="a boston bull in a red scarf by a lighthouse", references=refs)
    assert (
        "<img><|image_3|></img>" in prompt and "<|image_4|>" not in prompt and "A red scarf looks like this" in prompt
    )
    generator.generate(prompt, seed=0, references=[Image.new("RGB", (8, 8))] * 4)
    call = pipe.calls[0]
    assert len(call["input_images"]) == 3 and call["img_guidance_scale"] == 1.6 and call["guidance_scale"] == 2.5
    assert "negative_prompt" not in call and not pipe.scales


def test_profiles_name_the_papers_weights():
    sdxl = PROFILES["sdxl"]
    assert sdxl.generator.model_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (
        sdxl.generator.ip_adapter.repo,
        sdxl.generator.ip_adapter.subfolder,
        sdxl.generator.ip_adapter.weight_name,
    ) == ("h94/IP-Adapter", "sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors")
    assert sdxl.generator.ip_adapter.image_encoder_folder == "models/image_encoder"
    assert (sdxl.clip.model, sdxl.clip.pretrained) == ("ViT-B-32", "openai")
    assert PROFILES["omnigen"].generator.model_id == "Shitao/OmniGen-v1-diffusers"
    assert PROFILES["sd15"].generator.ip_adapter.weight_name == "ip-adapter_sd15.safetensors"
