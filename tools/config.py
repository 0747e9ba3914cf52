"""What the backends are built from: profiles (generator, adapter, CLIP), the LLM endpoint, and where data lives.

`BackendConfig` is the part of the settings that decides which heavy objects a process loads; the application's
`Settings` (agent.config) and the graphs' run context (graphs.context) extend it.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator

from imagerag.tools.errors import ConfigError
from imagerag.tools.registry import Registry

Offload = Literal["none", "model", "sequential"]


_COLLECTION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,61}[a-zA-Z0-9]")


class CollectionNameError(ConfigError):
    """A collection name chromadb would refuse (or a path in disguise); refused before chromadb sees it."""


def check_collection_name(name: str) -> str:
    """`name` when chromadb accepts it as a collection name, else CollectionNameError saying the rule."""
    if _COLLECTION_NAME.fullmatch(name) and ".." not in name and not _is_ipv4(name):
        return name
    shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name):,} characters)"
    raise CollectionNameError(
        f"collection name {shown!r} is not allowed: use 3 to 63 characters from a-z, A-Z, 0-9, '.', '_' and '-', "
        "starting and ending with a letter or a digit, without '..' and not an IP address (e.g. --collection my-photos)"
    )


def _is_ipv4(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


class IPAdapterSpec(BaseModel):
    """Where load_ip_adapter finds the adapter and its image encoder."""

    repo: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str = "image_encoder"
    scale: float = Field(default=0.5, ge=0.0, description="Reference strength (the paper uses 0.5).")


# How a reference's located object is handed to the generator (tools.backends.layout.object_view).
ReferenceView = Literal["crop", "isolate"]


class GeneratorSpec(BaseModel):
    family: str = Field(description="A generator family of the `imagerag.generators` registry: sd, sdxl, omnigen.")
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
    reference_view: ReferenceView = Field(
        default="crop",
        description="How a reference's located object is handed over: 'crop' (its box and a margin, which the "
        "adapter's image processor scales up) or 'isolate' (the image with all but the object painted in the "
        "background colour, for an adapter trained on references of one object).",
    )


class ClipSpec(BaseModel):
    model: str = Field(description="open_clip architecture name, or 'local-dir:/path'.")
    pretrained: str | None = Field(default=None, description="open_clip pretrained tag; None for local-dir.")
    judge_threshold: float = Field(description="Cosine similarity at which the CLIP judge accepts a concept.")
    retrieval_min_similarity: float = Field(description="Cosine similarity below which a hit is dropped.")
    stop_margin: float = Field(
        default=0.0,
        ge=0.0,
        description="In a closed world, how much more an object must read as its noun than as any other noun of the "
        "world (cosine similarity, in its cell) before a run stops on it: the checked stop.",
    )
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
    detector: str | None = Field(
        default=None,
        description="An open-vocabulary detector (OWLv2: Hub id, local folder or 'tiny:owlv2') that locates each "
        "retrieved reference's object, so the generator is handed the object, not the whole photograph; used when "
        "the critic does not re-rank (rerank_k None). None: references are handed whole unless the critic re-ranks.",
    )
    local: bool = Field(default=False, description="Its models are built or shipped here: no Hub, no GPU needed.")
    vocabulary: Literal["open", "miniworld"] = Field(
        default="open",
        description="The words a thread's messages are read with: 'open' refuses only clauses that do not parse; "
        "'miniworld' also refuses objects, colours, sizes and places the miniature world does not have.",
    )
    critic: str | None = Field(
        default=None,
        description="A critic of the `imagerag.critics` registry; None: 'vlm' when an LLM is configured, else 'clip'.",
    )
    decomposer: str | None = Field(
        default=None,
        description="A decomposer of the `imagerag.decomposers` registry; None: 'llm' with an LLM, else 'rules'.",
    )


PROFILES: Registry[Profile] = Registry(
    "imagerag.profiles", "profile", "--profile, or IMAGERAG_PROFILE; built-in ones are in tools/profiles.py"
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

    profile: str = Field(default="sdxl", description="A profile of the `imagerag.profiles` registry: sdxl, mini, ...")
    collection: str | None = Field(default=None, description="Reference collection; default: the profile's.")

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str | None) -> str | None:
        return None if value is None else check_collection_name(value)

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
        profile = PROFILES[self.profile]
        if profile.name != self.profile:  # backends are cached and looked up by the profile's own name
            raise ConfigError(
                f"the profile registered as {self.profile!r} calls itself {profile.name!r}: a package registers a "
                "profile under its own name (its entry in the imagerag.profiles group)"
            )
        return profile

    @property
    def collection_name(self) -> str:
        return self.collection or self.resolved_profile().collection

    def backend_key(self) -> str:
        """Identity of the backends these settings load (the API key included, so two keys get two clients)."""
        fields = self.model_dump(mode="json", include=set(BackendConfig.model_fields))
        secret = self.llm.api_key.get_secret_value() if self.llm.api_key else None
        return repr((fields, secret))
