"""The built-in profiles, registered in the `imagerag.profiles` entry-point group (pyproject.toml) like any
package's: a profile names its generator family, CLIP, collection and, optionally, critic and decomposer."""

from __future__ import annotations

from typing import Literal

from imagerag.tools.config import ClipSpec, GeneratorSpec, IPAdapterSpec, Profile

_NEGATIVE = "low quality, blurry, distorted, deformed, watermark, text"
# ViT-B-32/openai: cosine similarity of a short concept phrase with a matching photo sits near 0.25-0.32, with
# an unrelated one near 0.12-0.20. These are starting points; users should calibrate them on their own data.
_OPENAI_B32 = ClipSpec(model="ViT-B-32", pretrained="openai", judge_threshold=0.24, retrieval_min_similarity=0.22)
# Locates a reference's object in a photograph (tools.backends.detector).
_OWLV2 = "google/owlv2-base-patch16-ensemble"


def _ip_adapter_profile(
    name: str, description: str, family: Literal["sd", "sdxl"], model_id: str, adapter: IPAdapterSpec
) -> Profile:
    """A Stable Diffusion family profile with the paper's settings: 50 steps, guidance 7.5, adapter scale 0.5."""
    generator = GeneratorSpec(
        family=family,
        model_id=model_id,
        ip_adapter=adapter,
        negative_prompt=_NEGATIVE,
        regenerate_template="regenerate_ip_adapter",
    )
    return Profile(
        name=name, description=description, generator=generator, clip=_OPENAI_B32, collection="default", detector=_OWLV2
    )


# Random weights: every similarity passes, so the loop's plumbing runs whatever the images look like.
# The miniature world's collection; its name changes with the world's version, so that an old corpus is never reused.
MINI_COLLECTION = "miniworld4"
_TINY_CLIP = ClipSpec(model="tiny:clip", judge_threshold=0.0, retrieval_min_similarity=-1.0)

SDXL = _ip_adapter_profile(
    "sdxl",
    "SDXL base 1.0 + IP-Adapter Plus (ViT-H), the paper's SDXL settings. Needs a GPU.",
    "sdxl",
    "stabilityai/stable-diffusion-xl-base-1.0",
    IPAdapterSpec(
        repo="h94/IP-Adapter",
        subfolder="sdxl_models",
        weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
        image_encoder_folder="models/image_encoder",
    ),
)
OMNIGEN = Profile(
    name="omnigen",
    description="OmniGen v1 with up to 3 reference images in context. Needs a GPU.",
    generator=GeneratorSpec(
        family="omnigen",
        model_id="Shitao/OmniGen-v1-diffusers",
        guidance_scale=2.5,
        image_guidance_scale=1.6,
        height=1024,
        width=1024,
        max_references=3,
        regenerate_template="regenerate_omnigen",
        edit_template="edit_omnigen",
        dtype="bfloat16",
    ),
    clip=_OPENAI_B32,
    collection="default",
    detector=_OWLV2,
)
SD15 = _ip_adapter_profile(
    "sd15",
    "Stable Diffusion 1.5 + IP-Adapter (ViT-H image encoder). Fits smaller GPUs.",
    "sd",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    IPAdapterSpec(repo="h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors"),
)
# Random tiny components built offline into the data folder on first use (tools.backends.tiny), then loaded
# through exactly the same from_pretrained / load_ip_adapter / open_clip code as the real profiles.
TINY = Profile(
    name="tiny",
    description="Tiny random models built offline: exercises every code path on a CPU in seconds.",
    generator=GeneratorSpec(
        family="sd",
        model_id="tiny:sd",
        # h94/IP-Adapter's layout, as the sd15 profile reads it.
        ip_adapter=IPAdapterSpec(repo="tiny:ip_adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors"),
        steps=4,
        guidance_scale=2.0,
        height=32,
        width=32,
        regenerate_template="regenerate_ip_adapter",
        dtype="float32",
    ),
    clip=_TINY_CLIP,
    collection="tiny",
    local=True,
)
# The miniature world (tools/miniworld): small models trained by evals/miniworld and shipped in the repository.
MINI = Profile(
    name="mini",
    description="The miniature world's trained models: the whole loop offline on a CPU in seconds.",
    generator=GeneratorSpec(
        family="sd",
        model_id="mini:t2i",
        # Guidance and adapter scale chosen together on rare prompts of a seed no check or benchmark uses (README, the
        # miniature world's models): at guidance 8 the model drew a star from its reference 58% of the time, at 2 92%
        # (with the adapter at 1.0; hearts and crescents 100% either way); at 1, without guidance, it falls apart.
        ip_adapter=IPAdapterSpec(repo="mini:ip_adapter", subfolder="", weight_name="ip_adapter.safetensors", scale=1.0),
        steps=20,
        guidance_scale=2.0,
        height=48,
        width=48,
        # Its text encoder knows only the world's caption grammar, so references get no extra words.
        regenerate_template="regenerate_plain",
        dtype="float32",
        # Its adapter learned from references of one object each (evals/miniworld/train_t2i.py).
        reference_view="isolate",
    ),
    clip=ClipSpec(
        model="mini:clip",
        judge_threshold=0.3,
        retrieval_min_similarity=0.3,
        calibration="mini:clip/calibration.json",
        # Chosen on dev (evals/results/dev-choices/README.md): at 0.2 the stops the oracle rejects fell from 17 to 5
        # of 120 (0.15: 9); what it costs is images, as a true object read too close to a rival is drawn again.
        stop_margin=0.2,
    ),
    collection=MINI_COLLECTION,
    vocabulary="miniworld",
    # Whole-image cosine ranks "a heart in the top left" by hearts anywhere; the judge reads cells.
    rerank_k=20,
    local=True,
)


def _in_miniature(real: Profile, description: str, size: int) -> Profile:
    """`real` on tiny random weights built offline in the same repositories' layout (tools.backends.tiny): the same
    pipeline class, adapter kind, guidance, templates and dtype (a CPU runs float32 whatever the profile says), with
    2 steps at `size` px, sharing the tiny profile's CLIP and collection."""
    generator = real.generator
    adapter = generator.ip_adapter.model_copy(update={"repo": "tiny:ip_adapter"}) if generator.ip_adapter else None
    miniature = generator.model_copy(
        update={"model_id": f"tiny:{real.name}", "ip_adapter": adapter, "steps": 2, "height": size, "width": size}
    )
    return real.model_copy(
        update={
            "name": f"tiny-{real.name}",
            "description": description,
            "generator": miniature,
            "clip": _TINY_CLIP,
            "collection": "tiny",
            "detector": "tiny:owlv2" if real.detector else None,
            "local": True,
        }
    )


TINY_SDXL = _in_miniature(
    SDXL,
    "Tiny random SDXL + IP-Adapter Plus in the real repositories' layout: the sdxl profile's code on a CPU in seconds.",
    64,
)
TINY_OMNIGEN = _in_miniature(
    OMNIGEN,
    "Tiny random OmniGen in the real repository's layout, references in context: the omnigen "
    "profile's code on a CPU in seconds.",
    32,
)
