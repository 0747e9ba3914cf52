"""Configuration: settings from IMAGERAG_* variables, a TOML file and CLI flags; profiles that name backends.

Precedence, highest first: CLI flags (init arguments), environment (IMAGERAG_*, nested with '__'),
the TOML file (./imagerag.toml, or the path in IMAGERAG_CONFIG), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.state import Budget


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


_NEGATIVE = "low quality, blurry, distorted, deformed, watermark, text"
# ViT-B-32/openai: cosine similarity of a short concept phrase with a matching photo sits near 0.25-0.32, with
# an unrelated one near 0.12-0.20. These are starting points; `imagerag` users with other collections
# should calibrate them on their own data.
_OPENAI_B32 = ClipSpec(model="ViT-B-32", pretrained="openai", judge_threshold=0.24, retrieval_min_similarity=0.22)

PROFILES: dict[str, Profile] = {
    "sdxl": Profile(
        name="sdxl",
        description="SDXL base 1.0 + IP-Adapter Plus (ViT-H), the paper's SDXL settings. Needs a GPU.",
        generator=GeneratorSpec(
            family="sdxl",
            model_id="stabilityai/stable-diffusion-xl-base-1.0",
            ip_adapter=IPAdapterSpec(
                repo="h94/IP-Adapter",
                subfolder="sdxl_models",
                weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
                image_encoder_folder="models/image_encoder",
                scale=0.5,
            ),
            steps=50,
            guidance_scale=7.5,
            negative_prompt=_NEGATIVE,
            regenerate_template="regenerate_ip_adapter",
        ),
        clip=_OPENAI_B32,
        collection="default",
    ),
    "omnigen": Profile(
        name="omnigen",
        description="OmniGen v1 with up to 3 reference images in context. Needs a GPU.",
        generator=GeneratorSpec(
            family="omnigen",
            model_id="Shitao/OmniGen-v1-diffusers",
            steps=50,
            guidance_scale=2.5,
            image_guidance_scale=1.6,
            height=1024,
            width=1024,
            max_references=3,
            regenerate_template="regenerate_omnigen",
            dtype="bfloat16",
        ),
        clip=_OPENAI_B32,
        collection="default",
    ),
    "sd15": Profile(
        name="sd15",
        description="Stable Diffusion 1.5 + IP-Adapter (ViT-H image encoder). Fits smaller GPUs.",
        generator=GeneratorSpec(
            family="sd",
            model_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            ip_adapter=IPAdapterSpec(
                repo="h94/IP-Adapter",
                subfolder="models",
                weight_name="ip-adapter_sd15.safetensors",
                image_encoder_folder="image_encoder",
                scale=0.5,
            ),
            steps=50,
            guidance_scale=7.5,
            negative_prompt=_NEGATIVE,
            regenerate_template="regenerate_ip_adapter",
        ),
        clip=_OPENAI_B32,
        collection="default",
    ),
    # Random tiny components built offline into the data folder on first use (tools.backends.tiny), then loaded
    # through exactly the same from_pretrained / load_ip_adapter / open_clip code as the real profiles.
    "tiny": Profile(
        name="tiny",
        description="Tiny random models built offline: exercises every code path on a CPU in seconds.",
        generator=GeneratorSpec(
            family="sd",
            model_id="tiny:sd",
            ip_adapter=IPAdapterSpec(
                repo="tiny:ip_adapter", subfolder="", weight_name="ip_adapter.safetensors", scale=0.5
            ),
            steps=4,
            guidance_scale=2.0,
            height=32,
            width=32,
            regenerate_template="regenerate_ip_adapter",
            dtype="float32",
        ),
        clip=ClipSpec(model="tiny:clip", judge_threshold=0.0, retrieval_min_similarity=-1.0),
        collection="tiny",
    ),
    # The miniature world (evals/miniworld): small models trained here and shipped in the repository.
    "mini": Profile(
        name="mini",
        description="The miniature world's trained models: the whole loop offline on a CPU in seconds.",
        generator=GeneratorSpec(
            family="sd",
            model_id="mini:t2i",
            ip_adapter=IPAdapterSpec(repo="mini:ip_adapter", subfolder="", weight_name="ip_adapter.safetensors", scale=1.0),
            steps=20,
            guidance_scale=8.0,
            height=32,
            width=32,
            # Its text encoder knows only the world's caption grammar, so references get no extra words.
            regenerate_template="regenerate_plain",
            dtype="float32",
        ),
        clip=ClipSpec(model="mini:clip", judge_threshold=0.3, retrieval_min_similarity=0.3, calibration="mini:clip/calibration.json"),
        collection="miniworld",
    ),
}


class LLMSettings(BaseModel):
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, ...)."""

    model: str | None = Field(default=None, description="Model name, e.g. 'gpt-4o-2024-08-06'. None: no LLM.")
    base_url: str | None = Field(default=None, description="e.g. http://localhost:8000/v1 for vLLM.")
    api_key: SecretStr | None = Field(default=None, description="Falls back to OPENAI_API_KEY.")
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = Field(default=3, ge=0, description="Retries on refusal or malformed output.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGERAG_", env_nested_delimiter="__", extra="forbid")

    profile: str = Field(default="sdxl", description="One of: " + ", ".join(PROFILES))
    policy: Literal["imagerag", "agent"] = "imagerag"
    collection: str | None = Field(default=None, description="Reference collection; default: the profile's.")
    data_dir: Path = Field(default=Path.home() / ".imagerag", description="chromadb, tiny models, threads.")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    seed: int = 0
    retrieve_k: int = Field(default=1, ge=1, description="References retrieved per missing concept.")
    max_tool_errors: int = Field(default=3, ge=1, description="Consecutive failed tool calls before a run fails.")
    chroma_url: str | None = Field(default=None, description="A Chroma server (http://host:8000); default: chromadb in data_dir.")
    checkpoint_url: str | None = Field(default=None, description="postgresql://... for threads; default: SQLite in data_dir.")
    review: bool = Field(default=False, description="Pause before each regeneration for a person to review references.")
    budget: Budget = Field(default_factory=Budget)
    llm: LLMSettings = Field(default_factory=LLMSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("IMAGERAG_CONFIG", "imagerag.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    def resolved_profile(self) -> Profile:
        try:
            return PROFILES[self.profile]
        except KeyError:
            raise ConfigError(
                f"unknown profile {self.profile!r}: choose one of {', '.join(PROFILES)} "
                "(--profile, or IMAGERAG_PROFILE)"
            ) from None

    @property
    def collection_name(self) -> str:
        return self.collection or self.resolved_profile().collection


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and how to fix it."""
