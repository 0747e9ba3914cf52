"""What the backends are built from: profiles (generator, adapter, CLIP), the LLM endpoint, and where data lives.

`BackendConfig` is the part of the settings that decides which heavy objects a process loads; the application's
`Settings` (agent.config) and the graphs' run context (graphs.context) extend it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from imagerag.tools.errors import ImageRAGError

Offload = Literal["none", "model", "sequential"]


class ConfigError(ImageRAGError):
    """A setting that cannot work; the message says which and how to fix it."""


class IPAdapterSpec(BaseModel):
    """Where load_ip_adapter finds the adapter and its image encoder."""

    repo: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str = "image_encoder"
    scale: float = Field(default=0.5, ge=0.0, description="Reference strength (the paper uses 0.5).")


class GeneratorSpec(BaseModel):
    family: Literal["sd", "sdxl", "omnigen"]
    model_id: str = Field(description="Hub id or local folder for from_pretrained.")
    ip_adapter: IPAdapterSpec | None = None
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = 7.5
    image_guidance_scale: float | None = Field(default=None, description="OmniGen only.")
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    max_references: int = Field(default=1, ge=1, description="Reference images one regeneration accepts.")
    regenerate_template: str = Field(description="Prompt template in prompts/ for a regeneration.")
    edit_template: str | None = Field(
        default=None, description="Prompt template for an edit's regions; None: the regeneration's."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"


class ClipSpec(BaseModel):
    model: str = Field(description="open_clip architecture name, or 'local-dir:/path'.")
    pretrained: str | None = Field(default=None, description="open_clip pretrained tag; None for local-dir.")
    judge_threshold: float = Field(description="Cosine similarity at which the CLIP judge accepts a concept.")
    retrieval_min_similarity: float = Field(description="Cosine similarity below which a hit is dropped.")
    calibration: str | None = Field(
        default=None,
        description="JSON file with measured judge_threshold / retrieval_min_similarity that override the above.",
    )


class Profile(BaseModel):
    name: str
    description: str
    generator: GeneratorSpec
    clip: ClipSpec
    collection: str = Field(description="Default chromadb collection of reference images.")
    rerank_k: int | None = Field(
        default=None,
        ge=2,
        description="Retrieval re-ranks this many nearest images by the critic (how many of the caption's concepts "
        "it sees in each); None: CLIP's order. Cheap with the CLIP judge, a call per image with a VLM judge.",
    )
    local: bool = Field(default=False, description="Its models are built or shipped here: no Hub, no GPU needed.")


_NEGATIVE = "low quality, blurry, distorted, deformed, watermark, text"
# ViT-B-32/openai: cosine similarity of a short concept phrase with a matching photo sits near 0.25-0.32, with
# an unrelated one near 0.12-0.20. These are starting points; users should calibrate them on their own data.
_OPENAI_B32 = ClipSpec(model="ViT-B-32", pretrained="openai", judge_threshold=0.24, retrieval_min_similarity=0.22)


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
    return Profile(name=name, description=description, generator=generator, clip=_OPENAI_B32, collection="default")


# Random weights: every similarity passes, so the loop's plumbing runs whatever the images look like.
# The miniature world's collection; its name changes with the world's version, so that an old corpus is never reused.
MINI_COLLECTION = "miniworld3"
_TINY_CLIP = ClipSpec(model="tiny:clip", judge_threshold=0.0, retrieval_min_similarity=-1.0)

PROFILES: dict[str, Profile] = {
    "sdxl": _ip_adapter_profile(
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
    ),
    "omnigen": Profile(
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
    ),
    "sd15": _ip_adapter_profile(
        "sd15",
        "Stable Diffusion 1.5 + IP-Adapter (ViT-H image encoder). Fits smaller GPUs.",
        "sd",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        IPAdapterSpec(repo="h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors"),
    ),
    # Random tiny components built offline into the data folder on first use (tools.backends.tiny), then loaded
    # through exactly the same from_pretrained / load_ip_adapter / open_clip code as the real profiles.
    "tiny": Profile(
        name="tiny",
        description="Tiny random models built offline: exercises every code path on a CPU in seconds.",
        generator=GeneratorSpec(
            family="sd",
            model_id="tiny:sd",
            # h94/IP-Adapter's layout, as the sd15 profile reads it.
            ip_adapter=IPAdapterSpec(
                repo="tiny:ip_adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors"
            ),
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
    ),
    # The miniature world (tools/miniworld): small models trained by evals/miniworld and shipped in the repository.
    "mini": Profile(
        name="mini",
        description="The miniature world's trained models: the whole loop offline on a CPU in seconds.",
        generator=GeneratorSpec(
            family="sd",
            model_id="mini:t2i",
            # Scale 0.6 chosen on 60 rare prompts of a seed no check or benchmark uses (shape 85%, the prompt's
            # colour 65%; at 1.0: 78% and 53%): the stronger the reference, the more its colour and size leak in.
            ip_adapter=IPAdapterSpec(
                repo="mini:ip_adapter", subfolder="", weight_name="ip_adapter.safetensors", scale=0.6
            ),
            steps=20,
            guidance_scale=8.0,
            height=48,
            width=48,
            # Its text encoder knows only the world's caption grammar, so references get no extra words.
            regenerate_template="regenerate_plain",
            dtype="float32",
        ),
        clip=ClipSpec(
            model="mini:clip",
            judge_threshold=0.3,
            retrieval_min_similarity=0.3,
            calibration="mini:clip/calibration.json",
        ),
        collection=MINI_COLLECTION,
        # Whole-image cosine ranks "a heart in the top left" by hearts anywhere; the judge reads cells.
        rerank_k=20,
        local=True,
    ),
}


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
            "local": True,
        }
    )


PROFILES["tiny-sdxl"] = _in_miniature(
    PROFILES["sdxl"],
    "Tiny random SDXL + IP-Adapter Plus in the real repositories' layout: the sdxl profile's code on a CPU in seconds.",
    64,
)
PROFILES["tiny-omnigen"] = _in_miniature(
    PROFILES["omnigen"],
    "Tiny random OmniGen in the real repository's layout, references in context: the omnigen "
    "profile's code on a CPU in seconds.",
    32,
)


class LLMSettings(BaseModel):
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, ...)."""

    model: str | None = Field(default=None, description="Model name, e.g. 'gpt-4o-2024-08-06'. None: no LLM.")
    base_url: str | None = Field(default=None, description="e.g. http://localhost:8000/v1 for vLLM.")
    api_key: SecretStr | None = Field(default=None, description="Falls back to OPENAI_API_KEY.")
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = Field(default=3, ge=0, description="Retries on refusal or malformed output.")


def default_data_dir() -> Path:
    return Path.home() / ".imagerag"


class BackendConfig(BaseModel):
    """Which backends to load and where their data lives; loaded backends are cached per process by this."""

    profile: str = Field(default="sdxl", description="One of: " + ", ".join(PROFILES))
    collection: str | None = Field(default=None, description="Reference collection; default: the profile's.")
    data_dir: Path = Field(default_factory=default_data_dir, description="chromadb, built models, threads.")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    offload: Offload = Field(
        default="none",
        description="For small GPUs: 'model' keeps each component on the CPU until it runs "
        "(enable_model_cpu_offload), 'sequential' does so layer by layer (slowest, least memory).",
    )
    compile: bool = Field(default=False, description="torch.compile the denoiser (slow first image, faster after).")
    chroma_url: str | None = Field(
        default=None, description="A Chroma server (http://host:8000); default: chromadb in data_dir."
    )
    llm: LLMSettings = Field(default_factory=LLMSettings)

    def resolved_profile(self) -> Profile:
        try:
            return PROFILES[self.profile]
        except KeyError:
            raise ConfigError(
                f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)} (--profile, or IMAGERAG_PROFILE)"
            ) from None

    @property
    def collection_name(self) -> str:
        return self.collection or self.resolved_profile().collection

    def backend_key(self) -> str:
        """Identity of the backends these settings load (the API key included, so two keys get two clients)."""
        fields = self.model_dump(mode="json", include=set(BackendConfig.model_fields))
        secret = self.llm.api_key.get_secret_value() if self.llm.api_key else None
        return repr((fields, secret))
