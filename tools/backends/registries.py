"""The backend registries a profile names entries of, and what their critics and decomposers are built from.

The registries are entry-point groups (tools.registry): `imagerag.generators` holds generator families (a class
with `from_pretrained`, tools.backends.diffusion.GeneratorFamily), `imagerag.critics` and `imagerag.decomposers`
hold functions of BackendParts. tests/contracts.py holds the contract every registered backend passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from imagerag.tools.backends.clip import ClipEmbedder
from imagerag.tools.backends.diffusion import GeneratorFamily
from imagerag.tools.backends.judges import Critic
from imagerag.tools.backends.planner import Decomposer
from imagerag.tools.config import ClipSpec, Profile
from imagerag.tools.registry import Registry


@dataclass(frozen=True)
class BackendParts:
    """What a critic or decomposer is built from; each part is loaded once per process and shared."""

    profile: Profile
    clip: ClipSpec  # the profile's CLIP with its measured thresholds
    embedder: ClipEmbedder
    llm: BaseChatModel | None
    retries: int  # LLM retries on refusal or malformed output
    data_dir: Path  # where a part keeps what it computes once (the CLIP judge: its cells of collection images)


GENERATORS: Registry[GeneratorFamily] = Registry(
    "imagerag.generators", "generator family", "a profile's generator.family"
)
CRITICS: Registry[Callable[[BackendParts], Critic]] = Registry("imagerag.critics", "critic", "a profile's critic")
DECOMPOSERS: Registry[Callable[[BackendParts], Decomposer]] = Registry(
    "imagerag.decomposers", "decomposer", "a profile's decomposer"
)
